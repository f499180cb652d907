"""Every config value checked where the config is read, before any work.

`config(c, task)` checks the sections every experiment has (genflax/defaults.py)
and then calls the family's `check(c)` for its own; the trainer runs it
first, and the sweep runs it for every setting before its first trial. Each
failure is one ConfigError naming the key, its value and what it may be.
The helpers below are what families check with.
"""
import math
from collections.abc import Iterable

from genflax import hostmem, optim
from genflax.data import catalogue
from genflax.errors import ConfigError
from genflax.models import layers


def get(c, key: str):
  for part in key.split("."):
    c = c[part]
  return c


def integer(c, key: str, low: int | None = None) -> None:
  value = get(c, key)
  if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
    raise ConfigError(f"{key}={value!r}: must be an integer" + (f" >= {low}" if low is not None
                                                                else ""))


def number(c, key: str, low: float | None = None, high: float | None = None,
           above: float | None = None, below: float | None = None) -> None:
  """A finite number within [low, high] and (above, below) where given."""
  value = get(c, key)
  bounds = [f">= {low}" if low is not None else "", f"<= {high}" if high is not None else "",
            f"> {above}" if above is not None else "", f"< {below}" if below is not None else ""]
  ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        and (low is None or value >= low) and (high is None or value <= high)
        and (above is None or value > above) and (below is None or value < below))
  if not ok:
    shown = " and ".join(b for b in bounds if b)
    raise ConfigError(f"{key}={value!r}: must be a finite number" + (f" {shown}" if shown else ""))


def one_of(c, key: str, allowed: Iterable) -> None:
  value = get(c, key)
  if value not in tuple(allowed):
    raise ConfigError(f"{key}={value!r}: expected one of {tuple(allowed)}")


def boolean(c, key: str) -> None:
  value = get(c, key)
  if not isinstance(value, bool):
    raise ConfigError(f"{key}={value!r}: must be True or False")


def sizes(c, key: str, nonempty: bool = False) -> None:
  """A tuple of layer widths (integers >= 1)."""
  value = get(c, key)
  if (not isinstance(value, (tuple, list)) or (nonempty and not value)
      or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
    raise ConfigError(f"{key}={value!r}: must be a tuple of integers >= 1, e.g. (256, 256)"
                      + (" (at least one)" if nonempty else ""))


def sampling(settings, prefix: str) -> None:
  """Temperature >= 0, top_k >= 0, top_p in (0, 1]: of eval.* or genflax.sample's
  flags. (top_p <= 0 would mask every token and sample token 0 silently.)"""
  for key, ok, what in (("temperature", lambda v: v >= 0, ">= 0 (0: greedy)"),
                        ("top_k", lambda v: v >= 0, ">= 0 (0: all tokens)"),
                        ("top_p", lambda v: 0 < v <= 1, "in (0, 1] (1: all tokens)")):
    value = getattr(settings, key)
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and ok(value)):
      raise ConfigError(f"{prefix}{key}={value!r}: must be {what}")


def config(c, task) -> None:
  """The shared sections, then the family's own (task.check)."""
  integer(c, "seed", 0)
  integer(c, "data.batch_size", 1)
  number(c, "data.on_device_mb", low=0)
  idx_dir(c)
  for section in (k for k in c.keys() if k.startswith("optim")):
    optimizer(c, section)
  integer(c, "train.num_steps", 0)
  for key in ("log_every_steps", "eval_every_steps", "ckpt_every_steps", "keep_checkpoints",
              "microbatches"):
    integer(c, f"train.{key}", 1)
  b, m = c.data.batch_size, c.train.microbatches
  if b % m:
    raise ConfigError(f"train.microbatches={m} does not divide data.batch_size={b}: "
                      f"use a divisor of {b}")
  one_of(c, "train.grad_allreduce", ("auto", *optim.GRAD_ALLREDUCES))
  profile = tuple(c.train.profile_steps)
  if len(profile) != 2 or not all(isinstance(s, int) and s >= 0 for s in profile) or (
      profile[0] > profile[1]):
    raise ConfigError(f"train.profile_steps={profile!r}: must be (start, stop) with "
                      "0 <= start <= stop (steps; (0, 0) traces nothing)")
  integer(c, "eval.batch_size", 1)
  integer(c, "eval.num_samples", 0)
  if c.mesh.data != -1 and not (isinstance(c.mesh.data, int) and c.mesh.data >= 1):
    raise ConfigError(f"mesh.data={c.mesh.data!r}: must be an integer >= 1, or -1 for the "
                      "devices the other axes leave")
  integer(c, "mesh.fsdp", 1)
  integer(c, "mesh.tensor", 1)
  integer(c, "mesh.dcn_data", 1)
  integer(c, "mesh.dcn_fsdp", 1)
  integer(c, "cpu_devices", -1)
  one_of(c, "host_malloc", hostmem.CHOICES)
  one_of(c, "model.dtype", ("auto", *layers.DTYPES))  # every family's modules take both;
  # auto: the one measured faster for the family on this machine (genflax/platform.py)
  one_of(c, "model.param_dtype", layers.DTYPES)
  for rule in c.sharding_rules:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ConfigError(f"sharding_rules: {rule!r} is not a (logical axis, mesh axis) pair")
  try:
    task.check(c)
  except AttributeError as e:  # ConfigDict's for a section or key this config does not have
    key = str(e).strip("\"'")
    raise ConfigError(f"task={c.task!r} reads config key {key!r}, which this config lacks: start "
                      f"from a config written for that task (configs/*.py with "
                      f"config.task = {c.task!r})") from None


def idx_dir(c) -> None:
  """data.idx_dir: read by the IDX datasets only, and needed by `idx`."""
  name, value = c.data.name, c.data.idx_dir
  if not isinstance(value, str):
    raise ConfigError(f"data.idx_dir={value!r}: must be a directory path (a string)")
  if value and name not in catalogue.IDX_DATASETS:
    raise ConfigError(f"data.idx_dir={value!r} is read only by the IDX datasets "
                      f"{tuple(catalogue.IDX_DATASETS)}, not data.name={name!r}; set "
                      "data.name=idx to train on MNIST-format files from there")
  if name == "idx" and not value:
    raise ConfigError("data.name='idx' reads MNIST-format IDX files from the directory "
                      "data.idx_dir names, and it is ''; name one, e.g. "
                      "--config.data.idx_dir=~/data/mnist")


def optimizer(c, section: str) -> None:
  one_of(c, f"{section}.name", optim.OPTIMIZERS)
  one_of(c, f"{section}.schedule", optim.SCHEDULES)
  number(c, f"{section}.lr", above=0)
  integer(c, f"{section}.warmup_steps", 0)
  integer(c, f"{section}.decay_steps", 0)
  number(c, f"{section}.end_lr_frac", low=0, high=1)
  number(c, f"{section}.weight_decay", low=0)
  number(c, f"{section}.grad_clip", low=0)
  number(c, f"{section}.b1", low=0, below=1)
  number(c, f"{section}.b2", low=0, below=1)
