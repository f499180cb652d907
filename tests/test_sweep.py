"""`python -m genflax.sweep`: spaces, checks, workers, resume, failures, pruning, report."""
import csv
import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import optuna
import pytest

from genflax.errors import ConfigError
from genflax.sweep import space, study as sweep_study, worker
from tests import helpers

SMOKE = "--config=configs/vae_digits.py:smoke"


def sweep_cli(*args, timeout=600):
  """The sweep command, its trials on one CPU device each (not the tests' 8)."""
  return helpers.cli(*args, module="genflax.sweep", env=one_device_env(), timeout=timeout)


def one_device_env():
  return helpers.one_device_env()


def _error(result) -> str:
  assert result.returncode == 2, result.stdout + result.stderr
  assert "Traceback" not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  return lines[0]


def trials(workdir):
  sweep = sweep_study.load(str(workdir))
  return sweep_study.open_study(sweep, str(workdir)).get_trials()


# ---- Spaces

@pytest.mark.parametrize("text,expected", [
    ("[2, 4, 8]", space.Choice((2, 4, 8))),
    ("choice(ns, hinge)", space.Choice(("ns", "hinge"))),
    ("[(64,), (128, 128)]", space.Choice(((64,), (128, 128)))),
    ("['', hinge, 'a b']", space.Choice(("", "hinge", "a b"))),
    ("[True, false, -1.5e-3]", space.Choice((True, "false", -0.0015))),
    ("range(1, 10, 4)", space.Choice((1, 5, 9))),
    ("uniform(0, 0.5)", space.Float(0, 0.5)),
    ("loguniform(1e-5, 1e-3)", space.Float(1e-5, 1e-3, log=True)),
    ("int(1, 8)", space.Int(1, 8)),
    ("logint(2, 64)", space.Int(2, 64, log=True)),
    ("0.3", space.Choice((0.3,))),
])
def test_spaces_parse_and_read_back(text, expected):
  parsed = space.parse("k", text)
  assert parsed == expected
  assert space.parse("k", str(parsed)) == parsed  # sweep.json stores the text


@pytest.mark.parametrize("text,message", [
    ("[1, 2", "cannot read it"),
    ("loguniform(0, 1)", "a log scale needs low > 0"),
    ("uniform(1, 1)", "low < high"),
    ("int(1.5, 3)", "integer bounds"),
    ("normal(0, 1)", "normal(...) is not a space"),
    ("[]", "an empty list"),
    ("[1, 1]", "repeated values"),
    ("[f(x)]", "'f(x)' is not a value"),
])
def test_bad_spaces_say_how_to_write_one(text, message):
  with pytest.raises(ConfigError, match="write \\[a, b\\]") as e:
    space.parse("k", text)
  assert message in str(e.value) and f"--param k={text}" in str(e.value)


def test_grid_expands_lists_and_refuses_ranges():
  spaces = {"a": space.Choice((1, 2, 3)), "b": space.Choice(((8,), (4, 4)))}
  assert space.grid_size(spaces) == 6
  assert space.grid(spaces) == {"a": [1, 2, 3], "b": ["(8,)", "(4, 4)"]}
  with pytest.raises(ConfigError, match="b is a range"):
    space.grid({"a": space.Choice((1,)), "b": space.Float(0, 1)})
  assert space.grid_size({"b": space.Float(0, 1)}) is None


def test_trial_command_applies_values_and_variant_axes():
  sweep = sweep_study.Sweep(config="configs/gan_digits.py:smoke", overrides={"train.num_steps": "5"},
                            params={":loss": "['', hinge]", "model.g_hidden": "[(8, 8)]"},
                            metric="fid")
  command = sweep.trial_command({":loss": "hinge", "model.g_hidden": (8, 8)}, "W", python="py")
  assert command == ["py", "-m", "genflax.main", "--config=configs/gan_digits.py:smoke,hinge",
                     "--workdir=W", "--config.train.num_steps=5", "--config.model.g_hidden=(8, 8)"]
  default = sweep.trial_command({":loss": "", "model.g_hidden": (8, 8)}, "W", python="py")
  assert default[3] == "--config=configs/gan_digits.py:smoke"


