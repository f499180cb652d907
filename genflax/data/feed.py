"""How the train step gets its batch: sent from the host, or gathered on the devices.

Both modes give the step exactly `Batches.get(step)` (the same rows, in the
same order, with the same dtypes), so a run's results do not depend on the
mode.

- host: every step, the host gathers its share of the batch from the numpy
  arrays and sends it to the devices (`sharding.put_batch`).
- device: the training arrays are placed once on every device (replicated).
  Once per epoch the host sends that epoch's row order, [steps per epoch, B]
  int32 (and the rows' crop offsets, where the arrays are cropped); the
  compiled step takes row `step % steps_per_epoch` of it and gathers the
  batch itself. No host work or transfer per step: for small
  datasets whose steps take a millisecond or two, the host would otherwise
  be a visible part of the step.

`config.data.on_device_mb` picks the mode: datasets up to that many MB (the
training arrays, held once per device) go on the devices; 0 keeps them on
the host.
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from genflax import sharding
from genflax.data.batches import Batches, crop


def _canonical(x: np.ndarray) -> np.ndarray:
  """As JAX stores it (int64 -> int32, float64 -> float32 unless x64 is on)."""
  return x.astype(jax.dtypes.canonicalize_dtype(x.dtype), copy=False)


class Feed:
  """The train step's inputs for each step, and the batch they hold (inside the step)."""

  def __init__(self, batches: Batches, batch_sharding: NamedSharding, on_device_mb: float):
    self.batches = batches
    self.batch_sharding = batch_sharding
    repl = NamedSharding(batch_sharding.mesh, P())
    nbytes = sum(v.nbytes for v in batches.arrays.values())
    self.on_device = nbytes <= on_device_mb * 2**20
    self.megabytes = nbytes / 2**20
    if self.on_device:
      self._arrays = {k: jax.make_array_from_process_local_data(repl, _canonical(v))
                      for k, v in batches.arrays.items()}
      self.shardings = (repl, repl, repl)
    else:
      self.shardings = batch_sharding
    self._epoch, self._rows, self._offsets = None, None, None

  @property
  def mode(self) -> str:
    return "device" if self.on_device else "host"

  def __str__(self):
    if self.on_device:
      return f"gathered on the devices from {self.megabytes:.1f} MB of training arrays on each"
    return f"sent from the host each step ({self.megabytes:.1f} MB of training arrays)"

  def inputs(self, step: int):
    """What the compiled step takes for global step `step` (device arrays)."""
    if not self.on_device:
      return sharding.put_batch(self.batches.get(step), self.batch_sharding)
    epoch = step // self.batches.steps_per_epoch
    if epoch != self._epoch:
      rows = self.batches.epoch_rows(epoch).astype(np.int32)  # [steps per epoch, B]
      offsets = {k: o.astype(np.int32) for k, o in self.batches.epoch_offsets(epoch).items()}
      self._epoch = epoch
      self._rows = jax.make_array_from_process_local_data(self.shardings[1], rows)
      self._offsets = {k: jax.make_array_from_process_local_data(self.shardings[2], o)
                       for k, o in offsets.items()}
    return self._arrays, self._rows, self._offsets

  def batch(self, inputs, step) -> dict:
    """Inside the compiled step: the batch of `step` (a traced int) as global arrays."""
    if not self.on_device:
      return inputs
    arrays, rows, offsets = inputs
    i = step % self.batches.steps_per_epoch
    out = {k: jnp.take(v, rows[i], axis=0) for k, v in arrays.items()}  # [B, ...]
    out.update({k: crop(out[k], offsets[k][i], n, jnp) for k, n in self.batches.crops.items()})
    return {k: jax.lax.with_sharding_constraint(v, self.batch_sharding) for k, v in out.items()}
