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
"""
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import PartitionSpec as P

from genflax import sharding
from genflax.errors import ConfigError

GRAD_ALLREDUCES = ("per_param", "flat")

_SCHEDULES = ("constant", "cosine", "linear")
_OPTIMIZERS = ("adam", "adamw", "sgd")


def schedule(cfg, num_steps: int) -> optax.Schedule:
  """Warmup then constant, cosine or linear decay, as one optax schedule."""
  if cfg.schedule not in _SCHEDULES:
    raise ConfigError(f"optim.schedule={cfg.schedule!r}: expected one of {_SCHEDULES}")
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
  if cfg.name not in _OPTIMIZERS:
    raise ConfigError(f"optim.name={cfg.name!r}: expected one of {_OPTIMIZERS}")
  lr = schedule(cfg, num_steps)
  if cfg.name == "adam":
    opt = optax.adam(lr, b1=cfg.b1, b2=cfg.b2)
  elif cfg.name == "adamw":
    opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                      mask=weight_decay_mask)
  else:
    opt = optax.sgd(lr, momentum=cfg.b1 or None)
  if cfg.grad_clip:
    opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
  return opt


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


def check_grad_allreduce(train_cfg, mesh) -> None:
  """train.grad_allreduce names a known way, and `flat` gets a data-parallel mesh."""
  how = train_cfg.grad_allreduce
  if how not in GRAD_ALLREDUCES:
    raise ConfigError(f"train.grad_allreduce={how!r}: expected one of {GRAD_ALLREDUCES}")
  if how == "flat" and (mesh.shape["fsdp"] > 1 or mesh.shape["tensor"] > 1):
    raise ConfigError(
        f"train.grad_allreduce=flat needs parameters replicated on every device, but the mesh "
        f"{dict(mesh.shape)} splits them: use mesh.fsdp=1 and mesh.tensor=1, or "
        f"train.grad_allreduce=per_param.")


def update(tx: optax.GradientTransformation, state: dict, loss_fn, batch: dict, rng,
           train_cfg, mesh):
  """One step of `tx` on state {"params", "opt_state"} down the gradient of `loss_fn`.

  loss_fn(params, batch, rng) -> (loss, metrics), as for `grads`; `train_cfg`
  (config.train) gives `microbatches` and `grad_allreduce`, and `mesh` the
  devices that `flat` averages over. Returns the new state and the metrics,
  with the gradient's global norm as `grad_norm`.
  """
  flat_over = mesh if train_cfg.grad_allreduce == "flat" else None
  grads_, metrics = grads(loss_fn, state["params"], batch, rng, train_cfg.microbatches, flat_over)
  updates, opt_state = tx.update(grads_, state["opt_state"], state["params"])
  metrics["grad_norm"] = optax.tree.norm(grads_)
  return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, metrics