def test_seeded_samplers_draw_apart_in_each_trial_and_alike_across_workers():
  """Two workers with the same seed propose different values for trials 0 and 1,
  and the same values for the same trial number."""
  def draw(number_of_trials_before):
    study = optuna.create_study(sampler=sweep_study.PerTrialSeed(optuna.samplers.RandomSampler, 7))
    for _ in range(number_of_trials_before):
      study.tell(study.ask(), 0.0)
    return study.ask().suggest_float("x", 0, 1)

  assert draw(0) != draw(1)
  assert draw(1) == draw(1)


def test_samplers_and_pruners_come_from_the_definition():
  base = dict(config="configs/vae_digits.py", overrides={}, params={"optim.lr": "uniform(0.1, 1.0)"},
              metric="iwae_nll")
  make = lambda **kw: sweep_study.Sweep(**base, **kw)
  assert isinstance(sweep_study.sampler(make(sampler="tpe"))._inner, optuna.samplers.TPESampler)
  assert isinstance(sweep_study.sampler(make(sampler="random"))._inner,
                    optuna.samplers.RandomSampler)
  median = sweep_study.pruner(make(pruner="median", pruner_args={"startup_trials": 3,
                                                                 "warmup_steps": 500}))
  assert (median._n_startup_trials, median._n_warmup_steps) == (3, 500)
  halving = sweep_study.pruner(make(pruner="successive_halving", pruner_args={"min_steps": 250}))
  assert halving._min_resource == 250
  hyperband = sweep_study.pruner(make(pruner="hyperband",
                                      pruner_args={"min_steps": 250, "max_steps": 3000}))
  assert (hyperband._min_resource, hyperband._max_resource) == (250, 3000)
  assert isinstance(sweep_study.pruner(make()), optuna.pruners.NopPruner)


def test_workers_split_cores_and_gpus():
  assert worker.shares(1, [0, 1], []) == [worker.Share()]
  two = worker.shares(2, [0, 1, 2, 3], [])
  assert [s.cores for s in two] == [(0, 1), (2, 3)]
  assert two[0].env["OMP_NUM_THREADS"] == "2"
  shared = worker.shares(4, [0, 1], ["0", "1"])
  assert [s.cores for s in shared] == [(0,), (1,), (0,), (1,)]
  assert [s.env["CUDA_VISIBLE_DEVICES"] for s in shared] == ["0", "1", "0", "1"]
  assert all(s.env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.45" for s in shared)
  own = worker.shares(2, [0, 1, 2, 3], ["4", "5", "6", "7"])
  assert [s.env["CUDA_VISIBLE_DEVICES"] for s in own] == ["4,5", "6,7"]
  assert all("XLA_PYTHON_CLIENT_MEM_FRACTION" not in s.env for s in own)


def test_a_trial_pinned_to_one_core_splits_no_more_devices_than_it_has():
  """cpu_devices=-1 (one device per core) counts the cores the worker's share allows."""
  code = "from genflax import main; print(main.usable_cores())"
  pinned = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=helpers.ROOT, preexec_fn=lambda: worker.child_setup((0,)))
  assert pinned.stdout.strip() == "1"


# ---- Checks before any trial

