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
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

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
  every process's devices must take part). On accelerators the devices are
  laid out by the physical topology (`mesh_utils.create_device_mesh`: TPU
  torus coordinates, NVLink islands); CPU devices keep their order.
  `mesh_cfg.dcn_<axis>` (default 1) says over how many groups an axis spans
  the slower network between TPU slices or GPU hosts: a hybrid mesh
  (`mesh_utils.create_hybrid_device_mesh`) keeps the axis's other factor
  inside each slice or host, e.g. data=16, dcn_data=2 on two 8-GPU hosts
  averages gradients over NVLink first.
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
  return Mesh(device_grid(sizes, dcn_sizes(mesh_cfg, sizes), devices[:used]), AXES,
              axis_types=(AxisType.Auto,) * len(AXES))


def dcn_sizes(mesh_cfg, sizes: dict) -> dict:
  dcn = {a: mesh_cfg.get(f"dcn_{a}", 1) for a in AXES}
  for a in AXES:
    if not isinstance(dcn[a], int) or dcn[a] < 1 or sizes[a] % dcn[a]:
      raise ConfigError(f"mesh.dcn_{a}={dcn[a]!r}: must be an integer >= 1 that divides "
                        f"mesh.{a}={sizes[a]} (the groups of the axis across slices or hosts)")
  return dcn


def device_grid(sizes: dict, dcn: dict, devices) -> np.ndarray:
  """The devices as an array of shape (data, fsdp, tensor): by topology, and
  with `dcn` > 1 a hybrid of the axes within each granule (a TPU slice, else a
  process) and across them."""
  shape = tuple(sizes[a] for a in AXES)
  if math.prod(dcn.values()) == 1:
    if devices[0].platform == "cpu":  # no topology to follow
      return np.asarray(devices).reshape(shape)
    return mesh_utils.create_device_mesh(shape, devices=devices)
  ici = tuple(sizes[a] // dcn[a] for a in AXES)
  granule = "process_index" if devices[0].platform != "tpu" else "slice_index"
  groups = len({getattr(d, granule) for d in devices})
  if groups != math.prod(dcn.values()):
    raise ConfigError(f"mesh dcn_* sizes {dcn} make {math.prod(dcn.values())} groups, but the "
                      f"devices are in {groups} {'slices' if granule == 'slice_index' else 'processes'}: "
                      "their product must be that number")
  return mesh_utils.create_hybrid_device_mesh(ici, tuple(dcn[a] for a in AXES), devices,
                                              process_is_granule=granule == "process_index")


def check_batch_size(mesh: Mesh, key: str, batch_size: int) -> None:
  shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
  if batch_size % shards:
    below, above = (batch_size // shards) * shards, -(-batch_size // shards) * shards
    nearest = f"{below} or {above}" if below else f"{above}"
    raise ConfigError(
        f"{key}={batch_size} does not split over the mesh's {shards} batch shards "
        f"(data x fsdp of {dict(mesh.shape)}, {len(mesh.devices.flat)} devices): use a "
        f"multiple of {shards}, e.g. {nearest}, or a smaller mesh.data.")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def state_shardings(abstract_state, mesh: Mesh, rules, split_optimizer: bool = True):
  """Shardings for a state pytree from its logical-axis annotations.

  `abstract_state` comes from `jax.eval_shape(init)`; leaves boxed by
  `nn.with_logical_partitioning` map through `rules` (pairs of logical axis,
  mesh axis), all other leaves are replicated. `split_optimizer=False` keeps
  the flat optimizer vectors whole on every device (restoring them on a
  mesh whose batch shards do not divide them).
  """
  logical = nn.get_partition_spec(abstract_state)
  rules = (*map(tuple, rules), (OPT_SHARD, BATCH_AXES if split_optimizer else None))
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
