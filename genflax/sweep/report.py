"""A sweep's results: results.csv, results.md and PNG plots, from the study and the trials' files.

Per trial: its number, state, swept values, the sweep's metric (from its
results.json), the best value the metric reached at an evaluation and that
step, the steps trained, wall time over all attempts, attempts, the error of
a failed trial, then every number of its results.json. With `seed` among
the swept keys a second table gives mean, spread and count over seeds for
each setting of the other keys. Plots: the metric against each swept key
(optuna's slice plot), every trial's learning curves on one figure, the
optimisation history and, where Optuna can compute them, parameter
importances. The best trial is printed as the `genflax.main` command that
reproduces it.
"""
import csv
import io
import math
import os
import re
import statistics
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import optuna  # pylint: disable=g-import-not-at-top,wrong-import-position

from genflax import files, metrics  # pylint: disable=wrong-import-position
from genflax.sweep import space, study as sweep_study  # pylint: disable=wrong-import-position

FIXED = ("trial", "state")
AFTER = ("best_eval", "best_eval_step", "steps", "wall_s", "attempts", "error")


def report(workdir: str, out: str | None = None) -> list[dict]:
  """Writes the tables and plots into `out` (default WORKDIR/report); returns the rows."""
  out = out or os.path.join(workdir, "report")
  files.check_folder(out, "the report's folder")
  sweep = sweep_study.load(workdir)
  study = sweep_study.open_study(sweep, workdir)
  trials = study.get_trials()
  rows = [row(sweep, workdir, t) for t in trials]
  columns = table_columns(sweep, rows)
  table = io.StringIO(newline="")
  writer = csv.DictWriter(table, columns)
  writer.writeheader()
  writer.writerows(rows)
  files.write_atomically(os.path.join(out, "results.csv"),
                           lambda f: f.write(table.getvalue().encode()))
  files.write_atomically(os.path.join(out, "results.md"),
                           lambda f: f.write(markdown(sweep, rows).encode()))
  plots(sweep, study, workdir, out)
  best = best_row(sweep, rows)
  print(f"{len(rows)} trials: tables and plots in {out}")
  if best:
    print(f"best: trial {best['trial']}, {sweep.metric} {best[sweep.metric]:.6g}; rerun it with\n"
          f"  {reproduce(sweep, best)}")
  return rows


def row(sweep, workdir: str, t) -> dict:
  """One trial's line of the table."""
  results = read_json(os.path.join(workdir, "trials", str(t.number), "results.json"))
  r = {"trial": t.number, "state": t.state.name.lower()}
  for key, s in sweep.spaces().items():
    value = t.params.get(key)
    if isinstance(s, space.Choice) and value is not None:
      value = space.format_value(s.values[[space.encode(v) for v in s.values].index(value)])
    if key.startswith(":") and value == "":
      value = "(default)"  # the config file without a variant on this axis
    r[key] = value
  r[sweep.metric] = results.get(sweep.metric) if results else None
  steps = dict(t.intermediate_values)
  if steps:
    pick = min if sweep.direction == "minimize" else max
    r["best_eval_step"] = pick(steps, key=steps.get)
    r["best_eval"] = steps[r["best_eval_step"]]
  r["steps"] = results.get("step") if results else (max(steps) if steps else None)
  r["wall_s"] = round(t.user_attrs.get("wall_s", 0.0), 1)
  r["attempts"] = t.user_attrs.get("attempts", 0)
  r["error"] = t.user_attrs.get("error", "")
  r["command"] = t.user_attrs.get("command", "")
  for k, v in (results or {}).items():
    r.setdefault(k, v)
  return r


def read_json(path: str):
  """A trial's results; None where it has none, or they are unreadable (said once)."""
  if not os.path.exists(path):
    return None
  results = files.read_json(path)
  if results is None:
    print(f"{path} is unreadable: that trial's row has no results")
  return results


def table_columns(sweep, rows: list[dict]) -> list[str]:
  first = [*FIXED, *sweep.params, sweep.metric, *AFTER]
  rest = sorted({k for r in rows for k in r} - set(first) - {"command"})
  return first + rest + ["command"]


def fmt(value) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value).replace("|", "\\|")


def markdown(sweep, rows: list[dict]) -> str:
  """The trials table, and the over-seeds table where `seed` was swept."""
  cols = [*FIXED, *sweep.params, sweep.metric, *AFTER]
  lines = [f"# Sweep of {sweep.config}: {sweep.direction} {sweep.metric}", "",
           table(cols, [[fmt(r.get(c)) for c in cols] for r in rows])]
  groups = over_seeds(sweep, rows)
  if groups:
    keys = [k for k in sweep.params if k != "seed"]
    cols = [*keys, f"{sweep.metric} mean", "std", "min", "max", "seeds"]
    lines += ["", f"## {sweep.metric} over seeds (complete trials)", "",
              table(cols, [[*g["key"], *(fmt(g[c]) for c in ("mean", "std", "min", "max")),
                            str(g["n"])] for g in groups])]
  return "\n".join(lines) + "\n"


