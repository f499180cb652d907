"""The one training loop that every family runs.

A family is a module in `genflax.tasks` (named by `config.task`) with:

  check(config)                           its config values, before any work (ConfigError);
                                           genflax/checks.py has the shared sections
  datasets(config, workdir) -> (train, test, info)  {name: [N, ...]} numpy, one
                                           row per example; info describes them
                                           (`info.crops`, optional: data.Batches')
  build(config, info) -> setup            static parts (modules, optimizers) and
                                           `setup.config`
  init(setup, rng) -> state               a pytree (params, optimizer states, ...)
  train_step(setup, state, batch, rng) -> (state, metrics)     pure, jitted here
  eval_step(setup, state, batch, rng, final) -> {name: [B]}    per-example values,
                                           averaged here over the whole test split
  or evaluate(setup, state, test, rng, final, parts) -> {name: float}  for
                                           set-level metrics (FID); the family jits its
                                           parts, each through parts(name, compute)
                                           at the end (evaluation.Parts)
  samples(setup, state, batch, rng) -> pytree    pure, jitted here; `batch` is the
                                           first eval.num_samples test examples
  write_samples(setup, samples, writer, step)   on the host: PNGs, text
  learning_rates(setup, step) -> {name: lr}   the rates update `step` (from 0) used
  generate(setup, state, args)            `python -m genflax.sample`: writes samples
  GRAD_ALLREDUCES, decay_mask             optional: the train.grad_allreduce values its
                                           step supports (all by default), and the
                                           adamw mask it gives optim.init

The loop wraps the family's state as {"step", "rng", "task"}; the step's RNG
is `fold_in(rng, step)`, so a batch (`Batches.get(step)`) and its randomness
depend only on the step, and a resumed run repeats an uninterrupted one.

`_train` reads as its sections, each a function below it in the order it runs:
`_start` (the checkpoint manager, the workdir's checks, `build`, the state
restored or created), `_train_loop` (`_steps`: each `_step`, logged by
`_log_train`, checkpointed by `_save`, evaluated by the function that
`_evaluator` compiles; the saves waited for on every way out) and `_end`
(pruned, stopped, or the final evaluation, kept part by part, and results.json).
"""
import collections
import dataclasses
import importlib
import json
import os
import signal
import time
import types
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from genflax import (checkpoints, checks, data, evaluation, files, metrics, optim, platform,
                     sharding, tasks)
from genflax.errors import ConfigError, UserError

PARTS_FILE = "final_parts.json"  # the final evaluation's finished parts (evaluation.Parts)


class NonFiniteLoss(UserError):
  """A loss term became NaN or infinite; nothing after the last good step is saved."""


