"""`python -m genflax.sweep`: run, report and watch hyperparameter sweeps.

    python -m genflax.sweep --config FILE[:arg] --workdir DIR (--sweep NAME | --param KEY=SPACE ...)
        [--config.KEY=VALUE ...] [--metric M] [--direction minimize|maximize]
        [--sampler grid|random|tpe] [--trials N] [--seed S] [--pruner median|hyperband|...]
        [--workers N] [--storage URL] [--launcher local|slurm [--slurm KEY=VALUE ...]] [--dry_run]
    python -m genflax.sweep --workdir DIR          continue the sweep in DIR
    python -m genflax.sweep report DIR             results.csv, results.md and plots
    python -m genflax.sweep dashboard DIR          optuna-dashboard over the study

Each trial is `python -m genflax.main --config FILE[:arg] --workdir DIR/trials/N
--config.KEY=VALUE ...` with the trial's values (spaces: genflax/sweep/space.py).
Running the same command again continues the study: finished trials are
kept, interrupted ones resume from their checkpoints.
"""
import argparse
import collections
import dataclasses
import itertools
import os
import sys

from genflax import configfile
from genflax.errors import ConfigError, UserError

try:  # the `sweep` extra: pip install 'genflax[sweep]'
  import optuna_dashboard
  from genflax.sweep import launch, report, space, study, worker
  _MISSING = None
except ImportError as e:
  _MISSING = e

NAMED_SWEEP_KEYS = ("params", "metric", "direction", "sampler", "trials", "seed", "pruner")


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise ConfigError(f"{message} (see python -m genflax.sweep --help)")


def run_parser() -> argparse.ArgumentParser:
  p = _Parser(prog="python -m genflax.sweep", description=__doc__,
              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", help="the experiment's config file, FILE[:arg] as genflax.main takes it")
  p.add_argument("--workdir", required=True, help="the sweep's directory (trials/, study, report)")
  p.add_argument("--sweep", help="a sweep the config file defines: its get_sweep(NAME)")
  p.add_argument("--param", action="append", default=[], metavar="KEY=SPACE",
                 help="a config key and its values or range; repeat for more")
  p.add_argument("--metric", help="the results.json key to optimise (iwae_nll, fid, loss, ...)")
  p.add_argument("--direction", help="minimize (default) or maximize")
  p.add_argument("--sampler", help="grid, random or tpe (default: grid if every space is a list)")
  p.add_argument("--trials", type=int, help="how many trials in all (default: the grid's size)")
  p.add_argument("--seed", type=int, help="the sampler's seed (default 0)")
  p.add_argument("--pruner", help="none (default), median, hyperband or successive_halving")
  p.add_argument("--pruner_startup_trials", type=int, default=5,
                 help="median: trials that run to the end before any is pruned")
  p.add_argument("--pruner_warmup_steps", type=int, default=0,
                 help="median: no trial is pruned at evaluations before this step")
  p.add_argument("--workers", type=int, default=1, help="workers running trials in parallel")
  p.add_argument("--storage", default="", help="an Optuna storage URL shared by workers on "
                 "several machines (default: DIR/study.journal)")
  p.add_argument("--study_name", default="genflax")
  p.add_argument("--launcher", default="local", choices=("local", "slurm"))
  p.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                 help="an sbatch setting (partition=gpu, time=120, gpus_per_node=1, ...)")
  p.add_argument("--slurm_cluster", default="slurm",
                 help="slurm; or local/debug: run the job array here through submitit")
  p.add_argument("--dry_run", action="store_true",
                 help="check everything and print what would run, without running it")
  return p


def main(argv: list[str]) -> int:
  try:
    if _MISSING is not None:
      raise UserError(f"{_MISSING.name or _MISSING}: sweeps need pip install 'genflax[sweep]'")
    command = argv[1] if len(argv) > 1 else ""
    if command in ("report", "dashboard", "worker"):
      return {"report": report_main, "dashboard": dashboard_main,
              "worker": worker_main}[command](argv[2:])
    return run_main(argv[1:])
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
  return 2


