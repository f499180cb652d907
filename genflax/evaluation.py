"""Means of per-example evaluation values over a whole split, on the mesh, and the
final evaluation's parts, kept as each one ends.

The split runs in batches of eval.batch_size; the last is padded with
copies of its last row, and every row carries its own validity mask through
the same sharding as the batch, so the padding never counts, whichever
process or device holds which rows.
"""
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from genflax import files, sharding


class Parts:
  """The final evaluation's finished parts (3 draws of 10,000 samples, the bits/dim
  through an ODE: each can take many minutes), written to `path` as each one ends, so
  a run stopped during its final evaluation redoes only the parts it had not finished.
  Each part draws from its own fixed seeds, so the resumed evaluation's numbers are the
  uninterrupted one's. The file names the step and the eval config it belongs to;
  under another step or eval config it is ignored. A family's evaluate calls
  parts(name, compute) for each part; Parts() (no path) only computes."""

  def __init__(self, path: str | None = None, key=None, write: bool = False, log=print):
    self.path, self.key, self.write = path, key, write
    saved = files.read_json(path) if path and os.path.exists(path) else None
    self.values = saved["parts"] if saved and saved.get("key") == key else {}
    if self.values:
      log(f"final evaluation: {', '.join(self.values)} already done at step {key['step']} "
          f"({path}); computing the rest")

  def __call__(self, name: str, compute) -> dict:
    """compute() -> {metric: number}, or what it returned before (process 0's file
    decides for every process: they read the same workdir)."""
    done = name in self.values
    if jax.process_count() > 1:
      done = bool(multihost_utils.broadcast_one_to_all(np.int32(done)))
    if done:
      return self.values.get(name, {})
    value = {k: float(v) if isinstance(v, np.floating) else v for k, v in compute().items()}
    self.values[name] = value
    if self.write:
      files.write_json(self.path, {"key": self.key, "parts": self.values})
    return value


def split_means(eval_step, state, arrays: dict, batch_size: int, batch_sh, rng, final) -> dict:
  """eval_step(state, batch, rng, final) -> {name: [B]}, averaged over all of `arrays`."""
  n = len(next(iter(arrays.values())))
  count, rank = jax.process_count(), jax.process_index()
  share = batch_size // count  # this process's rows of each batch
  sums = {}
  for start in range(0, n, batch_size):
    batch = {k: v[start:start + batch_size] for k, v in arrays.items()}
    valid = len(next(iter(batch.values())))
    batch = {k: np.concatenate([v, np.repeat(v[-1:], batch_size - valid, 0)])
             for k, v in batch.items()}
    mask = (np.arange(batch_size) < valid).astype(np.float64)
    local = {k: v[rank * share:(rank + 1) * share] for k, v in batch.items()}
    out = eval_step(state, sharding.put_batch(local, batch_sh),
                    jax.random.fold_in(rng, start), final)
    weights = sharding.put_batch({"mask": mask[rank * share:(rank + 1) * share]}, batch_sh)
    out, weights = gathered((out, weights), count)
    for k, v in out.items():
      sums[k] = sums.get(k, 0.0) + float(np.dot(np.asarray(v, np.float64), weights["mask"]))
  return {k: v / n for k, v in sums.items()}


def gathered(tree, count: int):
  """The whole of each batch-sharded array, on the host."""
  if count == 1:  # one process holds every row; the gather would compile a program per leaf
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)
