"""A sweep's definition, its checks against the config, and its Optuna study.

The definition (`Sweep`) is written to WORKDIR/sweep.json when the sweep
starts; every worker, trial and report reads it from there, so they all
build the same sampler, pruner and trial commands. Running the command
again with the same definition continues the study; a different one in the
same workdir is refused.
"""
import copy
import dataclasses
import itertools
import json
import os
import shlex
import sys

import optuna

from genflax import configfile, files
from genflax.errors import ConfigError, UserError
from genflax.sweep import space

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "hyperband", "successive_halving")
DIRECTIONS = ("minimize", "maximize")
# Changing these may go with continuing a study; the rest defines it.
NOT_IDENTITY = ("trials", "storage")


@dataclasses.dataclass(frozen=True)
class Sweep:
  config: str                     # FILE[:arg], as `genflax.main --config` takes it
  overrides: dict                 # fixed --config.KEY=VALUE of every trial (values as text)
  params: dict                    # KEY -> its space as text (space.parse reads it back)
  metric: str                     # a key of the trials' results.json and evals
  direction: str = "minimize"
  sampler: str = "tpe"
  seed: int = 0                   # the sampler's
  pruner: str = "none"
  pruner_args: dict = dataclasses.field(default_factory=dict)
  trials: int = 0                 # the cap over all workers and reruns
  storage: str = ""               # an Optuna storage URL; "" = WORKDIR/study.journal
  study_name: str = "genflax"

  def spaces(self) -> dict:
    return {k: space.parse(k, v) for k, v in self.params.items()}

  def identity(self) -> dict:
    d = dataclasses.asdict(self)
    return {k: v for k, v in d.items() if k not in NOT_IDENTITY}

  def spec(self, params: dict) -> str:
    """The --config FILE[:arg] of a trial: the base variants and those of its `:` axes."""
    path, _, arg = self.config.partition(":")
    variants = [v for v in arg.split(",") if v]
    variants += [params[k] for k in sorted(params) if k.startswith(":") and params[k]]
    return f"{path}:{','.join(variants)}" if variants else path

  def trial_command(self, params: dict, workdir: str, python: str = sys.executable) -> list[str]:
    """The `genflax.main` command line of a trial with these parameter values."""
    spec = self.spec(params)
    values = {**self.overrides,
              **{k: space.format_value(v) for k, v in params.items() if not k.startswith(":")}}
    return [python, "-m", "genflax.main", f"--config={spec}", f"--workdir={workdir}",
            *(f"--config.{k}={v}" for k, v in values.items())]


def display(command: list[str]) -> str:
  """A command as a user would type it (python for the interpreter's path)."""
  return shlex.join(["python", *command[1:]])


# ---- Checks against the config, before any trial starts

def check(sweep: Sweep) -> None:
  """Every key and value of the sweep is one the locked config accepts."""
  if sweep.direction not in DIRECTIONS:
    raise ConfigError(f"--direction={sweep.direction}: expected one of {DIRECTIONS}")
  if sweep.sampler not in SAMPLERS:
    raise ConfigError(f"--sampler={sweep.sampler}: expected one of {SAMPLERS}")
  if sweep.pruner not in PRUNERS:
    raise ConfigError(f"--pruner={sweep.pruner}: expected one of {PRUNERS}")
  if not sweep.metric:
    raise ConfigError("--metric is missing: name a key of the trials' results.json "
                      "(e.g. iwae_nll for a VAE, fid for a GAN, loss for an LM)")
  if sweep.trials < 1:
    raise ConfigError(f"--trials={sweep.trials}: give how many trials to run in all (>= 1)")
  spaces = sweep.spaces()
  if not spaces:
    raise ConfigError("the sweep varies nothing: give --param KEY=SPACE or --sweep NAME")
  if sweep.sampler == "grid":
    space.grid(spaces)
  path, _, arg = sweep.config.partition(":")
  for key, s in spaces.items():
    if key.startswith(":"):
      if not isinstance(s, space.Choice) or not all(isinstance(v, str) for v in s.values):
        raise ConfigError(f"--param {key}={s}: a variant axis takes a list of variant names")
      for v in s.values:
        configfile.load_config(f"{path}:{','.join(filter(None, [arg, v]))}")
  config = configfile.load_config(sweep.config)
  keys = configfile.flat_keys(config)
  for key, text in sweep.overrides.items():
    configfile.check_key(key, keys)
    set_value(config, key, parse_value(key, text, get(config, key)), f"--config.{key}={text}")
  for key, s in spaces.items():
    if key.startswith(":"):
      continue
    configfile.check_key(key, keys, what="--param key")
    if get(config, key) is not None and hasattr(get(config, key), "items"):
      raise ConfigError(f"--param {key}: {key} is a section; sweep one of its keys")
    values = s.values if isinstance(s, space.Choice) else (s.low, s.high)
    for v in values:
      set_value(copy.deepcopy(config), key, v, f"--param {key}={s}")
  check_settings(sweep, spaces)


MAX_CHECKED = 5000  # settings checked in full before the first trial