def run_main(args: list[str]) -> int:
  ns, rest = run_parser().parse_known_args(args)
  overrides = {}
  for a in rest:
    key, eq, value = a[len("--config."):].partition("=")
    if not a.startswith("--config.") or not eq:
      raise ConfigError(f"unknown argument {a!r} (trial config values are --config.KEY=VALUE)")
    overrides[key] = value
  if ns.workers < 1:
    raise ConfigError(f"--workers={ns.workers}: give at least 1")
  sweep = definition(ns, overrides)
  study.check(sweep)
  if ns.dry_run:
    print_plan(sweep, ns.workdir)
    if ns.launcher == "slurm":
      launch.slurm(ns.workdir, ns.workers, slurm_params(ns.slurm), ns.slurm_cluster, dry_run=True)
    return 0
  study.check_workdir(ns.workdir, sweep)
  os.makedirs(ns.workdir, exist_ok=True)
  study.open_study(sweep, ns.workdir)  # created once, before the workers race to it
  study.save(ns.workdir, sweep)
  print(f"sweep {ns.workdir}: {sweep.trials} trials of {sweep.config} "
        f"({sweep.sampler} sampler, {sweep.direction} {sweep.metric}), {ns.workers} worker(s)")
  if ns.launcher == "slurm":
    launch.slurm(ns.workdir, ns.workers, slurm_params(ns.slurm), ns.slurm_cluster)
  else:
    launch.local(ns.workdir, ns.workers)
  print(summary(sweep, ns.workdir))
  return 0


def definition(ns, overrides: dict):
  """The sweep the flags describe, or the one in the workdir (continued)."""
  if not ns.config:
    if ns.param or ns.sweep or overrides:
      raise ConfigError("--config is missing: name the experiment's config file")
    sweep = study.load(ns.workdir)  # continue it, perhaps with more trials
    return dataclasses.replace(sweep, trials=ns.trials or sweep.trials)
  named = named_sweep(ns.config, ns.sweep) if ns.sweep else {}
  params = {k: str(space.from_config(k, v)) for k, v in named.get("params", {}).items()}
  for p in ns.param:
    key, eq, text = p.partition("=")
    if not eq or not key:
      raise ConfigError(f"--param {p}: write KEY=SPACE, e.g. 'optim.lr=loguniform(1e-4,1e-2)'")
    params[key] = str(space.parse(key, text))
  spaces = {k: space.parse(k, v) for k, v in params.items()}
  size = space.grid_size(spaces)
  sampler = ns.sampler or named.get("sampler") or ("grid" if size else "tpe")
  if sampler not in study.SAMPLERS:
    raise ConfigError(f"--sampler={sampler}: expected one of {study.SAMPLERS}")
  if sampler == "grid":
    space.grid(spaces)  # every space a list, or the error that says which is not
  trials = ns.trials or named.get("trials") or (size if sampler == "grid" else 0)
  if sampler == "grid" and size:
    trials = min(trials, size)
  if not trials:
    raise ConfigError(f"--trials is missing: with the {sampler} sampler give how many trials to run")
  pruner = ns.pruner or named.get("pruner") or "none"
  pruner_args = {"startup_trials": ns.pruner_startup_trials, "warmup_steps": ns.pruner_warmup_steps}
  if pruner in ("hyperband", "successive_halving"):
    base = configfile.load_config(ns.config)
    pruner_args = {"min_steps": int(base.train.eval_every_steps),
                   "max_steps": int(base.train.num_steps)}
  return study.Sweep(
      config=ns.config, overrides=overrides, params=params,
      metric=ns.metric or named.get("metric", ""),
      direction=ns.direction or named.get("direction", "minimize"), sampler=sampler,
      seed=ns.seed if ns.seed is not None else named.get("seed", 0), pruner=pruner,
      pruner_args=pruner_args if pruner != "none" else {}, trials=int(trials),
      storage=ns.storage, study_name=ns.study_name)


