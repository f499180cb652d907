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
sequential pieces (gradient accumulation); `update` takes one optimizer step
with it.
"""
import jax
import jax.numpy as jnp
import optax

from genflax.errors import ConfigError

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


def grads(loss_fn, params, batch: dict, rng, microbatches: int = 1):
  """(grads, aux) of `loss_fn(params, batch, rng) -> (loss, aux)`, one microbatch at a time.

  With microbatches M > 1 the batch [B, ...] is cut into M microbatches of
  B/M rows that run one after another in a `lax.scan` (activations for B/M
  rows at a time), and the gradients and `aux` (batch means, such as the
  loss) are averaged over them: the same values as one pass over the whole
  batch, up to float rounding, when the loss is a mean over rows and draws
  no randomness. Microbatch m takes rows m, m + M, m + 2M, ..., so each keeps
  the batch's split over the data-parallel devices, and its RNG is
  `fold_in(rng, m)`. M = 1 is exactly `jax.grad(loss_fn, has_aux=True)`.
  """
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


def update(tx: optax.GradientTransformation, state: dict, loss_fn, batch: dict, rng,
           microbatches: int = 1):
  """One step of `tx` on state {"params", "opt_state"} down the gradient of `loss_fn`.

  loss_fn(params, batch, rng) -> (loss, metrics), as for `grads`. Returns the
  new state and the metrics, with the gradient's global norm as `grad_norm`.
  """
  grads_, metrics = grads(loss_fn, state["params"], batch, rng, microbatches)
  updates, opt_state = tx.update(grads_, state["opt_state"], state["params"])
  metrics["grad_norm"] = optax.tree.norm(grads_)
  return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, metrics