def table(columns: list[str], cells: list[list[str]]) -> str:
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(c) + " |" for c in cells]
  return "\n".join(lines)


def over_seeds(sweep, rows: list[dict]) -> list[dict]:
  """Mean, sample std, min, max and count of the metric per setting of the keys but seed."""
  if "seed" not in sweep.params or len(sweep.params) < 2:
    return []
  keys = [k for k in sweep.params if k != "seed"]
  groups = {}
  for r in rows:
    if r["state"] == "complete" and r[sweep.metric] is not None:
      groups.setdefault(tuple(fmt(r[k]) for k in keys), []).append(r[sweep.metric])
  out = []
  for key, values in groups.items():
    out.append({"key": key, "mean": statistics.fmean(values), "n": len(values),
                "std": statistics.stdev(values) if len(values) > 1 else None,
                "min": min(values), "max": max(values)})
  return sorted(out, key=lambda g: g["mean"], reverse=sweep.direction == "maximize")


def best_row(sweep, rows: list[dict]):
  done = [r for r in rows if r["state"] == "complete" and r[sweep.metric] is not None
          and math.isfinite(r[sweep.metric])]
  if not done:
    return None
  return (min if sweep.direction == "minimize" else max)(done, key=lambda r: r[sweep.metric])


def reproduce(sweep, best: dict) -> str:
  """The best trial's genflax.main command, into a workdir of its own."""
  del sweep
  return re.sub(rf"/trials/{best['trial']}\b", "/best", best["command"], count=1)


# ---- Plots

def plots(sweep, study, workdir: str, out: str) -> None:
  finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
  learning_curves(sweep, workdir, study.get_trials(deepcopy=False), out)
  complete = [t for t in finished if t.state.name == "COMPLETE"]
  if not complete:
    return
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # optuna's matplotlib plots are marked experimental
    vis = optuna.visualization.matplotlib
    save(vis.plot_optimization_history(study, target_name=sweep.metric),
         os.path.join(out, "history.png"))
    save(vis.plot_slice(study, target_name=sweep.metric), os.path.join(out, "slice.png"))
    varied = [k for k in sweep.params if len({str(t.params.get(k)) for t in complete}) > 1]
    if len(complete) >= 2 and varied:
      try:
        importances = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), params=varied)
      except (RuntimeError, ValueError):
        importances = None
      if importances:
        save(vis.plot_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(
            seed=0), params=varied, target_name=sweep.metric), os.path.join(out, "importance.png"))


def save(axes, path: str) -> None:
  figure = axes.flat[0].figure if hasattr(axes, "flat") else axes.figure
  figure.set_size_inches(max(figure.get_size_inches()[0], 6.4), 4.8)
  figure.tight_layout()
  files.write_atomically(path, lambda f: figure.savefig(f, format="png", dpi=110))
  plt.close(figure)


def learning_curves(sweep, workdir: str, trials, out: str) -> None:
  """Every trial's train loss and evaluated metric against steps, one line per trial,
  coloured by its values of the swept keys other than the seed."""
  fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(12, 4.5))
  groups = {}  # group -> colour
  for t in trials:
    rows = metrics.read_rows(os.path.join(workdir, "trials", str(t.number), "metrics.jsonl"))
    train = [r for r in rows if r["split"] == "train"]
    loss_key = next((k for k in ("loss", "d_loss") if train and k in train[0]), None)
    group = " ".join(f"{k.lstrip(':').rsplit('.', 1)[-1]}={v if v != '' else 'default'}"
                     for k, v in t.params.items() if k != "seed")
    label = None if group in groups else group  # one legend entry per group
    color = groups.setdefault(group, f"C{len(groups) % 10}")
    if loss_key:
      ax_train.plot([r["step"] for r in train], [r[loss_key] for r in train], color=color, lw=1)
      ax_train.set_ylabel(f"train {loss_key}")
    evals = [r for r in rows if r["split"] in ("eval", "final") and sweep.metric in r]
    if evals:
      ax_eval.plot([r["step"] for r in evals], [r[sweep.metric] for r in evals], marker=".",
                   color=color, label=label, lw=1)
  for ax, name in ((ax_train, "train"), (ax_eval, f"eval {sweep.metric}")):
    ax.set_xlabel("step")
    ax.set_title(name)
  ax_eval.set_ylabel(sweep.metric)
  if 1 < len(groups) <= 20:
    ax_eval.legend(fontsize=6)
  fig.tight_layout()
  files.write_atomically(os.path.join(out, "learning_curves.png"),
                           lambda f: fig.savefig(f, format="png", dpi=110))
  plt.close(fig)

