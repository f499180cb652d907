"""Means of per-example evaluation values over a whole split, on the mesh.

The split runs in batches of eval.batch_size; the last is padded with
copies of its last row, and every row carries its own validity mask through
the same sharding as the batch, so the padding never counts, whichever
process or device holds which rows.
"""
import jax
import numpy as np
from jax.experimental import multihost_utils

from genflax import sharding


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