def named_sweep(config: str, name: str) -> dict:
  """get_sweep(name) of the config file: {"params": {KEY: SPACE}, "metric": ..., ...}."""
  path = config.partition(":")[0]
  module = configfile.load_module(path, f"--config {config}")
  if not hasattr(module, "get_sweep"):
    raise ConfigError(f"--sweep {name}: {path} defines no sweeps (no get_sweep)")
  try:
    named = module.get_sweep(name)
  except KeyError:
    known = sorted(getattr(module, "SWEEPS", {}))
    raise ConfigError(f"--sweep {name}: {path} has no such sweep"
                      + (f"; it has {known}" if known else "")) from None
  unknown = sorted(set(named) - set(NAMED_SWEEP_KEYS))
  if unknown:
    raise ConfigError(f"{path}: get_sweep({name!r}) has unknown entries {unknown}; "
                      f"expected {NAMED_SWEEP_KEYS}")
  return named


def slurm_params(items: list[str]) -> dict:
  params = {}
  for item in items:
    key, eq, value = item.partition("=")
    if not eq:
      raise ConfigError(f"--slurm {item}: write KEY=VALUE, e.g. --slurm partition=gpu")
    params[key] = int(value) if value.isdigit() else value
  return params


def print_plan(sweep, workdir: str) -> None:
  spaces = sweep.spaces()
  print(f"{sweep.trials} trials ({sweep.sampler} sampler, seed {sweep.seed}; "
        f"{sweep.direction} {sweep.metric}; pruner {sweep.pruner}); the trials run:")
  if sweep.sampler == "grid":
    points = [dict(zip(spaces, values))
              for values in itertools.product(*(s.values for s in spaces.values()))]
  else:
    points = [{k: (s.values[0] if isinstance(s, space.Choice) else f"<{s}>")
               for k, s in spaces.items()}]
  for point in points[:sweep.trials]:
    print("  " + study.display(sweep.trial_command(point, os.path.join(workdir, "trials", "N"))))


def summary(sweep, workdir: str) -> str:
  trials = study.open_study(sweep, workdir).get_trials(deepcopy=False)
  states = collections.Counter(t.state.name.lower() for t in trials)
  text = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
  done = [t for t in trials if t.state.name == "COMPLETE"]
  line = f"sweep {workdir}: {len(trials)} of {sweep.trials} trials ({text})"
  if done:
    best = (min if sweep.direction == "minimize" else max)(done, key=lambda t: t.value)
    line += f"; best trial {best.number}: {sweep.metric} {best.value:.6g}"
  if states.get("running"):
    line += "; running or interrupted trials resume when this command runs again"
  return line + f". Tables and plots: python -m genflax.sweep report {workdir}"


def worker_main(args: list[str]) -> int:
  p = _Parser(prog="python -m genflax.sweep worker")
  p.add_argument("workdir")
  p.add_argument("--index", type=int, default=0)
  p.add_argument("--of", type=int, default=1)
  ns = p.parse_args(args)
  worker.work(ns.workdir, ns.index, ns.of)
  return 0


def report_main(args: list[str]) -> int:
  p = _Parser(prog="python -m genflax.sweep report")
  p.add_argument("workdir")
  p.add_argument("--out", help="where the tables and plots go (default: DIR/report)")
  ns = p.parse_args(args)
  report.report(ns.workdir, ns.out)
  return 0


def dashboard_main(args: list[str]) -> int:
  p = _Parser(prog="python -m genflax.sweep dashboard")
  p.add_argument("workdir")
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=8080)
  ns = p.parse_args(args)
  storage = study.storage(study.load(ns.workdir), ns.workdir)
  print(f"optuna-dashboard for {ns.workdir}: http://{ns.host}:{ns.port}/dashboard/ "
        "(Ctrl-C stops it)", flush=True)
  optuna_dashboard.run_server(storage, host=ns.host, port=ns.port)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
