"""Orbax checkpoints of the whole training state, and the workdir's identity.

A checkpoint holds two items: `state` (parameters, optimizer states, step
and RNG, as one pytree, sharded as in training) and `meta` (JSON: the data
position and which experiment wrote it). Saving is asynchronous: Orbax
copies the arrays before `save` returns, so the next step may donate them.
"""
import contextlib
import functools
import json
import logging
import os
import socket
import sys
import time
import traceback

import filelock
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from genflax import files
from genflax.errors import CheckpointError, UserError

# Config entries that define an experiment. Resuming with others changed
# (more steps, another log interval) is fine; with these changed, the
# checkpoints would belong to something else.
IDENTITY_KEYS = ("task", "model", "data.name")
# ...except these, which change how the same model is computed, not what.
NOT_IDENTITY = ("model.dense_grads", "model.attention", "model.conv", "model.dtype",
                "model.remat")


class _QuietOrbax(logging.Filter):
  """Orbax logs a failed background save as several tracebacks from its threads;
  genflax reports it once, in one line (CheckpointError), so those are dropped,
  and so are its warnings that a read-only manager (genflax.sample's) is read-only
  and that genflax's array handler replaced its default one."""

  def filter(self, record):
    if f"{os.sep}orbax{os.sep}" not in record.pathname:
      return True
    if record.levelno >= logging.ERROR:
      return False
    if "Type handler registry" in record.getMessage():  # _write_replicas_whole
      return False
    return "read only" not in record.getMessage() and "read_only" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietOrbax())


class _QuietOrbaxTasks(logging.Filter):
  """An unreadable checkpoint also leaves Orbax coroutines whose exception nobody
  retrieves; asyncio logs each with its traceback. genflax names the checkpoint."""

  def filter(self, record):
    if "exception was never retrieved" not in record.getMessage() or not record.exc_info:
      return True
    frames = traceback.extract_tb(record.exc_info[2])
    return not any(f"{os.sep}orbax{os.sep}" in f.filename for f in frames)


logging.getLogger("asyncio").addFilter(_QuietOrbaxTasks())


@functools.cache
def _write_replicas_whole(processes: int) -> None:
  """Within one process, a replicated array is written from one device.
  Orbax's replica-parallel save (on by default on CPU) has each replica write a
  slice, which compiles a slicing program per array and device: about 10 s of
  a run's first save with 8 CPU devices. It pays only where several hosts
  share the writing, so it stays on there."""
  try:  # Orbax's default store of array metadata, kept as in its own handler
    from orbax.checkpoint._src.metadata import array_metadata_store  # pylint: disable=g-import-not-at-top
  except ImportError:  # moved in a later Orbax: its default handler stays
    return
  ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
      use_replica_parallel=processes > 1,
      array_metadata_store=array_metadata_store.Store()), override=True)


def manager(workdir: str, keep: int | None = None, read_only: bool = False
            ) -> ocp.CheckpointManager:
  _write_replicas_whole(jax.process_count())
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=not read_only, read_only=read_only,
      enable_async_checkpointing=True,
      cleanup_tmp_directories=not read_only)  # a save that a kill cut short
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"), options=options,
      item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
  """Starts saving `step` in the background, once the previous save went well."""
  check(mngr)
  try:
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True)
  except Exception as e:  # pylint: disable=broad-except  # Orbax's or the OS's
    raise failed(mngr, e) from None


def check(mngr: ocp.CheckpointManager) -> None:
  """Raises CheckpointError if a background save has failed."""
  try:
    mngr.check_for_errors()
  except Exception as e:  # pylint: disable=broad-except
    raise failed(mngr, e) from None


def wait(mngr: ocp.CheckpointManager) -> None:
  """Waits for the saves in flight to commit; CheckpointError if one failed."""
  try:
    mngr.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise failed(mngr, e) from None


def failed(mngr, error: Exception) -> CheckpointError:
  reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
  return CheckpointError(
      f"saving a checkpoint in {mngr.directory} failed ({type(error).__name__}: {reason}); "
      f"{newest(mngr.directory)}. Make room or make the directory writable, then run the "
      "same command to resume from there.")