def load_task(name: str):
  """The family module genflax.tasks.<name>."""
  try:
    return importlib.import_module(f"genflax.tasks.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"genflax.tasks.{name}":
      raise
    here = os.path.join(os.path.dirname(__file__), "tasks")
    known = sorted(f[:-3] for f in os.listdir(here) if f.endswith(".py") and "_" not in f)
    raise ConfigError(f"task={name!r}: there is no genflax/tasks/{name}.py; "
                      f"expected one of {known}") from None


def check_step(config, mesh) -> None:
  """The step's settings fit the mesh: data.batch_size splits into
  train.microbatches pieces that each split over it; train.grad_allreduce."""
  optim.check_grad_allreduce(config.train, mesh)
  b, m = config.data.batch_size, config.train.microbatches  # m divides b (genflax/checks.py)
  key = "data.batch_size" if m == 1 else f"data.batch_size / train.microbatches = {b} / {m}"
  sharding.check_batch_size(mesh, key, b // m)


def train(config, workdir: str, on_eval: Callable | None = None) -> dict:
  """Trains (or resumes) `config` in `workdir`; returns the final evaluation.

  on_eval(step, values) -> bool, if given, sees every evaluation before the
  last (on process 0) and returns True to stop the run there, checkpointed:
  a sweep's pruner (genflax/sweep/trial.py).
  """
  task = load_task(config.task)
  checks.config(config, task)  # every value, before any work
  mesh = sharding.make_mesh(config.mesh)
  check_step(config, mesh)
  sharding.check_batch_size(mesh, "eval.batch_size", config.eval.batch_size)
  if jax.process_index() == 0:
    checkpoints.prepare_workdir(workdir)
  with checkpoints.run_lock(workdir, holder=jax.process_index() == 0):
    return _train(config, workdir, on_eval, task, mesh)


def _train(config, workdir: str, on_eval, task, mesh) -> dict:
  """`train` under the workdir's lock; its sections are the functions below."""
  log = print if jax.process_index() == 0 else (lambda *a, **k: None)

  # ---- Start or resume
  mngr, run, state, resumed_step = _start(config, workdir, task, mesh, log)
  step = 0 if resumed_step is None else resumed_step
  results_path = os.path.join(workdir, "results.json")
  if step >= config.train.num_steps and os.path.exists(results_path):
    results = files.read_json(results_path)
    if results is not None:
      log(f"already trained to step {step}; results in {results_path}")
      return results
    log(f"{results_path} is unreadable: the final evaluation runs again to write it")
  writer = metrics.Writer(workdir, resume_step=resumed_step)
  evaluate = _evaluator(config, run, mesh, writer, log, workdir)
  experiment = checkpoints.identity(json.loads(config.to_json_best_effort()))
  loop = _Loop(config, run, mngr, writer, log, evaluate, experiment, state, step)
  if (resumed_step is not None and 0 < step < config.train.num_steps
      and step % config.train.eval_every_steps == 0
      and agree((step, "eval") not in writer.logged)):  # process 0 writes the history
    evaluate(state, step)  # the interrupted run saved this step but did not finish its eval

  # ---- Train loop
  stop = StopRequest(mesh)
  profile = Profiler(config.train.profile_steps, os.path.join(workdir, "profile"), log)
  pruned = _train_loop(loop, stop, profile, on_eval)

  # ---- The way out: pruned, stopped, or the final evaluation
  return _end(loop, pruned, stop.reason, results_path)


def _start(config, workdir: str, task, mesh, log):
  """(mngr, run, state, resumed_step): the workdir's checkpoint manager, the
  built run, and its state restored from the newest checkpoint (at
  resumed_step) or, without one, created (resumed_step None)."""
  # ---- Checkpoints and the workdir's experiment
  mngr = checkpoints.manager(workdir, config.train.keep_checkpoints)
  checkpoints.check_workdir(workdir, config, mngr.latest_step(), log)
  if jax.process_index() == 0:
    checkpoints.write_config(workdir, config)

  # ---- Data, the family's setup, the state's layout, the compiled step
  run = build(config, workdir, task, mesh)

  # ---- State: created (or restored) straight into its shardings
  restored = restore(mngr, run, mesh, log, primary=jax.process_index() == 0)
  if restored is None:
    state = tasks.run_once(run.init, *tasks.run_keys(config.seed), out_shardings=run.state_sh)
    resumed_step = None
  else:
    state, meta = restored
    resumed_step = int(meta["step"])
    log(f"resumed from step {resumed_step} ({os.path.join(workdir, 'checkpoints')})")
  log(describe(config, run.info, mesh, state))
  if run.auto:
    log(f"auto: {platform.describe(run.auto)}")
  log(f"batches {run.feed}")
  return mngr, run, state, resumed_step


@dataclasses.dataclass
class _Loop:
  """What the training loop's functions share: the run and where it writes,
  then what changes as it trains."""
  config: ml_collections.ConfigDict  # as given (run.setup.config has its `auto` values chosen)
  run: "Run"
  mngr: object               # checkpoints.manager's
  writer: metrics.Writer
  log: Callable
  evaluate: Callable         # (state, step, final=False) -> values (`_evaluator`)
  experiment: dict           # checkpoints.identity of the config, in every save's metadata
  state: dict
  step: int
  # (step, device metrics) not yet fetched to the host
  pending: list = dataclasses.field(default_factory=list)
  saved_step: int = 0        # the newest checkpoint's step (restored or saved)
  last_log_time: float = 0.  # the steps/s clock: when and at which step it last logged
  last_log_step: int = 0


def _evaluator(config, run: "Run", mesh, writer, log, workdir: str) -> Callable:
  """evaluate(state, step, final=False) -> values: the compiled evaluation of the
  whole test split and the samples, written out and logged. The final evaluation keeps
  its finished parts in workdir/final_parts.json (evaluation.Parts) until results.json
  holds them all."""
  task, setup, test_data = run.task, run.setup, run.test_data
  eval_step = jax.jit(lambda s, b, r, final: task.eval_step(setup, s["task"], b, r, final),
                      static_argnums=3)
  samples_fn = jax.jit(lambda s, b, r: task.samples(setup, s["task"], b, r))
  eval_rng = jax.random.PRNGKey(config.seed + 1)  # the same samples at every eval
  sample_batch = {k: v[:config.eval.num_samples] for k, v in test_data.items()}
  repl = sharding.replicated(mesh)

  def evaluate(state, step, final=False):
    if hasattr(task, "evaluate"):
      parts = None
      if final:
        key = {"step": step, "config": json.loads(config.to_json_best_effort())}
        parts = evaluation.Parts(os.path.join(workdir, PARTS_FILE), key,
                                 write=jax.process_index() == 0, log=log)
      values = task.evaluate(setup, state["task"], test_data, eval_rng, final, parts)
    else:
      values = evaluation.split_means(eval_step, state, test_data, config.eval.batch_size,
                                      run.feed.batch_sharding, eval_rng, final)
    writer.scalars(step, "final" if final else "eval", values)
    log(f"{'final eval' if final else 'eval'} step {step}  {metrics.format_values(values)}")
    samples = samples_fn(state, sharding.put_batch(sample_batch, repl), eval_rng)
    # Every device runs a replicated program, but device_get reads one of them: wait
    # for all, or the next step's all-reduce waits on a device still sampling.
    jax.block_until_ready(samples)
    task.write_samples(setup, jax.device_get(samples), writer, step)
    writer.flush()
    return values

  return evaluate


def _train_loop(loop: _Loop, stop, profile, on_eval) -> bool:
  """The step loop, then a checkpoint of its last step; True if the sweep's
  pruner stopped it. Every way out waits for the saves in flight."""
  try:
    try:
      pruned = _steps(loop, stop, profile, on_eval)
    finally:
      profile(loop.step, loop.state, last=True)
    check_finite(loop.pending)
    if loop.saved_step != loop.step:
      _save(loop)
  except NonFiniteLoss as e:
    checkpoints.wait(loop.mngr)
    raise NonFiniteLoss(f"{e} {checkpoints.newest(loop.mngr.directory)}. Lower the learning rate "
                        "(optim*.lr) or lengthen its warmup, then rerun.") from None
  finally:
    try:
      checkpoints.wait(loop.mngr)  # every way out commits the saves in flight
    finally:
      stop.close()  # a SIGTERM until here stops nothing twice: the save runs to its end
  return pruned


def _steps(loop: _Loop, stop, profile, on_eval) -> bool:
  """Trains, logs, checkpoints and evaluates until train.num_steps or a stop
  request; True if the sweep's pruner stopped it after an evaluation."""
  train = loop.config.train
  loop.last_log_time, loop.last_log_step, loop.saved_step = time.time(), loop.step, loop.step
  first_step = loop.step + 1
  while loop.step < train.num_steps and not stop.agreed(loop.step):
    profile(loop.step, loop.state)
    _step(loop, stop)
    if loop.step == first_step:  # Time the compilation apart from the steps/s.
      jax.block_until_ready(loop.state)
      loop.log(f"step {loop.step}: train step compiled and ran in "
               f"{time.time() - loop.last_log_time:.1f}s")
      loop.last_log_time, loop.last_log_step = time.time(), loop.step
    if loop.step % train.log_every_steps == 0 or loop.step == train.num_steps:
      _log_train(loop)
    paused = time.time()
    if loop.step % train.ckpt_every_steps == 0:
      check_finite(loop.pending)
      _save(loop)
    if loop.step % train.eval_every_steps == 0 and loop.step < train.num_steps:
      values = loop.evaluate(loop.state, loop.step)
      if on_eval is not None and agree(jax.process_index() == 0 and on_eval(loop.step, values)):
        return True
    loop.last_log_time += time.time() - paused  # steps/s counts training only
  return False


def _step(loop: _Loop, stop) -> None:
  """Queues one train step; its metrics join loop.pending (its signals go to `stop`)."""
  inputs = loop.run.feed.inputs(loop.step)
  signals = stop.signals()
  with jax.transfer_guard("disallow"):  # an implicit host<->device copy is a bug
    if signals is None:
      loop.state, step_metrics = loop.run.train_step(loop.state, inputs)
    else:
      loop.state, step_metrics = loop.run.signalled_step(loop.state, inputs, signals)
      stop.sent(step_metrics.pop(SIGNALS))
  # At most two steps in flight: the host waits for the previous step before
  # it queues another. A deeper queue gains nothing once the devices are
  # busy, and with several CPU devices in one process it can starve XLA's
  # thread pool until an all-reduce waits forever for a device that never
  # runs (seen with 2 devices on 2 cores within a few hundred steps).
  if loop.pending:
    jax.block_until_ready(loop.pending[-1][1])
  loop.step += 1
  loop.pending.append((loop.step, step_metrics))
  checkpoints.check(loop.mngr)  # a background save that failed stops the run here (~1 us)


def _log_train(loop: _Loop) -> None:
  """Writes and logs the means of the pending steps' metrics (raising on a
  non-finite one), the learning rates, steps/s and the ETA."""
  config, step = loop.config, loop.step
  values = check_finite(loop.pending)
  now = time.time()
  values.update(loop.run.task.learning_rates(loop.run.setup, step - 1))  # of the step just logged
  eta = ""
  if step > loop.last_log_step:  # not the first step, whose time is the compilation's
    rate = (step - loop.last_log_step) / max(now - loop.last_log_time, 1e-9)
    values.update(steps_per_s=rate, examples_per_s=rate * config.data.batch_size)
    eta = f"  ETA {metrics.format_duration((config.train.num_steps - step) / rate)}"
  loop.writer.scalars(step, "train", values)
  loop.log(f"step {step}/{config.train.num_steps}  {metrics.format_values(values)}{eta}")
  loop.pending, loop.last_log_time, loop.last_log_step = [], now, step


def _save(loop: _Loop) -> None:
  """Starts a background save of the state at loop.step."""
  checkpoints.save(loop.mngr, loop.step, loop.state,
                   {"step": loop.step, "data_position": loop.step,
                    "opt_layout": optim.layout(loop.run.setup.config.train), **loop.experiment})
  loop.saved_step = loop.step


def _end(loop: _Loop, pruned: bool, stop_reason, results_path: str) -> dict:
  """What train returns: where the pruner or a stop request stopped the run,
  or the final evaluation (also written to results.json)."""
  step, traces = loop.step, loop.run.traces[0]
  if traces > 1:
    loop.log(f"warning: the train step was compiled {traces} times (expected once)")
  if pruned:
    loop.log(f"stopped at step {step} by the sweep's pruner; checkpoint saved.")
    loop.writer.close()
    return {"pruned_at": step, "train_step_traces": traces}
  if step < loop.config.train.num_steps:
    loop.log(f"stopped by {stop_reason} at step {step}; checkpoint saved. "
             f"Run the same command to resume.")
    loop.writer.close()
    return {"interrupted_at": step, "train_step_traces": traces}
  results = loop.evaluate(loop.state, step, final=True)
  results.update(step=step, num_params=num_params(loop.state), train_step_traces=traces)
  if jax.process_index() == 0:
    files.write_json(results_path, results)
    parts = os.path.join(os.path.dirname(results_path), PARTS_FILE)
    if os.path.exists(parts):  # results.json holds every part now
      os.remove(parts)
  loop.writer.close()
  loop.mngr.close()
  return results


@dataclasses.dataclass(frozen=True)
class Run:
  """What a config builds before its first step (`build`)."""
  task: types.ModuleType
  setup: object            # task.build's
  info: object             # task.datasets's
  feed: data.Feed          # the training batches, on the devices or from the host
  test_data: dict
  init: Callable           # tasks.run_keys(seed) -> the trainer's state (plain arrays)
  abstract: object         # its shapes, dtypes and shardings (what Orbax restores into)
  state_sh: object         # its shardings
  train_step: Callable     # (state, feed.inputs(step)) -> (state, metrics), jitted
  signalled_step: Callable  # the same with StopRequest's signals (several processes)
  traces: list             # traces[0]: how often either was compiled
  auto: dict               # what the config's `auto` values became here (platform.choices)


def build(config, workdir: str, task=None, mesh=None) -> Run:
  """The data, the family's setup, the state's layout and the compiled train
  step of `config`: what `train` runs, and what benchmarks/ time."""
  task = task or load_task(config.task)
  checks.config(config, task)
  mesh = mesh or sharding.make_mesh(config.mesh)
  check_step(config, mesh)
  train_data, test_data, info = task.datasets(config, workdir)
  config, auto = resolve(config, task, info, mesh)
  check_step(config, mesh)
  batches = data.Batches(train_data, config.data.batch_size, config.seed,
                         crops=getattr(info, "crops", None))
  setup = task.build(config, info)
  feed = data.Feed(batches, sharding.batch_sharding(mesh), config.data.on_device_mb)
  init, abstract, state_sh = state_layout(task, setup, mesh)
  train_step, signalled_step, traces = make_train_step(task, setup, state_sh, feed)
  return Run(task, setup, info, feed, test_data, init, abstract, state_sh, train_step,
             signalled_step, traces, auto)


def resolve(config, task, info, mesh):
  """(config with its `auto` values chosen for this backend and mesh, the choices).

  train.grad_allreduce's and model.dtype's choices depend on the model's size,
  counted from the shapes of a provisional state (genflax/platform.py).
  """
  backend, shape = jax.default_backend(), dict(mesh.shape)
  allowed = getattr(task, "GRAD_ALLREDUCES", optim.GRAD_ALLREDUCES)
  image_hw = tuple(info.image_shape[:2]) if getattr(info, "image_shape", None) else (0, 0)
  bf16_units = platform.bf16_units_here(config)
  values = platform.choices(config, backend, shape, 0, allowed, image_hw, bf16_units)
  if (values.get("train.grad_allreduce", "per_param") != "per_param"
      or config.model.get("dtype") == "auto"):
    provisional = task.build(platform.resolve(config, {**values,  # model.dtype: float32
                                                       "train.grad_allreduce": "per_param"}), info)
    shapes = jax.eval_shape(lambda key: task.init(provisional, key), jax.random.PRNGKey(0))
    values = platform.choices(config, backend, shape, platform.count(shapes["params"]), allowed,
                              image_hw, bf16_units)
  return (platform.resolve(config, values) if values else config), values


def restore(mngr, run: Run, mesh, log=print, primary: bool = True):
  """checkpoints.restore of the run's state, from a checkpoint of either optimizer
  layout: one written under another train.grad_allreduce (another device count
  resolves `auto` differently) is read in its own layout and converted."""
  ours = optim.layout(run.setup.config.train)

  def target(meta):
    theirs = meta.get("opt_layout", ours)
    if theirs == ours:
      return run.abstract
    how = "reduce_scatter" if theirs == "flat" else "per_param"
    setup = run.task.build(platform.resolve(run.setup.config, {"train.grad_allreduce": how}),
                           run.info)
    # Flat vectors whole on every device: this mesh's batch shards may not divide them.
    return state_layout(run.task, setup, mesh, split_optimizer=False)[1]

  restored = checkpoints.restore(mngr, target, log, primary)
  if restored is None or restored[1].get("opt_layout", ours) == ours:
    return restored
  state, meta = restored
  decay_mask = getattr(run.task, "decay_mask", None)

  def convert(state):
    task_state = dict(state["task"])
    task_state["opt_state"] = optim.relayout(task_state["opt_state"], task_state["params"],
                                             decay_mask)
    return {**state, "task": task_state}

  log(f"checkpoint {meta['step']}: optimizer state converted from the {meta['opt_layout']} "
      f"layout to the {ours} one (train.grad_allreduce={run.setup.config.train.grad_allreduce})")
  return jax.jit(convert, out_shardings=run.state_sh)(state), meta


def make_train_step(task, setup, state_sh, feed: data.Feed):
  """The family's step as the loop runs it: jitted, sharded, state donated.

  train_step(state, feed.inputs(step)) -> (state, metrics): the batch comes
  from the feed (sent by the host, or gathered on the devices).
  signalled_step(state, inputs, signals) is the same step carrying
  StopRequest's signals (one row per device): its metrics hold their sum over
  the devices as SIGNALS, which the compiler adds to the step's own
  all-reduce of gradients and metrics, so several processes learn of a
  preemption with no collective of its own (tested).
  Returns (train_step, signalled_step, traces); traces[0] counts how often
  either was compiled.
  """
  traces = [0]

  def step_fn(state, inputs, signals=None):
    traces[0] += 1  # Python runs this only while tracing: counts compilations.
    batch = feed.batch(inputs, state["step"])
    rng = jax.random.fold_in(state["rng"], state["step"])
    task_state, step_metrics = task.train_step(setup, state["task"], batch, rng)
    if signals is not None:
      step_metrics = {**step_metrics, SIGNALS: jnp.sum(signals, axis=0)}
    return {"step": state["step"] + 1, "rng": state["rng"], "task": task_state}, step_metrics

  mesh = feed.batch_sharding.mesh
  out_shardings = (state_sh, sharding.replicated(mesh))
  plain = jax.jit(step_fn, in_shardings=(state_sh, feed.shardings),
                  out_shardings=out_shardings, donate_argnums=0)
  signalled = jax.jit(step_fn, in_shardings=(state_sh, feed.shardings, signals_sharding(mesh)),
                      out_shardings=out_shardings, donate_argnums=0)
  return plain, signalled, traces


SIGNALS = "signals"  # the signalled step's metric: the signal each process received (0: none)


def signals_sharding(mesh) -> NamedSharding:
  """StopRequest's signals: [devices, processes], a row on each device."""
  return NamedSharding(mesh, P(mesh.axis_names))


def state_layout(task, setup, mesh, split_optimizer: bool = True):
  """(init, abstract, shardings) of the trainer's state, without creating it.

  init(init_key, train_key) -> {"step", "rng", "task"} with plain arrays (a run
  gives it `tasks.run_keys(config.seed)`); abstract: its shapes, dtypes and
  shardings (what Orbax restores into).
  """
  def boxed_init(init_key, train_key):
    return {"step": jnp.zeros((), jnp.int32), "rng": train_key,
            "task": task.init(setup, init_key)}

  boxed = jax.eval_shape(boxed_init, *tasks.run_keys(0))
  shardings = sharding.state_shardings(boxed, mesh, setup.config.sharding_rules, split_optimizer)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.unbox(boxed), shardings)
  return (lambda *keys: nn.unbox(boxed_init(*keys))), abstract, shardings


def load_run(workdir: str):
  """(task, setup, state, step) of a workdir's latest checkpoint."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise UserError(f"{workdir} is not a genflax run: it has no config.json")
  saved = files.read_json(path)
  if saved is None or "task" not in saved:
    raise UserError(f"{path} is unreadable: run the command that trained {workdir} again, "
                    "which writes it again (and resumes the run, or says it is finished)")
  config = ml_collections.ConfigDict(saved)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1  # one device suffices
  task = load_task(config.task)
  mesh = sharding.make_mesh(config.mesh)
  _, _, info = task.datasets(config, workdir)
  config, auto = resolve(config, task, info, mesh)
  setup = task.build(config, info)
  init, abstract, state_sh = state_layout(task, setup, mesh)
  run = Run(task, setup, info, None, {}, init, abstract, state_sh, None, None, [0], auto)
  mngr = checkpoints.manager(workdir, read_only=True)
  restored = restore(mngr, run, mesh)
  if restored is None:
    raise UserError(f"{workdir} has no checkpoint yet: train it first")
  state, meta = restored
  return task, setup, state["task"], int(meta["step"])


def check_finite(pending) -> dict:
  """Fetches pending step metrics; raises on the first non-finite one; returns means."""
  fetched = jax.device_get(pending)
  for step, values in fetched:
    bad = {k: float(v) for k, v in values.items() if not np.isfinite(v)}
    if bad:
      raise NonFiniteLoss(
          f"non-finite {', '.join(f'{k}={v}' for k, v in bad.items())} at step {step}; "
          f"stopped without saving it;")
  if not fetched:
    return {}
  return {k: float(np.mean([v[k] for _, v in fetched])) for k in fetched[0][1]}


class Profiler:
  """Captures a jax.profiler trace of steps [start, stop) into `logdir` (TensorBoard/Perfetto)."""

  def __init__(self, steps, logdir: str, log):
    self.start, self.stop = (tuple(steps) + (0, 0))[:2]
    self.logdir, self.log, self.active = logdir, log, False

  def __call__(self, step: int, state, last: bool = False) -> None:
    if step == self.start and self.stop > self.start and not self.active and not last:
      jax.profiler.start_trace(self.logdir)
      self.active = True
    elif self.active and (step >= self.stop or last):
      jax.block_until_ready(state)  # the traced steps must have finished
      jax.profiler.stop_trace()
      self.active = False
      self.log(f"profile of steps {self.start}-{step} written to {self.logdir}")


class StopRequest:
  """Turns SIGTERM and Ctrl-C into a request to checkpoint and stop cleanly.

  One process stops at the next step. Several processes must stop at the
  same step (saving a checkpoint is collective), and a preemption may reach
  only some of them: each step carries every process's received signal (0
  for none) as an input, summed over the devices inside the step's own
  all-reduce (make_train_step), and each process reads the sums of the step
  before the last, which has finished by then. Every process reads the same
  values at the same step, so all stop together, two or three steps after
  the signal reached any of them, with no collective or host round trip of
  their own.
  """

  def __init__(self, mesh=None):
    self.signal = None   # the signal this process received (a signal.Signals)
    self.reason = None   # why the run stops, once agreed
    self.step = 0        # the step agreed() last saw
    self._received_at = None  # the step at which the signal came, until said
    self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
    self._several = jax.process_count() > 1
    if self._several:
      self._sharding = signals_sharding(mesh)
      self._local = {}    # signal number -> the step's input array, made once
      self._sent = collections.deque(maxlen=2)  # the signals of the last two steps queued

  def signals(self):
    """The next step's input: this process's signal in its column, on its first
    device's row (zeros elsewhere); None on one process, which needs none."""
    if not self._several:
      return None
    value = int(self.signal or 0)
    if value not in self._local:
      devices = sorted(self._sharding.addressable_devices, key=lambda d: d.id)
      rows = np.zeros((len(devices), 1, jax.process_count()), np.float32)
      rows[0, 0, jax.process_index()] = value
      self._local[value] = jax.make_array_from_single_device_arrays(
          (self._sharding.mesh.devices.size, jax.process_count()), self._sharding,
          [jax.device_put(row, d) for row, d in zip(rows, devices)])
    return self._local[value]

  def sent(self, signals) -> None:
    """The signals a queued step returns (a process's signal, summed over the devices)."""
    self._sent.append(signals)

  def agreed(self, step: int) -> bool:
    """Whether to stop now (call it before every step, on every process)."""
    self.step = step
    if self._received_at is not None:  # said here, not in the handler (print is not reentrant)
      print(f"{self.signal.name} received by process {jax.process_index()} at step "
            f"{self._received_at}", flush=True)
      self._received_at = None
    if not self._several:
      self.reason = self.signal and self.signal.name
      return self.reason is not None
    if len(self._sent) < 2:
      return False
    # The older of the two: the loop waited for it before queuing the newer.
    received = np.asarray(self._sent[0]).astype(np.int64)
    senders = np.flatnonzero(received)
    if len(senders):
      first = int(senders[0])
      self.reason = f"{signal.Signals(int(received[first])).name} (process {first})"
      return True
    return False

  def close(self):
    """Gives the signals back to whoever handled them before."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    if self.signal is None:
      self._received_at = self.step
    self.signal = signal.Signals(signum)
    # A second Ctrl-C kills at once, as usual. A second SIGTERM does not: a
    # dying parent can send several (Linux sends PR_SET_PDEATHSIG's signal as
    # each of its threads exits), and a scheduler follows with SIGKILL anyway.
    if signum == signal.SIGINT:
      signal.signal(signum, signal.SIG_DFL)


def agree(decision: bool) -> bool:
  """Process 0's decision, on every process."""
  if jax.process_count() == 1:
    return bool(decision)
  return bool(multihost_utils.broadcast_one_to_all(np.int32(decision)))


def num_params(state) -> int:
  """How many numbers the family trains (both networks of a GAN)."""
  return sum(x.size for x in jax.tree.leaves(state["task"].get("params", {})))


def describe(config, info, mesh, state) -> str:
  return (f"{config.task} on {info}; {num_params(state):,} parameters; mesh {dict(mesh.shape)} over "
          f"{jax.device_count()} {jax.devices()[0].platform} devices, "
          f"{jax.process_count()} process(es)")