def check_settings(sweep: Sweep, spaces: dict) -> None:
  """Every setting the sweep can run (ranges: their bounds) passes the checks the
  trial itself would make (genflax/checks.py), so that a bad combination stops
  the sweep now, not at trial 17."""
  from genflax import checks, trainer  # pylint: disable=g-import-not-at-top  # jax: only now
  axes = {k: (s.values if isinstance(s, space.Choice) else (s.low, s.high))
          for k, s in spaces.items()}
  for values in itertools.islice(itertools.product(*axes.values()), MAX_CHECKED):
    point = dict(zip(axes, values))
    config = trial_config(sweep, point)
    try:
      checks.config(config, trainer.load_task(config.task))
    except ConfigError as e:
      shown = ", ".join(f"{k}={space.format_value(v)}" for k, v in point.items())
      raise ConfigError(f"the trial with {shown} would stop at once: {e}") from None


def trial_config(sweep: Sweep, point: dict):
  """The config a trial with these values runs, as genflax.main builds it."""
  config = configfile.load_config(sweep.spec(point))
  for key, text in sweep.overrides.items():
    set_value(config, key, parse_value(key, text, get(config, key)), f"--config.{key}={text}")
  for key, value in point.items():
    if not key.startswith(":"):
      set_value(config, key, value, f"--param {key}")
  return config


def get(config, key: str):
  for part in key.split("."):
    config = config[part]
  return config


def parse_value(key: str, text: str, default):
  """A fixed override's text as the config's type takes it (as absl would)."""
  if isinstance(default, str):
    return text
  try:
    return space.parse(key, text).values[0]
  except (ConfigError, AttributeError):
    raise ConfigError(f"--config.{key}={text}: cannot read the value "
                      f"(the default is {default!r})") from None


def set_value(config, key: str, value, where: str) -> None:
  """config[key] = value, converted as the command line would, or a ConfigError."""
  *parents, last = key.split(".")
  node = config
  for part in parents:
    node = node[part]
  default = node[last]
  if isinstance(default, bool) and value in ("true", "false", "True", "False"):
    value = value in ("true", "True")
  ok = not (isinstance(default, (int, float)) and not isinstance(default, bool)
            and isinstance(value, bool))
  if ok:
    try:
      node[last] = value
      return
    except (TypeError, ValueError):
      pass
  raise ConfigError(f"{where}: {space.format_value(value)!r} is not a valid "
                    f"{type(default).__name__} for {key} (the default is {default!r})")


# ---- sweep.json

def path(workdir: str) -> str:
  return os.path.join(workdir, "sweep.json")


def load(workdir: str) -> Sweep:
  if not os.path.exists(path(workdir)):
    raise UserError(f"{workdir} is not a sweep: it has no sweep.json (start one with "
                    "python -m genflax.sweep --config FILE --workdir DIR --param KEY=SPACE)")
  try:  # read_json: None if it is cut short or garbage, and Sweep(**None) is a TypeError too
    return Sweep(**files.read_json(path(workdir)))
  except TypeError:  # keys of another shape, or of another genflax version
    raise UserError(
        f"{path(workdir)} is unreadable: it holds the sweep's definition, which cannot be "
        "recovered from anywhere else. Put back a copy of it, or start the sweep again in a "
        f"new --workdir (nothing in {workdir} was changed)") from None


def check_workdir(workdir: str, sweep: Sweep) -> None:
  """Refuses a workdir that holds another sweep (a different definition)."""
  if os.path.exists(path(workdir)):
    theirs = load(workdir).identity()
    ours = sweep.identity()
    diffs = [f"{k}={theirs[k]!r} there, {ours[k]!r} here" for k in ours if theirs.get(k) != ours[k]]
    if diffs:
      raise UserError(f"{workdir} holds another sweep ({'; '.join(diffs)}). Use a new "
                      f"--workdir, or delete {workdir} to start this sweep there.")


def save(workdir: str, sweep: Sweep) -> None:
  """Writes sweep.json, which every worker, trial and report reads."""
  text = json.dumps(dataclasses.asdict(sweep), indent=2) + "\n"
  files.write_atomically(path(workdir), lambda f: f.write(text.encode()))


# ---- The Optuna study

def storage(sweep: Sweep, workdir: str):
  if sweep.storage:
    try:
      return optuna.storages.RDBStorage(sweep.storage)
    except ImportError:
      raise UserError(f"--storage {sweep.storage}: its database driver is not installed "
                      "(for PostgreSQL: pip install 'psycopg[binary]')") from None
    except Exception as e:  # pylint: disable=broad-except  # SQLAlchemy's, and bad URLs
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise UserError(f"--storage {sweep.storage}: cannot open it: {reason}") from None
  journal = os.path.join(workdir, "study.journal")
  drop_cut_record(journal)
  try:  # reads the whole journal
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(journal))
  except Exception as e:  # pylint: disable=broad-except  (Optuna's parsing: JSON, keys, UTF-8)
    raise _unreadable_journal(journal, e) from None


