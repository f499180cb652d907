"""Optimizers and learning-rate schedules from the config, through optax.

Config (a ConfigDict, e.g. `config.optim`):
  name           adam | adamw | sgd
  lr             peak learning rate
  schedule       constant | cosine | linear   (after warmup)
  warmup_steps   linear warmup from 0 to lr
  decay_steps    length of the decay; 0 means train.num_steps - warmup_steps
  end_lr_frac    the decayed value as a fraction of lr
  weight_decay   decoupled (adamw) weight decay
  grad_clip      global-norm clipping; 0 turns it off
  b1, b2         Adam moments

`grads` computes the gradient of a batch in `train.microbatches`
sequential pieces (gradient accumulation), and with
`train.grad_allreduce=flat` averages it over the data-parallel devices in
one all-reduce; `update` takes one optimizer step with it.
`train.grad_allreduce=reduce_scatter` also splits the optimizer's work:
see `update`.
"""
import math
import typing

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import PartitionSpec as P

from genflax import sharding
from genflax.errors import ConfigError

GRAD_ALLREDUCES = ("per_param", "flat", "reduce_scatter")  # and "auto": genflax/platform.py
# reduce_scatter: each flat optimizer vector is padded to a multiple of this,
# so its checkpoint fits any data-parallel device count that divides it.
FLAT_PAD = 1024

SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("adam", "adamw", "sgd")


