"""Damaged files in a workdir: what can be rebuilt is rebuilt with one line
saying so, what cannot is named in one line (exit status 2), and the
checkpoints are left byte-identical either way.

A finished smoke run is copied once per case, one file damaged, and the same
command run again on it.
"""
import hashlib
import json
import os
import shutil

import pytest

from genflax import trainer
from genflax.errors import UserError
from tests import helpers

pytestmark = pytest.mark.slow

COMMAND = ["--config=configs/vae_digits.py:smoke"]


def _damage(path, how: str) -> None:
  """Damages the file at `path`: empty, cut to half, random bytes, or valid JSON
  of the wrong shape."""
  data = open(path, "rb").read()
  damaged = {"empty": b"", "half": data[:len(data) // 2],
             "bytes": os.urandom(max(len(data), 64)), "shape": b"[1, 2, 3]\n"}[how]
  with open(path, "wb") as f:
    f.write(damaged)


def _digest(directory) -> dict:
  """{path relative to directory: sha256 of its bytes} of every file under it."""
  return {os.path.relpath(os.path.join(root, name), directory):
          hashlib.sha256(open(os.path.join(root, name), "rb").read()).hexdigest()
          for root, _, files in os.walk(directory) for name in files}


DAMAGES = ("empty", "half", "bytes", "shape")
CASES = [*(("config.json", how) for how in DAMAGES), ("results.json", "half"),
         ("results.json", "shape")]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished smoke run, and every case run on a damaged copy of it:
  {case: (workdir, CompletedProcess)}, plus the run itself under None."""
  base = tmp_path_factory.mktemp("finished")
  runs = {None: (base / "run", None)}
  assert helpers.cli(*COMMAND, f"--workdir={base / 'run'}").returncode == 0
  commands = []
  for name, how in CASES:
    workdir = base / f"{name}-{how}"
    shutil.copytree(base / "run", workdir)
    _damage(workdir / name, how)
    runs[name, how] = workdir, len(commands)
    commands.append([*COMMAND, f"--workdir={workdir}"])
  # metrics.jsonl with unreadable lines amid its rows, resumed by a longer schedule.
  workdir = base / "metrics"
  shutil.copytree(base / "run", workdir)
  lines = open(workdir / "metrics.jsonl", "rb").read().splitlines(keepends=True)
  with open(workdir / "metrics.jsonl", "wb") as f:
    f.writelines([lines[0], b"\xff\xfe garbage\n", b"[1, 2]\n", b'{"no": "step"}\n', *lines[1:]])
  runs["metrics"] = workdir, len(commands)
  commands.append([*COMMAND, f"--workdir={workdir}", "--config.train.num_steps=16"])
  done = [helpers.cli(*command) for command in commands]
  return {key: (w, done[i] if i is not None else None) for key, (w, i) in runs.items()}


@pytest.mark.parametrize("name, how", CASES)
def test_a_damaged_file_the_run_can_rebuild_is_rebuilt_and_said_so(finished, name, how):
  run, _ = finished[None]
  workdir, result = finished[name, how]
  assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
  said = {"config.json": f"{workdir / name} is unreadable: checkpoint 12 names this experiment, "
                         "so it is written again from this command's config",
          "results.json": f"{workdir / name} is unreadable: the final evaluation runs again "
                          "to write it"}[name]
  assert said in result.stdout
  rebuilt, original = json.load(open(workdir / name)), json.load(open(run / name))
  if name == "results.json":  # the rerun's final evaluation traced no train step
    assert rebuilt.pop("train_step_traces") == 0 and original.pop("train_step_traces") == 1
  assert rebuilt == original
  assert _digest(workdir / "checkpoints") == _digest(run / "checkpoints")


def test_unreadable_history_lines_are_dropped_and_said_so(finished):
  run, _ = finished[None]
  workdir, result = finished["metrics"]
  assert result.returncode == 0, result.stderr
  assert f"{workdir / 'metrics.jsonl'}: 3 unreadable line(s) dropped" in result.stdout
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  before = [r for r in map(json.loads, open(run / "metrics.jsonl")) if r["split"] != "final"]
  assert rows[:len(before)] == before  # the history up to the resumed step, as it was
  assert [(r["step"], r["split"]) for r in rows[len(before):]] == [(16, "train"), (16, "final")]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_config_json_that_cannot_be_rebuilt_is_one_line_and_nothing_changes(
    finished, tmp_path, how):
  """Without a checkpoint that names its experiment, config.json cannot be
  told from another experiment's: the run refuses, and so does genflax.sample."""
  run, _ = finished[None]
  workdir = tmp_path / "w"
  shutil.copytree(run, workdir)
  _damage(workdir / "config.json", how)
  for step in ("8", "12"):  # checkpoints saved before saves named their experiment
    meta = workdir / "checkpoints" / step / "meta" / "metadata"
    kept = {k: v for k, v in json.load(open(meta)).items() if k in ("step", "opt_layout")}
    meta.write_text(json.dumps(kept))
  before = _digest(workdir)
  del before["run.owner"]  # names the command that holds the workdir (this one, while it checks)
  result = helpers.cli(*COMMAND, f"--workdir={workdir}")
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
  assert result.stderr.strip() == (
      f"error: {workdir / 'config.json'} is unreadable, and checkpoint 12 does not say which "
      f"experiment wrote it: put back the run's config.json, or move {workdir} away to start "
      "afresh")
  after = _digest(workdir)
  del after["run.owner"]
  assert after == before
  with pytest.raises(UserError, match=r"config.json is unreadable: run the command that "
                                      r"trained .* again, which writes it again"):
    trainer.load_run(str(workdir))
