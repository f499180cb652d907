"""What several test files share: loading configs and running the CLI."""
import functools
import glob
import json
import os
import subprocess
import sys

import numpy as np

from genflax import configfile, tasks, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))


def config(name: str, arg: str = "smoke", **overrides):
  """configs/<name>.py:<arg> with dotted-key overrides, e.g. {"train.num_steps": 4}."""
  c = configfile.load_config(os.path.join(ROOT, "configs", f"{name}.py") + (f":{arg}" if arg else ""))
  for key, value in overrides.items():
    *path, last = key.split(".")
    node = c
    for part in path:
      node = node[part]
    node[last] = value
  c.lock()
  return c


def assert_smoke_ran(results: dict) -> None:
  """A smoke variant's results: its 12 steps on one compile, every value finite."""
  assert results["step"] == results["train_step_traces"] * 12
  values = [v for v in results.values() if isinstance(v, float)]
  assert values and all(np.isfinite(values))


def init(task, setup, rng):
  """task.init(setup, rng) compiled as the trainer compiles a run's start (op by op,
  a U-Net's init took 18 s)."""
  return tasks.run_once(functools.partial(task.init, setup), rng)


def cli(*args: str, module: str = "genflax.main", timeout: float = 300,
        **kwargs) -> subprocess.CompletedProcess:
  """Runs `python -m MODULE ARGS` from the repo root."""
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, **kwargs)


def popen(*args: str, stdout=subprocess.PIPE, **kwargs) -> subprocess.Popen:
  """Starts `python -m genflax.main ARGS` from the repo root, stderr into stdout."""
  return subprocess.Popen([sys.executable, "-m", "genflax.main", *args], cwd=ROOT,
                          stdout=stdout, stderr=subprocess.STDOUT, text=True, **kwargs)


# One interpreter imports genflax.main and the libraries behind it once, then
# forks a child per command line: each child runs genflax.main's own main()
# from parsing to exit, as `python -m genflax.main` would, without paying
# for the imports again (~3 s of CPU each). Children exit with main()'s
# status; an exception that escapes it prints its traceback and exits 1.
_FORKING_CLI = r"""
import json, os, sys, traceback
import jax, flax, optax, orbax.checkpoint, tensorflow_datasets  # noqa: the costly imports
from genflax import main, trainer  # noqa
outdir, commands = sys.argv[1], json.load(sys.stdin)
for i, argv in enumerate(commands):
  pid = os.fork()
  if pid == 0:
    for fd, name in ((1, "stdout"), (2, "stderr")):
      os.dup2(os.open(os.path.join(outdir, f"{i}.{name}"), os.O_WRONLY | os.O_CREAT), fd)
    sys.argv = ["genflax.main", *argv]  # ml_collections reads the overrides from sys.argv
    try:
      code = main.main(sys.argv)
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else 1
    except BaseException:
      traceback.print_exc()
      code = 1
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(code)
  _, status = os.waitpid(pid, 0)
  open(os.path.join(outdir, f"{i}.rc"), "w").write(str(os.waitstatus_to_exitcode(status)))
"""


def cli_many(commands: list[list[str]], tmpdir, timeout: float = 600) -> list[subprocess.CompletedProcess]:
  """`python -m genflax.main ARGS` for each ARGS in commands, one after another (see above)."""
  subprocess.run([sys.executable, "-c", _FORKING_CLI, str(tmpdir)], cwd=ROOT, check=True,
                 input=json.dumps(commands), text=True, timeout=timeout)
  read = lambda i, name: open(os.path.join(tmpdir, f"{i}.{name}")).read()
  return [subprocess.CompletedProcess(argv, int(read(i, "rc")), read(i, "stdout"), read(i, "stderr"))
          for i, argv in enumerate(commands)]


def sample_arrays(workdir: str, out, num: int, *flags: str) -> dict:
  """`genflax.sample --out OUT.npz` of a trained image run: its arrays, checked against
  the run's dataset (uint8 levels in its image shape, labels where conditional)."""
  result = cli("--workdir", workdir, "--num", str(num), "--out", str(out), *flags,
               module="genflax.sample")
  assert result.returncode == 0, result.stderr
  assert f"wrote {num} samples to {out}" in result.stdout
  _, setup, _, _ = trainer.load_run(workdir)
  arrays = dict(np.load(out))
  images = arrays["images"]
  assert images.dtype == np.uint8 and images.shape == (num, *setup.info.image_shape)
  assert images.max() < setup.info.num_levels and images.std() > 0
  assert ("labels" in arrays) == setup.config.model.conditional
  return arrays