def committed(directory) -> list[int]:
  """The steps whose checkpoints are complete in `directory` (Orbax renames a
  checkpoint into its step's name only once every file is written)."""
  directory = str(directory)
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory)
                if d.isdigit() and os.path.isdir(os.path.join(directory, d)))


def newest(directory) -> str:
  """Says which checkpoint a rerun would resume from."""
  steps = committed(directory)
  if not steps:
    return f"no checkpoint has been saved yet in {directory}"
  return f"the newest complete checkpoint is step {steps[-1]} in {directory}"


UNREADABLE = ".unreadable"  # the suffix of a checkpoint set aside


def restore(mngr: ocp.CheckpointManager, abstract_state, log=print, primary: bool = True):
  """The newest readable (state, meta), laid out like `abstract_state`; None if
  the run has no checkpoint yet. `abstract_state` may be a function of the
  checkpoint's meta, for checkpoints whose layout depends on how they were
  written (the trainer's optimizer layouts).

  A checkpoint that fails to restore (a cut file, lost metadata) is named in
  one line and, unless `mngr` is read-only, set aside as <step>.unreadable
  (kept, not deleted; by the `primary` process of several); the next newest
  is tried. With checkpoints but none readable, a UserError says how to
  start afresh.
  """
  directory = str(mngr.directory)
  unreadable = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      target = abstract_state
      if callable(abstract_state):
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        target = abstract_state(meta)
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
      problem = None
    except Exception as e:  # pylint: disable=broad-except  # whatever a damaged file raises
      reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
      problem = f"{type(e).__name__}: {reason}"
    problem = _agreed_problem(problem)  # every process takes the same step, or none
    if problem is None:
      return restored.state, restored.meta
    unreadable.append(step)
    if mngr._options.read_only:  # pylint: disable=protected-access
      log(f"checkpoint {step} in {directory} is unreadable ({problem}); trying the one before")
      continue
    aside = os.path.join(directory, f"{step}{UNREADABLE}")
    if primary:
      os.replace(os.path.join(directory, str(step)), aside)
    _barrier(f"set aside {step}")  # the others list the directory after the move
    mngr.reload()
    log(f"checkpoint {step} in {directory} is unreadable ({problem}); set aside as {aside}, "
        "trying the one before")
  set_aside = [d for d in os.listdir(directory) if d.endswith(UNREADABLE)] if os.path.isdir(
      directory) else []
  if unreadable or set_aside:
    raise UserError(f"no readable checkpoint in {directory} (unreadable: "
                    f"{', '.join(sorted(set_aside) or map(str, unreadable))}); to start this run "
                    f"afresh, move {directory} away (or delete it)")
  return None


def _agreed_problem(problem: str | None) -> str | None:
  """With several processes: a step unreadable on any of them is unreadable
  for all (each may read other files of it), named by the first that failed."""
  if jax.process_count() == 1:
    return problem
  failed = multihost_utils.process_allgather(np.int32(problem is not None))
  if problem is None and failed.any():
    return f"unreadable on process {int(np.flatnonzero(failed)[0])}"
  return problem


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"genflax checkpoints: {name}")


def _quiet_closed_loop_callbacks() -> None:
  """After a failed save or restore, TensorStore's threads call back into Orbax's
  closed event loop, and Orbax's abandoned read coroutines are collected with
  their exception still set; Python prints each as an "unraisable" traceback:
  dozens of them, where genflax says in one line what happened."""
  previous = sys.unraisablehook

  def hook(unraisable):
    error = unraisable.exc_value
    closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
    frames = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback else []
    if not (closed_loop or any(f"{os.sep}orbax{os.sep}" in f.filename for f in frames)):
      previous(unraisable)

  sys.unraisablehook = hook


_quiet_closed_loop_callbacks()