BAD_SWEEPS = [
    (["--param", "model.latent_dimm=[2, 4]"],
     ["unknown --param key 'model.latent_dimm'", "did you mean model.latent_dim"]),
    (["--param", "model.latent_dim=[2, four]"], ["'four' is not a valid int for model.latent_dim"]),
    (["--param", "model.hidden=[64, 128]"], ["'64' is not a valid tuple for model.hidden"]),
    (["--param", "optim.lr=loguniform(0, 1)"], ["a log scale needs low > 0"]),
    (["--param", "optim.lr=uniform(1e-4, 1e-2)", "--sampler", "grid"], ["optim.lr is a range"]),
    (["--param", "optim.lr=uniform(1e-4, 1e-2)"], ["--trials is missing"]),
    (["--param", "model=[1]"], ["model is a section"]),
    (["--param", "model.beta=[1.0]", "--config.model.beta=x"], ["--config.model.beta=x"]),
    (["--param", "model.beta=[1.0]", "--config.nope=1"], ["unknown config key 'nope'"]),
    (["--param", "model.beta=[1.0]", "--direction", "up"], ["--direction=up"]),
    (["--param", "model.beta=[1.0]", "--sampler", "cma"], ["--sampler=cma"]),
    (["--param", "model.beta=[1.0]", "--bogus"], ["unknown argument '--bogus'"]),
    (["--sweep", "nosuch"], ["has no such sweep", "'latent_beta'"]),
    (["--param", "model.beta"], ["write KEY=SPACE"]),
    ([], ["the sweep varies nothing"]),
    (["--param", "eval.iwae_chunk=[4, 3]"],
     ["the trial with eval.iwae_chunk=3 would stop at once", "must divide eval.iwae_k=4"]),
    (["--param", ':arch=["", conv]', "--param", "model.channels=[(), (8,)]"],
     ["the trial with :arch=conv, model.channels=() would stop", "(at least one)"]),
    (["--param", ":arch=[convv]"], ["unknown variant 'convv' in ':smoke,convv'"]),
]
# Each case is a command of its own: the fast tier (-m "not slow") runs the first.
BAD_SWEEPS = BAD_SWEEPS[:1] + [pytest.param(*case, marks=pytest.mark.slow)
                               for case in BAD_SWEEPS[1:]]


@pytest.mark.parametrize("args,expected", BAD_SWEEPS)
def test_bad_sweeps_stop_before_any_trial(tmp_path, args, expected):
  message = _error(sweep_cli(SMOKE, f"--workdir={tmp_path}", "--metric=iwae_nll", *args))
  for text in expected:
    assert text in message
  assert not os.path.exists(tmp_path / "trials")


def test_dry_run_prints_every_grid_point_and_runs_nothing(tmp_path):
  result = sweep_cli(SMOKE, f"--workdir={tmp_path}", "--sweep=latent_beta", "--dry_run")
  assert result.returncode == 0, result.stderr
  commands = [l for l in result.stdout.splitlines() if "genflax.main" in l]
  assert len(commands) == 30 and "30 trials (grid sampler" in result.stdout
  assert "--config.model.latent_dim=32 --config.model.beta=2.0 --config.seed=1" in result.stdout
  assert not os.listdir(tmp_path)


# ---- Sweeps that run

@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory):
  """2 workers, a grid of 4 points: two train, two fail (a learning rate of 1e30
  makes the loss non-finite)."""
  workdir = tmp_path_factory.mktemp("grid")
  result = sweep_cli(SMOKE, f"--workdir={workdir}", "--metric=iwae_nll", "--workers=2",
                     "--param=model.hidden=[(16,), (8, 8)]", "--param=optim.lr=[1e-3, 1e30]",
                     "--config.optim.warmup_steps=0", "--config.optim.schedule=constant",
                     "--config.train.num_steps=8", "--config.train.eval_every_steps=4")
  return workdir, result


def test_two_workers_run_every_grid_point_once(grid_sweep):
  workdir, result = grid_sweep
  assert result.returncode == 0, result.stdout + result.stderr
  done = trials(workdir)
  assert len(done) == 4
  points = sorted((t.params["model.hidden"], t.params["optim.lr"]) for t in done)
  assert points == [("(16,)", 1e-3), ("(16,)", 1e30), ("(8, 8)", 1e-3), ("(8, 8)", 1e30)]
  assert "worker 0:" in result.stdout and "worker 1:" in result.stdout
  for t in done:
    assert f"--config.optim.lr={t.params['optim.lr']!r}" in t.user_attrs["command"]
    config = json.load(open(workdir / "trials" / str(t.number) / "config.json"))
    assert tuple(config["model"]["hidden"]) == space.parse("h", t.params["model.hidden"]).values[0]
    assert config["optim"]["lr"] == t.params["optim.lr"]
    assert config["train"]["num_steps"] == 8