def schedule(cfg, num_steps: int) -> optax.Schedule:
  """Warmup then constant, cosine or linear decay, as one optax schedule."""
  decay_steps = cfg.decay_steps or max(num_steps - cfg.warmup_steps, 1)
  end = cfg.lr * cfg.end_lr_frac
  if cfg.schedule == "constant":
    decay = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.end_lr_frac)
  else:
    decay = optax.linear_schedule(cfg.lr, end, decay_steps)
  if not cfg.warmup_steps:
    return decay
  warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
  return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def build(cfg, num_steps: int, weight_decay_mask=None) -> optax.GradientTransformation:
  """The optimizer named by `cfg`, with clipping and the schedule.

  `weight_decay_mask` (a pytree of bools or a function of the params) picks
  the parameters that adamw decays; by default all of them.
  """
  lr = schedule(cfg, num_steps)
  if cfg.name == "adam":
    opt = optax.adam(lr, b1=cfg.b1, b2=cfg.b2)
  elif cfg.name == "adamw":
    opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                      mask=_flat_aware(weight_decay_mask))
  else:
    opt = optax.sgd(lr, momentum=cfg.b1 or None)
  if cfg.grad_clip:
    opt = optax.chain(clip_by_global_norm(cfg.grad_clip), opt)
  return opt


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm (the same computation), except that inside
  `shard_map` over the batch axes the norm spans every device's slice of the
  updates (train.grad_allreduce=reduce_scatter)."""
  def update_fn(updates, state, params=None):
    del params
    sharded = set(sharding.BATCH_AXES) & set(jax.sharding.get_abstract_mesh().manual_axes)
    if sharded:
      g_norm = jnp.sqrt(jax.lax.psum(optax.tree.norm(updates, squared=True), tuple(sharded)))
    else:
      g_norm = optax.tree.norm(updates)
    trigger = jnp.squeeze(g_norm < max_norm)
    clip = lambda t: jax.lax.select(trigger, t, (t / g_norm.astype(t.dtype)) * max_norm)
    return jax.tree.map(clip, updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


class Flat(typing.NamedTuple):
  """The parameters as two flat vectors (train.grad_allreduce=reduce_scatter):
  those that weight decay applies to, and the rest."""
  decay: jax.Array
  keep: jax.Array


def _flat_aware(mask):
  """A weight-decay mask that also answers for `Flat` vectors."""
  if mask is None:
    return None
  return lambda tree: (Flat(True, False) if isinstance(tree, Flat)
                       else mask(tree) if callable(mask) else mask)


class _FlatLayout:
  """Where each parameter sits in the two padded `Flat` vectors."""

  def __init__(self, params, decay_mask=None):
    leaves, self.treedef = jax.tree.flatten(params)
    if decay_mask is None:
      decays = [True] * len(leaves)
    else:  # a bool per parameter, or a function of the parameters giving them
      decays = jax.tree.leaves(decay_mask(params) if callable(decay_mask) else decay_mask)
    self.shapes = [x.shape for x in leaves]
    self.groups = ([i for i, d in enumerate(decays) if d],       # Flat.decay
                   [i for i, d in enumerate(decays) if not d])   # Flat.keep
    self.sizes = [sum(math.prod(self.shapes[i]) for i in g) for g in self.groups]
    self.padded = [max(1, -(-n // FLAT_PAD)) * FLAT_PAD for n in self.sizes]

  def zeros(self, dtype=jnp.float32) -> Flat:
    return Flat(*(jnp.zeros((n,), dtype) for n in self.padded))

  def ravel(self, tree) -> Flat:
    leaves = jax.tree.leaves(tree)
    return Flat(*(jnp.pad(jnp.concatenate([leaves[i].reshape(-1) for i in g] or [jnp.zeros(0)]),
                          (0, pad - n))
                  for g, n, pad in zip(self.groups, self.sizes, self.padded)))

  def unravel(self, flat: Flat):
    leaves = [None] * len(self.shapes)
    for g, vector in zip(self.groups, flat):
      offset = 0
      for i in g:
        size = math.prod(self.shapes[i])
        leaves[i] = vector[offset:offset + size].reshape(self.shapes[i])
        offset += size
    return jax.tree.unflatten(self.treedef, leaves)


def init(tx: optax.GradientTransformation, params, train_cfg, decay_mask=None):
  """The optimizer state of `tx` for `params` (which may carry logical axis
  names): per parameter, or with train.grad_allreduce=reduce_scatter, for the
  two `Flat` vectors, split over the batch axes of the mesh."""
  if train_cfg.grad_allreduce != "reduce_scatter":
    return tx.init(params)
  flat = _FlatLayout(nn.unbox(params), decay_mask).zeros()
  return tx.init(jax.tree.map(lambda v: nn.Partitioned(v, names=(sharding.OPT_SHARD,)), flat))


def layout(train_cfg) -> str:
  """How `init` lays out the optimizer state: "flat" (two `Flat` vectors per
  moment, train.grad_allreduce=reduce_scatter) or "tree" (one array per parameter)."""
  return "flat" if train_cfg.grad_allreduce == "reduce_scatter" else "tree"


def relayout(opt_state, params, decay_mask=None):
  """The same optimizer state in the other `layout`: Flat vectors back into
  per-parameter arrays (their padding dropped), or per-parameter arrays into
  Flat vectors. For resuming a checkpoint under another train.grad_allreduce
  (another device count resolves `auto` differently); `decay_mask` as for `init`."""
  flat = _FlatLayout(params, decay_mask)
  is_flat = lambda x: isinstance(x, Flat)
  if any(map(is_flat, jax.tree.leaves(opt_state, is_leaf=is_flat))):
    return jax.tree.map(lambda x: flat.unravel(x) if is_flat(x) else x, opt_state,
                        is_leaf=is_flat)
  like_params = lambda x: jax.tree.structure(x) == flat.treedef
  return jax.tree.map(lambda x: flat.ravel(x) if like_params(x) else x, opt_state,
                      is_leaf=like_params)


def grads(loss_fn, params, batch: dict, rng, microbatches: int = 1, flat_over=None):
  """(grads, aux) of `loss_fn(params, batch, rng) -> (loss, aux)`, one microbatch at a time.

  With microbatches M > 1 the batch [B, ...] is cut into M microbatches of
  B/M rows that run one after another in a `lax.scan` (activations for B/M
  rows at a time), and the gradients and `aux` (batch means, such as the
  loss) are averaged over them: the same values as one pass over the whole
  batch, up to float rounding, when the loss is a mean over rows and draws
  no randomness. Microbatch m takes rows m, m + M, m + 2M, ..., so each keeps
  the batch's split over the data-parallel devices, and its RNG is
  `fold_in(rng, m)`. M = 1 is exactly `jax.grad(loss_fn, has_aux=True)`.

  `flat_over` (a mesh whose parameters are replicated) runs all of this on
  each device's own rows (`shard_map` over the batch axes) and then averages
  the gradients over the devices as one flat buffer, in one all-reduce,
  instead of the all-reduce per parameter that XLA inserts otherwise: on
  CPU devices each buffer of a collective costs tens of microseconds in one
  process and about half a millisecond through gloo between processes.
  Each device draws its randomness from `fold_in(rng, device's batch shard)`.
  """
  if flat_over is not None:
    return _flat_allreduce(loss_fn, params, batch, rng, microbatches, flat_over)
  grad_fn = jax.grad(loss_fn, has_aux=True)
  if microbatches == 1:
    return grad_fn(params, batch, rng)
  split = lambda x: x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)

  def add(total, xs):
    piece, m = xs
    out = grad_fn(params, piece, jax.random.fold_in(rng, m))
    return jax.tree.map(jnp.add, total, out), None

  shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: split(x)[0], batch), rng)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  total, _ = jax.lax.scan(add, zeros, (jax.tree.map(split, batch), jnp.arange(microbatches)))
  return jax.tree.map(lambda x: x / microbatches, total)


def _flat_allreduce(loss_fn, params, batch, rng, microbatches, mesh):
  axes = sharding.BATCH_AXES

  def local(params, batch, rng):
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axes))
    grads_, aux = grads(loss_fn, params, batch, rng, microbatches)
    with jax.named_scope("grad_allreduce"):
      flat, unravel = ravel_pytree(grads_)
      flat, aux = jax.lax.pmean((flat, aux), axes)
      return unravel(flat), aux

  # check_vma=False: the gradients of the replicated params stay per device
  # (no implicit psum per parameter); `local` averages them itself.
  return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axes), P()),
                       out_specs=P(), check_vma=False)(params, batch, rng)


def _sharded_update(tx, state, loss_fn, batch, rng, microbatches, mesh, decay_mask):
  axes = sharding.BATCH_AXES
  n = math.prod(mesh.shape[a] for a in axes)
  layout = _FlatLayout(state["params"], decay_mask)

  def local(state, batch, rng):
    i = jax.lax.axis_index(axes)
    grads_, aux = grads(loss_fn, state["params"], batch, jax.random.fold_in(rng, i), microbatches)
    with jax.named_scope("grad_reduce_scatter"):
      g = Flat(*(jax.lax.psum_scatter(v, axes, tiled=True) / n for v in layout.ravel(grads_)))
      aux = jax.lax.pmean(aux, axes)
    aux["grad_norm"] = jnp.sqrt(jax.lax.psum(optax.tree.norm(g, squared=True), axes))
    params = Flat(*(jax.lax.dynamic_slice_in_dim(v, i * (v.size // n), v.size // n)
                    for v in layout.ravel(state["params"])))
    updates, opt_state = tx.update(g, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    with jax.named_scope("param_all_gather"):
      params = Flat(*(jax.lax.all_gather(v, axes, tiled=True) for v in params))
    return {"params": layout.unravel(params), "opt_state": opt_state}, aux

  spec = lambda x: P(axes) if x.ndim else P()
  state_specs = {"params": P(), "opt_state": jax.tree.map(spec, state["opt_state"])}
  # check_vma=False as in `_flat_allreduce`: the collectives are written out.
  return jax.shard_map(local, mesh=mesh, in_specs=(state_specs, P(axes), P()),
                       out_specs=(state_specs, P()), check_vma=False)(state, batch, rng)


def check_grad_allreduce(train_cfg, mesh) -> None:
  """`flat` and `reduce_scatter` get a data-parallel mesh they can split over
  (train.grad_allreduce itself is checked with the config: genflax/checks.py)."""
  how = train_cfg.grad_allreduce
  if how == "auto":  # resolved to what fits the mesh (genflax/platform.py)
    return
  if how != "per_param" and (mesh.shape["fsdp"] > 1 or mesh.shape["tensor"] > 1):
    raise ConfigError(
        f"train.grad_allreduce={how} needs parameters replicated on every device, but the mesh "
        f"{dict(mesh.shape)} splits them: use mesh.fsdp=1 and mesh.tensor=1, or "
        f"train.grad_allreduce=per_param.")
  shards = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
  if how == "reduce_scatter" and FLAT_PAD % shards:
    raise ConfigError(
        f"train.grad_allreduce=reduce_scatter splits the optimizer over the {shards} batch "
        f"shards of the mesh {dict(mesh.shape)}, which must divide {FLAT_PAD}: use a power of "
        f"two, or train.grad_allreduce=flat.")


def update(tx: optax.GradientTransformation, state: dict, loss_fn, batch: dict, rng,
           train_cfg, mesh, decay_mask=None):
  """One step of `tx` on state {"params", "opt_state"} down the gradient of `loss_fn`.

  loss_fn(params, batch, rng) -> (loss, metrics), as for `grads`; `train_cfg`
  (config.train) gives `microbatches` and `grad_allreduce`, and `mesh` the
  devices that `flat` averages over. Returns the new state and the metrics,
  with the gradient's global norm as `grad_norm`.

  train.grad_allreduce=reduce_scatter (ZeRO stage 1): each device computes
  the gradient of its rows as for `flat`, the gradients are summed with one
  reduce-scatter of the two `Flat` vectors, each device runs `tx` on its
  1/n of them with its 1/n of the optimizer state (from `init`, which
  `decay_mask` must match), and one all-gather returns the new parameters:
  the optimizer's memory and work are split over the devices instead of
  repeated on each.
  """
  if train_cfg.grad_allreduce == "reduce_scatter":
    return _sharded_update(tx, state, loss_fn, batch, rng, train_cfg.microbatches, mesh,
                           decay_mask)
  flat_over = mesh if train_cfg.grad_allreduce == "flat" else None
  grads_, metrics = grads(loss_fn, state["params"], batch, rng, train_cfg.microbatches, flat_over)
  updates, opt_state = tx.update(grads_, state["opt_state"], state["params"])
  metrics["grad_norm"] = optax.tree.norm(grads_)
  return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, metrics
