"""The device mesh and how arrays are laid out on it.

The config names the mesh (`config.mesh`: axis name -> size, -1 for "the
rest of the devices") and the logical-axis rules; models only name their
axes (`nn.with_logical_partitioning`). Batches are split over the `data`
and `fsdp` axes; parameters without logical names are replicated.
"""
import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from genflax.errors import ConfigError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# The logical axis of the flat optimizer vectors that
# train.grad_allreduce=reduce_scatter splits over the batch axes.
OPT_SHARD = "optimizer_shard"


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """A mesh with axes (data, fsdp, tensor) sized by `mesh_cfg`.

  One axis may be -1: it takes the devices the others leave. A mesh smaller
  than the machine uses the first devices (one process only: with several,
  every process's devices must take part).
  """
  devices = jax.devices() if devices is None else devices
  sizes = {a: int(mesh_cfg.get(a, 1)) for a in AXES}
  free = [a for a in AXES if sizes[a] == -1]
  known = math.prod(s for s in sizes.values() if s != -1)
  if free and len(free) == 1 and known > 0 and len(devices) % known == 0:
    sizes[free[0]] = len(devices) // known
  used = math.prod(sizes.values())
  fits = used == len(devices) or (0 < used < len(devices) and jax.process_count() == 1)
  if any(s < 1 for s in sizes.values()) or not fits:
    raise ConfigError(
        f"mesh {dict(mesh_cfg)} does not fit {len(devices)} devices "
        f"({jax.process_count()} process(es)): give sizes >= 1 that multiply to "
        f"{len(devices)}, with at most one of them -1 for 'the rest'.")
  shape = tuple(sizes[a] for a in AXES)
  return Mesh(np.asarray(devices[:used]).reshape(shape), AXES)


def check_batch_size(mesh: Mesh, key: str, batch_size: int) -> None:
  shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
  if batch_size % shards:
    raise ConfigError(
        f"{key}={batch_size} does not split over the mesh's {shards} batch shards "
        f"(data x fsdp = {dict(mesh.shape)}): use a multiple of {shards}.")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def state_shardings(abstract_state, mesh: Mesh, rules):
  """Shardings for a state pytree from its logical-axis annotations.

  `abstract_state` comes from `jax.eval_shape(init)`; leaves boxed by
  `nn.with_logical_partitioning` map through `rules` (pairs of logical axis,
  mesh axis), all other leaves are replicated.
  """
  logical = nn.get_partition_spec(abstract_state)
  rules = (*map(tuple, rules), (OPT_SHARD, BATCH_AXES))
  return nn.logical_to_mesh_sharding(logical, mesh, rules)


def put_batch(batch: dict, sharding: NamedSharding) -> dict:
  """This process's numpy share of a batch -> global arrays on the mesh."""
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in batch.items()}


def process_0_first(make, what: str):
  """make() on process 0, then on the others once it has returned.

  For what a run builds once and saves (the LM's tokenizer, the GAN's
  feature network): process 0 trains and saves it, the others then find it
  and load it, on the shared filesystem that the checkpoints need anyway.
  """
  if jax.process_count() == 1:
    return make()
  out = make() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(f"genflax: {what}")
  return out if jax.process_index() == 0 else make()


def host_copy(tree):
  """A pytree of global arrays as NumPy on every process (gathered where sharded)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return jax.tree.map(lambda a: np.asarray(a) if a.is_fully_replicated
                      else multihost_utils.process_allgather(a, tiled=True), tree)