def identity(config: dict) -> dict:
  """The IDENTITY_KEYS entries of a config (as a JSON dict), flat: {"model.arch": ...}."""
  out = {}

  def add(key, value):
    if isinstance(value, dict):
      for k, v in value.items():
        add(f"{key}.{k}", v)
    else:
      out[key] = value

  for key in IDENTITY_KEYS:
    value = config
    for part in key.split("."):
      value = value.get(part) if isinstance(value, dict) else None
    add(key, value)
  return {k: v for k, v in out.items() if k not in NOT_IDENTITY}


def check_workdir(workdir: str, config, latest_step: int | None, log=print) -> None:
  """Refuses a workdir whose checkpoints another experiment wrote. Its config.json
  says which; where that file is unreadable, the newest checkpoint's metadata
  (every save names its experiment), and config.json is then written again."""
  path = os.path.join(workdir, "config.json")
  if latest_step is None or not os.path.exists(path):
    return
  saved = files.read_json(path)
  readable = saved is not None and "task" in saved
  if readable:
    theirs = identity(saved)
  else:
    meta = files.read_json(os.path.join(workdir, "checkpoints", str(latest_step), "meta",
                                          "metadata")) or {}
    theirs = {k: v for k, v in meta.items()
              if any(k == key or k.startswith(key + ".") for key in IDENTITY_KEYS)}
    if "task" not in theirs:
      raise UserError(f"{path} is unreadable, and checkpoint {latest_step} does not say which "
                      f"experiment wrote it: put back the run's config.json, or move {workdir} "
                      "away to start afresh")
  ours = identity(json.loads(config.to_json_best_effort()))
  diffs = [f"{k}={theirs.get(k)!r} there, {ours.get(k)!r} here"
           for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
  if diffs:
    raise UserError(
        f"workdir {workdir} holds checkpoints (latest step {latest_step}) of another "
        f"experiment ({'; '.join(diffs)}). Use a new --workdir, or delete "
        f"{workdir} to start this one there.")
  if not readable:
    log(f"{path} is unreadable: checkpoint {latest_step} names this experiment, so it is "
        "written again from this command's config")


def write_config(workdir: str, config) -> None:
  text = config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
  files.write_atomically(os.path.join(workdir, "config.json"), lambda f: f.write(text.encode()))


def prepare_workdir(workdir: str) -> None:
  """Creates the workdir and its checkpoints/ and checks that both take files,
  before any work: a save that cannot be written must not be found out later."""
  for d in (workdir, os.path.join(workdir, "checkpoints")):
    if os.path.exists(d) and not os.path.isdir(d):
      raise UserError(f"{d} is a file, not a directory: move it away or give another --workdir")
    try:
      os.makedirs(d, exist_ok=True)
      probe = os.path.join(d, f".write_test.{os.getpid()}")
      with open(probe, "w") as f:
        f.write("ok")
      os.remove(probe)
    except OSError as e:
      raise UserError(f"cannot write to {d} ({e.strerror or e}); give a writable --workdir") from None


@contextlib.contextmanager
def run_lock(workdir: str, holder: bool = True):
  """Holds WORKDIR/run.lock while a run trains there, so that a second run in the
  same workdir is refused; the kernel frees the lock of a process that died.

  holder: whether this process takes the lock (process 0 of a multi-process
  run does, for all of them).
  """
  if not holder:
    yield
    return
  lock = filelock.FileLock(os.path.join(workdir, "run.lock"))
  owner = os.path.join(workdir, "run.owner")
  try:
    lock.acquire(timeout=0)
  except filelock.Timeout:
    who = files.read_json(owner) or {}  # {} while it is written, or if it is damaged
    who = (f"process {who['pid']} on {who['host']}, since {who['since']}"
           if {"pid", "host", "since"} <= set(who) else "a process that has not said who it is yet")
    raise UserError(f"workdir {workdir} is in use by another run ({who}); wait for it to "
                    "end, or stop it, then run this again") from None
  try:
    files.write_json(owner, {"pid": os.getpid(), "host": socket.gethostname(),
                               "since": time.strftime("%Y-%m-%d %H:%M:%S")})
    yield
  finally:
    lock.release()
