"""A sweep worker: claims a trial, runs it as `genflax.main`, tells the study; until none is left.

Workers agree through the study's storage and two kinds of file lock in the
sweep workdir, which all workers share (as they share the trials' checkpoints):

  sweep.lock       held while a worker claims a trial, so that counting the
                   trials and asking for a new one are one step: the trial
                   cap holds over all workers, and no grid point is asked twice.
  locks/<n>.lock   held by the worker that runs trial n. A RUNNING trial whose
                   lock is free belonged to a worker that died (kill -9, a lost
                   node): the next claim adopts it, and `genflax.main` resumes
                   it from the trial's own latest checkpoint.

A trial is `trials/<n>/`, an ordinary run directory, plus `log.txt` (the
run's output over all its attempts). Its state in the study: COMPLETE with
the metric from its results.json; PRUNED when the pruner stopped it (its
checkpoint and metrics stay); FAIL with its error line; RUNNING while it
runs or after an interruption, until a worker resumes it.
"""
import collections
import ctypes
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import filelock
import optuna
from optuna.trial import TrialState

from genflax import files
from genflax.errors import UserError
from genflax.sweep import study as sweep_study
from genflax.sweep import trial as sweep_trial

_PR_SET_PDEATHSIG = 1
try:
  _LIBC = ctypes.CDLL("libc.so.6", use_errno=True) if sys.platform == "linux" else None
except OSError:
  _LIBC = None


# ---- Splitting the machine between workers

@dataclasses.dataclass(frozen=True)
class Share:
  """What one worker's trials may use: CPU cores (empty: all) and environment settings."""
  cores: tuple = ()
  env: dict = dataclasses.field(default_factory=dict)


def shares(workers: int, cores: list[int], gpus: list[str]) -> list[Share]:
  """Splits the cores (and GPUs) into `workers` contiguous blocks, one per worker.

  With more workers than cores or GPUs they are shared round-robin, and for a
  shared GPU JAX preallocates only its fraction of the memory instead of 75%.
  One worker keeps the whole machine as it is.
  """
  if workers == 1:
    return [Share()]
  out = []
  for i in range(workers):
    mine = _block(cores, workers, i)
    env = {"OMP_NUM_THREADS": str(len(mine)), "OPENBLAS_NUM_THREADS": str(len(mine))}
    if gpus:
      gpu_ids = _block(list(range(len(gpus))), workers, i)
      env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[g] for g in gpu_ids)
      sharing = max(sum(1 for j in range(workers) if _block(list(range(len(gpus))), workers, j)
                        == gpu_ids), 1)
      if sharing > 1:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{math.floor(90 / sharing) / 100:.2f}"
    out.append(Share(tuple(mine), env))
  return out


