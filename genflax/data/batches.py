"""Deterministic batches addressed by their position in training.

A batch is a pure function of (seed, position), so a checkpoint only stores
the position and a resumed run sees exactly the batches an uninterrupted one
would have seen.
"""

import jax
import numpy as np

from genflax.errors import ConfigError


class Batches:
  """Epoch-reshuffled batches of in-memory arrays; no iterator state.

  Epoch e uses permutation `np.random.default_rng([seed, e]).permutation(N)`;
  global batch `position` is rows perm[i*B:(i+1)*B] of epoch
  position // steps_per_epoch, with i = position % steps_per_epoch (the last
  N % B examples of each epoch are dropped). Process p of P gets the
  contiguous slice [p*B/P, (p+1)*B/P) of that global batch.

  `crops` {key: n} crops each row of arrays[key] [N, W, ...] to n items on
  axis 1, at an offset drawn for every row and epoch from
  `np.random.default_rng([seed, e, 1])`: random windows of a token stream,
  as nanoGPT's random crops, that still visit the data epoch by epoch.
  """

  def __init__(self, arrays: dict[str, np.ndarray], global_batch_size: int,
               seed: int, process_index: int | None = None,
               process_count: int | None = None, crops: dict[str, int] | None = None):
    """arrays: {key: [N, ...]}, all with the same N."""
    self.arrays = arrays
    self.num_examples = _common_length(arrays)
    self.crops = dict(crops or {})
    for key, n in self.crops.items():
      if not 1 <= n <= arrays[key].shape[1]:
        raise ValueError(f"crop of {n} from rows of {arrays[key].shape[1]} ({key})")
    self.global_batch_size = global_batch_size
    self.seed = seed
    self.process_index = (jax.process_index() if process_index is None
                          else process_index)
    self.process_count = (jax.process_count() if process_count is None
                          else process_count)
    _check(self.num_examples, global_batch_size, self.process_index,
           self.process_count)
    self.steps_per_epoch = self.num_examples // global_batch_size
    self._epoch, self._perm, self._offsets = None, None, None  # the current epoch's

  def get(self, position: int) -> dict[str, np.ndarray]:
    """Returns this process's share of global batch `position`: [B/P, ...]."""
    if position < 0:
      raise ValueError(f"batch position must be >= 0, got {position}")
    epoch, step = divmod(position, self.steps_per_epoch)
    size = self.global_batch_size // self.process_count
    start = step * self.global_batch_size + self.process_index * size
    rows = self._permutation(epoch)[start:start + size]
    offsets = {k: o[rows] for k, o in self._crop_offsets(epoch).items()}
    return {k: crop(v[rows], offsets[k], self.crops[k]) if k in self.crops else v[rows]
            for k, v in self.arrays.items()}

  def epoch_rows(self, epoch: int) -> np.ndarray:
    """Rows of every global batch of `epoch`: [steps_per_epoch, B]; row i is batch i's."""
    used = self.steps_per_epoch * self.global_batch_size
    return self._permutation(epoch)[:used].reshape(self.steps_per_epoch, -1)

  def epoch_offsets(self, epoch: int) -> dict[str, np.ndarray]:
    """{key: the crop offsets of epoch_rows(epoch)'s rows [steps_per_epoch, B]}."""
    rows = self.epoch_rows(epoch)
    return {k: o[rows] for k, o in self._crop_offsets(epoch).items()}

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._epoch:
      rng = np.random.default_rng([self.seed, epoch])
      self._epoch, self._perm = epoch, rng.permutation(self.num_examples)
      rng = np.random.default_rng([self.seed, epoch, 1])
      self._offsets = {k: rng.integers(0, self.arrays[k].shape[1] - n + 1, self.num_examples)
                       for k, n in sorted(self.crops.items())}
    return self._perm

  def _crop_offsets(self, epoch: int) -> dict[str, np.ndarray]:
    self._permutation(epoch)
    return self._offsets


def crop(rows, offsets, n: int, xp=np):
  """rows [B, W, ...] -> [B, n, ...]: row b from offsets[b] (NumPy, or xp=jax.numpy)."""
  index = offsets[:, None] + xp.arange(n)[None, :]
  return xp.take_along_axis(rows, index.reshape(index.shape + (1,) * (rows.ndim - 2)), axis=1)


def _common_length(arrays):
  lengths = {k: len(v) for k, v in arrays.items()}
  if not lengths or len(set(lengths.values())) != 1:
    raise ValueError(f"arrays need one common leading size, got {lengths}")
  return next(iter(lengths.values()))


def _check(num_examples, global_batch_size, process_index, process_count):
  if not 0 <= process_index < process_count:
    raise ValueError(f"process {process_index} is not in [0, {process_count})")
  if not 0 < global_batch_size <= num_examples:
    raise ConfigError(
        f"global batch size {global_batch_size} does not fit the dataset's "
        f"{num_examples} training examples; use a batch size from 1 to "
        f"{num_examples}")
  if global_batch_size % process_count:
    raise ConfigError(
        f"global batch size {global_batch_size} does not split evenly over "
        f"{process_count} processes; use a multiple of {process_count}")