def test_a_failing_trial_is_recorded_with_its_error_and_the_others_finish(grid_sweep):
  workdir, _ = grid_sweep
  states = {t.params["optim.lr"]: set() for t in trials(workdir)}
  for t in trials(workdir):
    states[t.params["optim.lr"]].add(t.state.name)
    if t.state.name == "FAIL":
      assert t.user_attrs["error"].startswith("non-finite ") and " at step " in t.user_attrs["error"]
      assert "no checkpoint has been saved yet" in t.user_attrs["error"]
  assert states == {1e-3: {"COMPLETE"}, 1e30: {"FAIL"}}


def test_the_report_tables_equal_the_trials_results(grid_sweep, tmp_path):
  workdir, _ = grid_sweep
  result = helpers.cli("report", str(workdir), f"--out={tmp_path}", module="genflax.sweep")
  assert result.returncode == 0, result.stderr
  rows = {int(r["trial"]): r for r in csv.DictReader(open(tmp_path / "results.csv"))}
  assert len(rows) == 4
  for number, r in rows.items():
    path = workdir / "trials" / str(number) / "results.json"
    if r["state"] == "complete":
      results = json.load(open(path))
      for key in ("iwae_nll", "neg_elbo", "kl", "num_params", "step"):
        assert float(r[key]) == pytest.approx(results[key], rel=1e-12)
      assert r["best_eval_step"] == "4" and float(r["wall_s"]) > 0
    else:
      assert not path.exists() and "non-finite" in r["error"]
  best = min((r for r in rows.values() if r["state"] == "complete"), key=lambda r: float(r["iwae_nll"]))
  assert f"best: trial {best['trial']}" in result.stdout
  assert f"--workdir={workdir}/best" in result.stdout
  table = open(tmp_path / "results.md").read()
  assert table.count("| complete |") == 2 and table.count("| fail |") == 2
  for png in ("learning_curves", "history", "slice", "importance"):
    assert (tmp_path / f"{png}.png").stat().st_size > 5000
  assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # each file renamed into place
  # A folder that cannot be one is refused in one line; a trial's damaged files are
  # named in one line each, and the report is written.
  refused = helpers.cli("report", str(workdir), "--out=README.md", module="genflax.sweep")
  assert refused.returncode == 2 and refused.stderr.strip() == (
      "error: the report's folder README.md is a file, not a folder: name another")
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  trial = copy / "trials" / str(best["trial"])
  (trial / "results.json").write_bytes(b"\xff not JSON")
  with open(trial / "metrics.jsonl", "ab") as f:
    f.write(b"[1, 2]\n{cut sho")
  damaged = helpers.cli("report", str(copy), module="genflax.sweep")
  assert damaged.returncode == 0 and "Traceback" not in damaged.stderr, damaged.stderr
  assert f"{trial / 'results.json'} is unreadable: that trial's row has no results" in damaged.stdout
  assert (copy / "report" / "learning_curves.png").stat().st_size > 5000


# A sweep's files that genflax cannot rebuild, each damaged in each way.
SWEEP_DAMAGE = [("sweep.json", how) for how in ("empty", "half", "bytes", "shape")] + [
    ("study.journal", how) for how in ("empty", "bytes", "shape", "garbage_line")]