def drop_cut_record(journal: str) -> None:
  """Cuts a journal back to its last whole record where its last append was cut
  short (a kill or a full disk mid-write: no newline at its end), and says so.
  Optuna reads past such a record, as a write still under way, but its next
  append would join it into one line that no reader can parse. Appends hold the
  journal's lock, so under it a record without its newline is one that never
  finished. A journal with unreadable records before the cut is left as it is."""
  if not os.path.exists(journal):
    return
  lock = optuna.storages.journal.JournalFileSymlinkLock(journal)
  lock.acquire()
  try:
    with open(journal, "rb") as f:
      content = f.read()
    if not content or content.endswith(b"\n"):
      return
    keep = content.rfind(b"\n") + 1
    try:  # a journal unreadable before the cut is left as it is, for the refusal
      [json.loads(line) for line in content[:keep].splitlines()]
    except ValueError:
      return
    try:
      with open(journal, "r+b") as f:
        f.truncate(keep)
    except OSError as e:
      raise UserError(f"{journal} ends in a record cut short, and cannot be cut back to the "
                      f"record before it ({e.strerror or e}): make it writable and run the "
                      "command again") from None
  finally:
    lock.release()
  print(f"{journal}: its last record was cut short ({len(content) - keep} bytes of a write "
        "that never finished); it is dropped, every record before it kept", flush=True)


def _unreadable_journal(journal: str, why: Exception) -> UserError:
  return UserError(
      f"{journal} is unreadable ({type(why).__name__}: {str(why).strip()[:200]}): it is the "
      "study's record of every trial, which genflax cannot rebuild. Put back a copy of it, or "
      f"start the sweep again in a new --workdir (nothing in {os.path.dirname(journal)} was "
      "changed)")


def open_study(sweep: Sweep, workdir: str):
  """The sweep's study, created on first use (every worker calls this). A storage
  that has lost it while trials/ holds its trials is refused, before anything is
  written there."""
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  store = storage(sweep, workdir)
  trials_dir = os.path.join(workdir, "trials")
  if (os.path.isdir(trials_dir) and os.listdir(trials_dir) and
      sweep.study_name not in (s.study_name for s in store.get_all_studies())):
    where = sweep.storage or os.path.join(workdir, "study.journal")
    raise UserError(
        f"{where} holds no study {sweep.study_name!r}, but {trials_dir} holds its trials: the "
        "study's record of them is lost (an emptied journal?), which genflax cannot rebuild. "
        f"Put back a copy of it, or start the sweep again in a new --workdir (nothing in "
        f"{workdir} was changed)")
  return optuna.create_study(
      storage=store, study_name=sweep.study_name, load_if_exists=True,
      direction=sweep.direction, sampler=sampler(sweep), pruner=pruner(sweep))


def sampler(sweep: Sweep):
  if sweep.sampler == "grid":
    # The same seed everywhere: every worker must shuffle the grid alike.
    return optuna.samplers.GridSampler(space.grid(sweep.spaces()), seed=sweep.seed)
  make = {"random": optuna.samplers.RandomSampler, "tpe": optuna.samplers.TPESampler}
  return PerTrialSeed(make[sweep.sampler], sweep.seed)


def pruner(sweep: Sweep):
  a = sweep.pruner_args
  if sweep.pruner == "median":
    return optuna.pruners.MedianPruner(n_startup_trials=a.get("startup_trials", 5),
                                       n_warmup_steps=a.get("warmup_steps", 0))
  if sweep.pruner == "hyperband":
    return optuna.pruners.HyperbandPruner(min_resource=a.get("min_steps", 1),
                                          max_resource=a.get("max_steps", "auto"))
  if sweep.pruner == "successive_halving":
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=a.get("min_steps", 1))
  return optuna.pruners.NopPruner()


class PerTrialSeed(optuna.samplers.BaseSampler):
  """A seeded sampler that draws trial n's values from seed + n.

  Optuna's seeded samplers draw from one random stream per process, so two
  workers started with the same seed would propose the same values. Seeding
  each trial by its number keeps a sweep reproducible and its workers apart.
  """

  def __init__(self, make, seed: int):
    self._make, self._seed, self._inner = make, seed, make(seed=seed)

  def before_trial(self, study, trial):
    self._inner = self._make(seed=self._seed + trial.number)
    self._inner.before_trial(study, trial)

  def infer_relative_search_space(self, study, trial):
    return self._inner.infer_relative_search_space(study, trial)

  def sample_relative(self, study, trial, search_space):
    return self._inner.sample_relative(study, trial, search_space)

  def sample_independent(self, study, trial, param_name, param_distribution):
    return self._inner.sample_independent(study, trial, param_name, param_distribution)

  def after_trial(self, study, trial, state, values):
    self._inner.after_trial(study, trial, state, values)


def tell(study, number: int, value=None, state=None) -> None:
  """study.tell, which with a GridSampler raises once the grid is done (optuna#5141):
  the trial is stored before that, and there is no loop here for it to stop."""
  try:
    study.tell(number, value, state=state, skip_if_finished=True)
  except RuntimeError as e:
    if "Study.stop" not in str(e):
      raise