def _block(items: list, workers: int, i: int) -> list:
  n = len(items)
  if workers >= n:
    return [items[i % n]]
  return items[i * n // workers:(i + 1) * n // workers]


def usable_cores() -> list[int]:
  if hasattr(os, "sched_getaffinity"):
    return sorted(os.sched_getaffinity(0))
  return list(range(os.cpu_count() or 1))


def visible_gpus() -> list[str]:
  """The GPUs this process may use: CUDA_VISIBLE_DEVICES, else what nvidia-smi lists."""
  if "CUDA_VISIBLE_DEVICES" in os.environ:
    return [g.strip() for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
  if not shutil.which("nvidia-smi"):
    return []
  listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
  return [str(i) for i, line in enumerate(l for l in listing.stdout.splitlines()
                                          if l.startswith("GPU "))]


def compile_cache(workdir: str) -> dict:
  """JAX's persistent compilation cache in the sweep workdir, for every program.

  Trials that differ only in values the programs take as inputs (seeds, data
  order) compile the same programs; from the second on they are read from
  the cache (benchmarks/README.md: sweeps). The environment's own setting wins.
  """
  return {"JAX_COMPILATION_CACHE_DIR": os.path.join(workdir, "jax_cache"),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def child_setup(cores=()) -> None:
  """Runs in a child before it starts: SIGTERM when its parent dies; pinned to `cores`.

  A SIGKILLed sweep cannot stop its children itself; this way each worker
  (and each trial) gets a SIGTERM, which genflax.main answers by saving a
  checkpoint and exiting.
  """
  if _LIBC is not None:
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
  if cores and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, cores)


# ---- The worker loop

@dataclasses.dataclass
class Claim:
  number: int
  trial_id: int
  params: dict
  lock: filelock.FileLock
  adopted: bool


class Stop:
  """SIGTERM, Ctrl-C or SIGUSR2 (SLURM's warning before a time limit, as submitit
  asks for it): pass SIGTERM on to the running trial, take no new one."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)

  def __init__(self):
    self.requested = False
    self.child = None
    self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

  def _handle(self, signum, frame):
    del frame, signum
    if self.requested:  # the trial has its SIGTERM already (a dying parent sends several)
      return
    self.requested = True
    if self.child is not None and self.child.poll() is None:
      self.child.send_signal(signal.SIGTERM)

  def close(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def work(workdir: str, index: int = 0, of: int = 1, split: bool = True) -> dict:
  """Runs trials of the sweep in `workdir` until none is left (or a signal).

  index/of: this worker's place among `of` workers on this machine, which
  picks its share of the cores and GPUs (`split`=False: use the whole
  allocation, as a SLURM array task does). Returns how many trials ended in
  each state.
  """
  workdir = os.path.abspath(workdir)
  sweep = sweep_study.load(workdir)
  study = sweep_study.open_study(sweep, workdir)
  share = shares(of, usable_cores(), visible_gpus())[index] if split else Share()
  name = f"worker {index}" if of > 1 else "worker"
  counts = collections.Counter()
  stop = Stop()
  try:
    while not stop.requested:
      claim = claim_trial(study, sweep, workdir)
      if claim is None:
        break
      if isinstance(claim, list):  # only trials that live workers run are left
        wait_for(workdir, claim[0], stop)
        continue
      try:
        outcome = run_trial(sweep, study, workdir, claim, share, stop, name)
      finally:
        claim.lock.release()
      counts[outcome] += 1
  finally:
    stop.close()
  return dict(counts)


def claim_trial(study, sweep, workdir: str):
  """A Claim on an abandoned RUNNING trial or a new one; a list of trials busy in
  other workers when the cap is reached; None when nothing is left."""
  with filelock.FileLock(os.path.join(workdir, "sweep.lock")):
    trials = study.get_trials(deepcopy=False)
    busy = []
    for t in trials:
      if t.state != TrialState.RUNNING:
        continue
      lock = trial_lock(workdir, t.number)
      try:
        lock.acquire(timeout=0)
      except filelock.Timeout:
        busy.append(t.number)
        continue
      return Claim(t.number, t._trial_id, suggest(optuna.Trial(study, t._trial_id), sweep),  # pylint: disable=protected-access
                   lock, adopted=True)
    if len(trials) < sweep.trials:
      trial = study.ask()
      lock = trial_lock(workdir, trial.number)
      lock.acquire(timeout=0)  # nobody else can know this number yet
      return Claim(trial.number, trial._trial_id, suggest(trial, sweep), lock, adopted=False)  # pylint: disable=protected-access
    return busy or None


def suggest(trial, sweep) -> dict:
  """The trial's value for every swept key (those it already has come back unchanged)."""
  return {key: s.suggest(trial, key) for key, s in sweep.spaces().items()}


def trial_lock(workdir: str, number: int) -> filelock.FileLock:
  os.makedirs(os.path.join(workdir, "locks"), exist_ok=True)
  return filelock.FileLock(os.path.join(workdir, "locks", f"{number}.lock"))


def wait_for(workdir: str, number: int, stop: Stop) -> None:
  """Blocks until trial `number`'s worker lets go of it (finished, or died)."""
  lock = trial_lock(workdir, number)
  while not stop.requested:
    try:
      with lock.acquire(timeout=2, poll_interval=0.5):
        return
    except filelock.Timeout:
      continue


def run_trial(sweep, study, workdir: str, claim: Claim, share: Share, stop: Stop,
              name: str) -> str:
  """Runs (or resumes) one trial to its end; tells the study; returns its outcome."""
  trial_dir = os.path.join(workdir, "trials", str(claim.number))
  os.makedirs(trial_dir, exist_ok=True)
  command = sweep.trial_command(claim.params, trial_dir)
  storage = study._storage  # pylint: disable=protected-access
  storage.set_trial_user_attr(claim.trial_id, "command", sweep_study.display(command))
  shown = " ".join(f"{k}={v}" for k, v in claim.params.items())
  print(f"{name}: trial {claim.number} {'resumed' if claim.adopted else 'started'}: {shown}",
        flush=True)
  env = {**compile_cache(workdir), **os.environ, **share.env,
         sweep_trial.ENV: json.dumps({"sweep": workdir, "number": claim.number})}
  start = time.time()
  log_path = os.path.join(trial_dir, "log.txt")
  with open(log_path, "a") as log:
    log.write(f"$ {sweep_study.display(command)}\n")
    log.flush()
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                            preexec_fn=lambda: child_setup(share.cores))
    stop.child = proc
    returncode = proc.wait()
    stop.child = None
  frozen = storage.get_trial(claim.trial_id)
  wall = frozen.user_attrs.get("wall_s", 0.0) + time.time() - start
  storage.set_trial_user_attr(claim.trial_id, "wall_s", wall)
  storage.set_trial_user_attr(claim.trial_id, "attempts", frozen.user_attrs.get("attempts", 0) + 1)
  outcome, detail = judge(sweep, study, claim, frozen, trial_dir, returncode, stop.requested)
  print(f"{name}: trial {claim.number} {outcome}{detail} ({wall:.1f} s)", flush=True)
  return outcome


def judge(sweep, study, claim: Claim, frozen, trial_dir: str, returncode: int,
          stopping: bool) -> tuple[str, str]:
  """Tells the study how the trial's run ended: (outcome, what to print after it)."""
  storage = study._storage  # pylint: disable=protected-access
  results_path = os.path.join(trial_dir, "results.json")
  if sweep_trial.PRUNED_AT in frozen.user_attrs:
    sweep_study.tell(study, claim.number, state=TrialState.PRUNED)
    return "pruned", f" at step {frozen.user_attrs[sweep_trial.PRUNED_AT]}"
  # None where missing or unreadable: the run, resumed, writes it again at its end.
  results = files.read_json(results_path) if returncode == 0 else None
  if results is not None:
    value = results.get(sweep.metric)
    if value is None:
      error = (f"results.json has no {sweep.metric!r}; it has {sorted(results)}: "
               "give one of those as --metric")
      storage.set_trial_user_attr(claim.trial_id, "error", error)
      sweep_study.tell(study, claim.number, state=TrialState.FAIL)
      raise UserError(f"trial {claim.number}: {error}")
    if not math.isfinite(value):
      storage.set_trial_user_attr(claim.trial_id, "error", f"{sweep.metric} is {value}")
      sweep_study.tell(study, claim.number, state=TrialState.FAIL)
      return "failed", f": {sweep.metric} is {value}"
    sweep_study.tell(study, claim.number, value)
    return "complete", f": {sweep.metric} {value:.6g}"
  if stopping or returncode == 0:
    # Interrupted (a signal to the sweep, or to the trial itself): it stays
    # RUNNING, and the next claim resumes it from its checkpoint.
    return "interrupted", ", checkpoint saved; it resumes when the sweep runs again"
  error = error_line(os.path.join(trial_dir, "log.txt"), returncode)
  storage.set_trial_user_attr(claim.trial_id, "error", error)
  sweep_study.tell(study, claim.number, state=TrialState.FAIL)
  return "failed", f": {error}"


def error_line(log_path: str, returncode: int) -> str:
  """What a failed run said last: its `error: ...` line, else its last line."""
  with open(log_path, errors="replace") as f:
    lines = [l.strip() for l in f.readlines()[-200:] if l.strip()]
  errors = [l[len("error: "):] for l in lines if l.startswith("error: ")]
  if errors:
    return errors[-1][:500]
  if returncode < 0:
    return f"killed by {signal.Signals(-returncode).name}"
  return (lines[-1] if lines else f"exit status {returncode}")[:500]
