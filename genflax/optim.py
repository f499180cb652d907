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
"""
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
