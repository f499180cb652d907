"""Inside a sweep's trial: each evaluation is reported to the study, which may prune.

A worker starts a trial as an ordinary `python -m genflax.main` run with
GENFLAX_SWEEP_TRIAL set to {"sweep": sweep workdir, "number": trial number}.
`genflax.main` then passes `reporter()` to the trainer as its `on_eval`,
which reports the sweep's metric at every evaluation and returns True when
the study's pruner stops the trial. Without the variable it is None, and
nothing here imports Optuna.
"""
import json
import math
import os

ENV = "GENFLAX_SWEEP_TRIAL"
PRUNED_AT = "pruned_at_step"  # the trial's user attribute the worker reads


def reporter():
  """The trainer's on_eval hook for this process's trial, or None outside a sweep."""
  spec = os.environ.get(ENV)
  return Reporter(**json.loads(spec)) if spec else None


class Reporter:
  """on_eval(step, values) -> stop: reports values[metric] at `step`, asks the pruner."""

  def __init__(self, sweep: str, number: int):
    self.workdir, self.number = sweep, number
    self._trial = None

  def __call__(self, step: int, values: dict) -> bool:
    import optuna  # pylint: disable=g-import-not-at-top
    from genflax.sweep import study as sweep_study  # pylint: disable=g-import-not-at-top
    if self._trial is None:
      self.sweep = sweep_study.load(self.workdir)
      self.study = sweep_study.open_study(self.sweep, self.workdir)
      trial_id = self.study._storage.get_trial_id_from_study_id_trial_number(  # pylint: disable=protected-access
          self.study._study_id, self.number)  # pylint: disable=protected-access
      self._trial = optuna.Trial(self.study, trial_id)
    value = values.get(self.sweep.metric)
    if value is None or not math.isfinite(value):
      return False
    self._trial.report(float(value), step)
    if not self._trial.should_prune():
      return False
    self._trial.set_user_attr(PRUNED_AT, step)
    return True
