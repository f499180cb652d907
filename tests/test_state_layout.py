"""Golden snapshots of each family's state: every leaf's path, dtype, shape and
PartitionSpec, as a checkpoint holds them.

A checkpoint restores only into the same tree, so a renamed module, a moved
layer or a new axis name breaks every saved run. The snapshot is of the smoke
variant of one config per family, with the state's shapes from
`jax.eval_shape` (nothing is compiled), and the optimizer in its per-parameter
layout (the one every mesh restores). After an intended change, regenerate:

    GENFLAX_UPDATE_GOLDEN=1 python -m pytest tests/test_state_layout.py
"""
import difflib
import os
import tempfile

import jax
import pytest

from genflax import sharding, trainer
from tests import helpers

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
CONFIGS = ("vae_digits", "dcgan_digits", "lm_shakespeare", "diffusion_digits")


def state_layout(name: str) -> list[str]:
  """One line per leaf of configs/<name>.py:smoke's trainer state:
  `path dtype[shape] spec`."""
  config = helpers.config(name, "smoke", **{"train.grad_allreduce": "per_param"})
  task = trainer.load_task(config.task)
  mesh = sharding.make_mesh(config.mesh)
  with tempfile.TemporaryDirectory() as workdir:  # the LM trains its tokenizer here
    _, _, info = task.datasets(config, workdir)
  config, _ = trainer.resolve(config, task, info, mesh)
  _, abstract, _ = trainer.state_layout(task, task.build(config, info), mesh)
  return [f"{jax.tree_util.keystr(path, simple=True, separator='/')} "
          f"{a.dtype}[{','.join(map(str, a.shape))}] {a.sharding.spec}"
          for path, a in jax.tree_util.tree_flatten_with_path(abstract)[0]]


@pytest.mark.parametrize("name", CONFIGS)
def test_state_layout_matches_its_golden_file(name):
  got = state_layout(name)
  path = os.path.join(GOLDEN, f"{name}_smoke.txt")
  if os.environ.get("GENFLAX_UPDATE_GOLDEN") == "1":
    os.makedirs(GOLDEN, exist_ok=True)
    with open(path, "w") as f:
      f.write("\n".join(got) + "\n")
  assert os.path.exists(path), (f"no {path}: write it with GENFLAX_UPDATE_GOLDEN=1 "
                                "python -m pytest tests/test_state_layout.py")
  with open(path) as f:
    want = f.read().splitlines()
  diff = "\n".join(difflib.unified_diff(want, got, os.path.relpath(path), "now", lineterm="",
                                        n=1))
  assert got == want, (
      f"the state of configs/{name}.py:smoke changed, so checkpoints written before will "
      f"not restore. If that is intended, regenerate the golden files with "
      f"GENFLAX_UPDATE_GOLDEN=1 python -m pytest tests/test_state_layout.py and commit "
      f"them:\n{diff}")
