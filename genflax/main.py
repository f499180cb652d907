"""Runs one experiment: `python -m genflax.main --config configs/X.py[:arg] --workdir DIR`.

Config values are overridden with `--config.a.b=value` (ml_collections
config flags; the config is locked, so a misspelt key is an error). Bad
input ends with one line on stderr that says what to fix, and status 2.
"""
import os
import sys

from absl import flags
from ml_collections import config_flags

from genflax import hostmem
from genflax.configfile import check_key, flat_keys, load_config
from genflax.errors import CheckpointError, ConfigError, UserError
from genflax.sweep import trial as sweep_trial

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/vae_digits.py:smoke.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and samples; rerun to resume.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Join a multi-process run through jax.distributed.initialize "
    "(auto-detected on SLURM and TPU pods; elsewhere give the three flags below).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "How many processes take part.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def parse(argv: list[str]):
  """Parses the command line into (config, workdir), or raises ConfigError."""
  # absl reports a missing file or an unknown key as a traceback: check first.
  defaults = load_config(config_spec(argv))
  keys = flat_keys(defaults)
  overrides = [a[len("--config."):].partition("=") for a in argv
               if a.startswith("--config.")]
  for key, _, _ in overrides:
    check_key(key, keys)
  try:
    flags.FLAGS(argv)
  except flags.Error as e:
    bad = [(k, v) for k, _, v in overrides if f"--config.{k}=" in str(e)]
    if not bad:
      raise ConfigError(str(e)) from None
    key, value = bad[0]
    default = defaults
    for part in key.split("."):
      default = default[part]
    raise ConfigError(f"--config.{key}={value!r} is not a valid "
                      f"{type(default).__name__} (the default is {default!r})") from None
  if not _WORKDIR.value:
    raise ConfigError("--workdir is missing: give a directory for checkpoints and "
                      "metrics, e.g. --workdir runs/my_run")
  return _CONFIG.value, _WORKDIR.value


def config_spec(argv: list[str]) -> str:
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  raise ConfigError("--config is missing: name a config file, e.g. "
                    "--config configs/vae_digits.py")


def start_distributed(coordinator_address=None, num_processes=None, process_id=None) -> None:
  """Connects this process to the others (all run the same command); None: auto-detect."""
  import jax  # pylint: disable=g-import-not-at-top
  # CPU devices of different processes talk through gloo; accelerators ignore this.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def split_cpu(count: int) -> None:
  """Asks XLA for `count` host devices (-1: one per core); must run before jax starts."""
  flag = "--xla_force_host_platform_device_count"
  if count and flag not in os.environ.get("XLA_FLAGS", ""):
    count = usable_cores() if count == -1 else count
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}={count}".strip()


def size_cpu_pool() -> None:
  """XLA:CPU's thread pool at 16 threads per device when the host is split into
  several devices and JAX's persistent compilation cache is on (sweeps turn it
  on). A program read from that cache runs its collectives in any order
  (jaxlib 0.10.2 gives each deserialised collective its own ordering resource),
  each holding a pool thread until every device joins it: with the default
  pool, one thread per core, they could take every thread and wait forever. A
  program with C collectives on N devices holds at most (N-1)*C threads; the
  configs' largest C is 14. PJRT_NPROC or NPROC in the environment wins."""
  devices = hostmem.forced_cpu_devices()
  if (devices > 1 and os.environ.get("JAX_COMPILATION_CACHE_DIR")
      and not {"PJRT_NPROC", "NPROC"} & os.environ.keys()):
    os.environ["PJRT_NPROC"] = str(max(usable_cores(), 16 * devices))


def exit_now(message: str) -> None:
  """Prints the error and leaves at once: after a failed write, the threads of
  Orbax's save may never finish, and Python would wait for them at exit."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(2)  # pylint: disable=protected-access


def usable_cores() -> int:
  """The cores this process may run on (a sweep worker's share), else all of them."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def main(argv: list[str]) -> int:
  workdir = ""
  try:
    config, workdir = parse(argv)
    split_cpu(config.cpu_devices)
    size_cpu_pool()
    hostmem.setup(config.host_malloc, config.cpu_devices)  # before jax starts any thread
    if _DISTRIBUTED.value or _COORDINATOR.value:
      start_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from genflax import trainer  # Imported late: flag errors need not wait for jax.
    trainer.train(config, workdir, on_eval=sweep_trial.reporter())
  except CheckpointError as e:
    exit_now(str(e))
  except OSError as e:  # a full or read-only disk under the run's other files
    from genflax import checkpoints  # pylint: disable=g-import-not-at-top
    exit_now(f"{e.strerror or e} writing {e.filename or 'the run files'}; "
             f"{checkpoints.newest(os.path.join(workdir, 'checkpoints'))}. Make room or make "
             "the workdir writable, then run the same command to resume from there.")
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