@pytest.mark.parametrize("name, how", SWEEP_DAMAGE)
def test_a_damaged_sweep_file_is_refused_in_one_line_and_nothing_changes(grid_sweep, tmp_path,
                                                                         name, how):
  workdir, _ = grid_sweep
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  content = (copy / name).read_bytes()
  (copy / name).write_bytes({
      "empty": b"", "half": content[:len(content) // 2], "bytes": os.urandom(len(content)),
      "shape": b"[1, 2, 3]\n", "garbage_line": content[:200] + b"not JSON\n" + content[200:],
  }[how])
  before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
  commands = [("report", str(copy))]
  if how == "empty":  # the sweep command itself, which would otherwise start a new study
    commands.append((f"--workdir={copy}",))
  for args in commands:
    message = _error(sweep_cli(*args))
    assert message.startswith(f"error: {copy / name} is unreadable" if (name, how) != (
        "study.journal", "empty") else f"error: {copy / name} holds no study 'genflax', "
        f"but {copy / 'trials'} holds its trials"), message
    assert message.endswith(f"(nothing in {copy} was changed)"), message
  assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before


def test_a_study_journal_cut_short_keeps_every_record_before_the_cut(grid_sweep, tmp_path):
  """A journal whose last append was cut short (a kill or a full disk mid-write):
  Optuna reads the whole records before the cut, as it does a write still under
  way, so the report lists every trial, and only the cut record's change is lost."""
  workdir, _ = grid_sweep
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  journal = (copy / "study.journal").read_bytes()
  last = journal.rstrip(b"\n").rfind(b"\n") + 1  # where the last record starts
  (copy / "study.journal").write_bytes(journal[:last + (len(journal) - last) // 2])
  result = helpers.cli("report", str(copy), module="genflax.sweep")
  assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
  dropped = (len(journal) - last) // 2  # the half of the last record left in the file
  assert (f"{copy / 'study.journal'}: its last record was cut short ({dropped} bytes"
          in result.stdout), result.stdout
  assert (copy / "study.journal").read_bytes().startswith(journal[:last])  # and appended to
  states = lambda w: {t.number: t.state.name for t in trials(w)}
  whole, cut = states(workdir), states(copy)
  assert sorted(cut) == sorted(whole) == [0, 1, 2, 3]
  changed = {n for n in whole if cut[n] != whole[n]}
  assert len(changed) <= 1 and all(cut[n] == "RUNNING" for n in changed), (whole, cut)
  rows = (copy / "report" / "results.csv").read_text().splitlines()
  assert len(rows) == 5, rows  # a header and the four trials


@pytest.mark.slow
def test_rerunning_a_finished_sweep_runs_nothing_and_another_sweep_is_refused(grid_sweep):
  workdir, _ = grid_sweep
  again = sweep_cli(f"--workdir={workdir}")
  assert again.returncode == 0, again.stderr
  assert "started" not in again.stdout and "4 of 4 trials" in again.stdout
  message = _error(sweep_cli(SMOKE, f"--workdir={workdir}", "--metric=iwae_nll",
                             "--param=model.hidden=[(16,)]"))
  assert "holds another sweep" in message and "params=" in message
  assert len(trials(workdir)) == 4


@pytest.mark.slow
def test_a_killed_sweep_resumes_its_trial_from_the_checkpoint(tmp_path):
  """SIGKILL to the sweep command mid-trial: its worker and trial get SIGTERM (the
  trial saves a checkpoint); the same command then resumes that trial, with no
  trial run twice."""
  args = [SMOKE, f"--workdir={tmp_path}", "--metric=iwae_nll", "--param=seed=[0, 1]",
          "--config.train.num_steps=1500", "--config.train.log_every_steps=100",
          "--config.train.ckpt_every_steps=100", "--config.train.eval_every_steps=1500"]
  proc = subprocess.Popen([sys.executable, "-m", "genflax.sweep", *args], cwd=helpers.ROOT,
                          env=one_device_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  first = tmp_path / "trials" / "0"
  deadline = time.time() + 120
  while not (first / "checkpoints" / "200").exists():  # a committed checkpoint, mid-run
    assert time.time() < deadline and proc.poll() is None, proc.stdout.read()
    time.sleep(0.2)
  proc.kill()
  proc.wait()
  deadline = time.time() + 60  # the trial got SIGTERM from its dying worker
  while "checkpoint saved" not in (first / "log.txt").read_text():
    assert time.time() < deadline, (first / "log.txt").read_text()
    time.sleep(0.2)
  assert [t.state.name for t in trials(tmp_path)] == ["RUNNING"]

  again = sweep_cli(*args)
  assert again.returncode == 0, again.stdout + again.stderr
  assert "trial 0 resumed" in again.stdout
  done = trials(tmp_path)
  assert [t.state.name for t in done] == ["COMPLETE", "COMPLETE"]
  assert sorted(t.params["seed"] for t in done) == [0, 1]
  assert done[0].user_attrs["attempts"] == 2 and done[1].user_attrs["attempts"] == 1
  log = (first / "log.txt").read_text()
  assert "stopped by SIGTERM" in log and "resumed from step" in log
  resumed_at = int(log.split("resumed from step ")[1].split()[0])
  assert resumed_at >= 200
  assert json.load(open(first / "results.json"))["step"] == 1500


@pytest.mark.slow
def test_the_median_pruner_stops_a_clearly_worse_trial(tmp_path):
  """lr=1e-9 hardly trains: at its first evaluation it is worse than the median of
  the two trials before it, and stops there, keeping its checkpoint and metrics."""
  result = sweep_cli(SMOKE, f"--workdir={tmp_path}", "--metric=iwae_nll",
                     "--param=optim.lr=[3e-3, 2e-3, 1e-9]", "--pruner=median",
                     "--pruner_startup_trials=2", "--seed=5",
                     "--config.train.num_steps=16", "--config.train.eval_every_steps=4",
                     "--config.optim.warmup_steps=0")
  assert result.returncode == 0, result.stdout + result.stderr
  done = {t.params["optim.lr"]: t for t in trials(tmp_path)}
  bad = done[1e-9]
  assert bad.number == 2, "the grid order (seed 5) must run lr=1e-9 after the two others"
  assert [done[3e-3].state.name, done[2e-3].state.name, bad.state.name] == [
      "COMPLETE", "COMPLETE", "PRUNED"]
  assert bad.user_attrs["pruned_at_step"] == 4 and list(bad.intermediate_values) == [4]
  assert sorted(done[3e-3].intermediate_values) == [4, 8, 12]
  trial_dir = tmp_path / "trials" / str(bad.number)
  assert os.listdir(trial_dir / "checkpoints") == ["4"] and not (trial_dir / "results.json").exists()
  evals = [json.loads(l) for l in open(trial_dir / "metrics.jsonl") if '"eval"' in l]
  assert [r["step"] for r in evals] == [4]
  assert "pruned at step 4" in result.stdout


# ---- Cluster, database and dashboard

@pytest.mark.slow
def test_slurm_dry_run_prints_the_job_array(tmp_path):
  result = sweep_cli(SMOKE, f"--workdir={tmp_path}", "--metric=iwae_nll", "--param=seed=[0, 1, 2]",
                     "--launcher=slurm", "--workers=3", "--slurm", "partition=gpu",
                     "--slurm", "time=30", "--slurm", "gpus_per_node=1", "--dry_run")
  assert result.returncode == 0, result.stderr
  for line in ("#SBATCH --array=0-2%3", "#SBATCH --partition=gpu", "#SBATCH --time=30",
               "#SBATCH --gpus-per-node=1", "-m submitit.core._submit"):
    assert line in result.stdout
  assert not os.listdir(tmp_path)
  message = _error(sweep_cli(SMOKE, f"--workdir={tmp_path}", "--metric=iwae_nll",
                             "--param=seed=[0]", "--launcher=slurm", "--slurm", "gpus=1", "--dry_run"))
  assert "--slurm gpus=...: not an sbatch setting" in message and "gpus_per_node" in message


@pytest.mark.slow
def test_the_slurm_array_runs_through_submitit_here(tmp_path):
  """The same job array as on a cluster, through submitit's local executor; its two
  workers draw different learning rates from the same seeded random sampler."""
  result = sweep_cli(SMOKE, f"--workdir={tmp_path}", "--metric=iwae_nll",
                     "--param=optim.lr=loguniform(1e-4, 1e-2)", "--sampler=random", "--trials=2",
                     "--launcher=slurm", "--slurm_cluster=local", "--workers=2",
                     "--config.train.num_steps=4")
  assert result.returncode == 0, result.stdout + result.stderr
  assert "submitted 2 workers" in result.stdout
  done = trials(tmp_path)
  assert [t.state.name for t in done] == ["COMPLETE", "COMPLETE"]
  rates = [t.params["optim.lr"] for t in done]
  assert rates[0] != rates[1] and all(1e-4 <= r <= 1e-2 for r in rates)
  for t in done:
    config = json.load(open(tmp_path / "trials" / str(t.number) / "config.json"))
    assert config["optim"]["lr"] == t.params["optim.lr"]  # exactly, through the command line
  logs = "".join(p.read_text() for p in (tmp_path / "slurm").rglob("*_log.out"))
  assert logs.count("trial 0 ") + logs.count("trial 1 ") == 4  # started and complete, each


@pytest.fixture
def postgres():
  """A private PostgreSQL server on a Unix socket in a temporary directory."""
  bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
  if not bins or os.geteuid() != 0 or not shutil.which("runuser"):
    pytest.skip("PostgreSQL's server is not installed here (Debian: apt-get install postgresql), "
                "or the tests do not run as root (the server runs as nobody)")
  d = tempfile.mkdtemp(prefix="genflax_pg_")  # under /tmp: nobody must reach it
  os.chown(d, pwd.getpwnam("nobody").pw_uid, -1)
  run = lambda *a: subprocess.run(["runuser", "-u", "nobody", "--", *a], capture_output=True,
                                  text=True, check=False)
  init = run(f"{bins[-1]}/initdb", "-D", f"{d}/db", "-A", "trust", "-U", "postgres")
  start = run(f"{bins[-1]}/pg_ctl", "-D", f"{d}/db", "-o", f"-k {d} -c listen_addresses=''",
              "-l", f"{d}/log", "-w", "start")
  if start.returncode:
    pytest.skip(f"PostgreSQL did not start: {init.stderr[-300:]} {start.stderr[-300:]}")
  yield f"postgresql://postgres@/postgres?host={d}"
  run(f"{bins[-1]}/pg_ctl", "-D", f"{d}/db", "-m", "immediate", "-w", "stop")
  shutil.rmtree(d, ignore_errors=True)


@pytest.mark.slow
def test_a_postgresql_storage_holds_the_study(postgres, tmp_path):
  """A database study, then continued from the workdir alone with one more trial."""
  result = sweep_cli(SMOKE, f"--workdir={tmp_path}", "--metric=iwae_nll", "--param=seed=int(0, 99)",
                     "--trials=1", f"--storage={postgres}", "--study_name=pg_sweep",
                     "--config.train.num_steps=4")
  assert result.returncode == 0, result.stdout + result.stderr
  more = sweep_cli(f"--workdir={tmp_path}", "--trials=2")
  assert more.returncode == 0, more.stdout + more.stderr
  assert "trial 1 started" in more.stdout and "trial 0" not in more.stdout
  assert not (tmp_path / "study.journal").exists()
  study = optuna.load_study(study_name="pg_sweep", storage=postgres)
  assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "COMPLETE"]
  for t in study.get_trials():
    assert t.value == json.load(open(tmp_path / "trials" / str(t.number) / "results.json"))["iwae_nll"]
  report = helpers.cli("report", str(tmp_path), module="genflax.sweep")
  assert report.returncode == 0 and "2 trials" in report.stdout, report.stderr


@pytest.mark.slow
def test_the_dashboard_shows_the_trials_in_a_browser(grid_sweep):
  chromium = shutil.which("chromium")
  if not chromium:
    pytest.skip("no headless browser: apt-get install chromium (Debian's; CI installs it)")
  workdir, _ = grid_sweep
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = subprocess.Popen([sys.executable, "-m", "genflax.sweep", "dashboard", str(workdir),
                             f"--port={port}"], cwd=helpers.ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
  try:
    assert "optuna-dashboard for" in server.stdout.readline()
    deadline = time.time() + 60
    while True:  # until the server answers
      try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5)
        break
      except OSError:
        assert time.time() < deadline and server.poll() is None
        time.sleep(0.2)
    pages = [subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={workdir}/chromium", "--virtual-time-budget=20000", "--dump-dom",
         f"http://127.0.0.1:{port}/dashboard/studies/0{page}"],
        capture_output=True, text=True, timeout=120, check=False).stdout
             for page in ("", "/trials")]
  finally:
    server.terminate()
    server.wait()
  best = min((t for t in trials(workdir) if t.state.name == "COMPLETE"), key=lambda t: t.value)
  assert f"Best Trial (number={best.number})" in pages[0]  # the study's page
  for t in trials(workdir):  # the trials' list, with their states
    assert f"Trial {t.number}" in pages[1]
  assert "Complete" in pages[1] and "Fail" in pages[1]
