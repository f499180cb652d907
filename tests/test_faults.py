"""Fault injection: runs of each family SIGKILLed again and again, then resumed.

A seeded series of kills per family: some at a random moment of training,
some timed into an asynchronous checkpoint save (while Orbax's temporary
directory exists). After every kill the newest complete checkpoint must be
no older than before; after the last, the run resumes to the end and its
parameters and results.json must equal an uninterrupted run's, bitwise.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from genflax import checkpoints, files, trainer
from tests import helpers

pytestmark = [pytest.mark.fault, pytest.mark.slow]

KILLS = 10
# Each run is killed 1-4 log steps (drawn) after it resumes, or at the save after
# those: at most 5 log steps on. Seeded draws, so the ten kills of each family take
# at most (sum of its draws + 10) log steps: 1,400 steps (vae), 1,440 (gan), 900 (lm).
FAMILIES = {  # config, overrides: long enough for ten kills, saves every log step
    "vae": ("vae_digits", {"train.num_steps": 1600, "train.ckpt_every_steps": 40,
                           "train.log_every_steps": 40, "train.eval_every_steps": 1000}),
    "gan": ("gan_digits", {"train.num_steps": 1600, "train.ckpt_every_steps": 40,
                           "train.log_every_steps": 40, "train.eval_every_steps": 1000}),
    "lm": ("lm_shakespeare", {"train.num_steps": 1000, "train.ckpt_every_steps": 30,
                              "train.log_every_steps": 30, "train.eval_every_steps": 500}),
}


def _env() -> dict:
  """One CPU device (not the tests' 8) with XLA's thread pool at its default size.
  The session's compilation cache (tests/conftest.py) holds the programs: the
  first run of a family writes them, every restart reads them."""
  return helpers.one_device_env(drop=("PJRT_NPROC",))


def _args(name, overrides, workdir):
  return [f"--config=configs/{name}.py:smoke", f"--workdir={workdir}",
          *(f"--config.{k}={v}" for k, v in overrides.items())]


def _saving(directory) -> bool:
  try:
    return any(d.endswith(".orbax-checkpoint-tmp") for d in os.listdir(directory))
  except FileNotFoundError:
    return False


def _kill_once(args, ckpt_dir, rng, env) -> str:
  """Starts the run and SIGKILLs it a few log steps into training: either at once
  or as soon as a checkpoint save is under way. Says where the kill landed
  ("" if the run ended first)."""
  proc = helpers.popen(*args, env=env)
  logs, wanted = 0, rng.randint(1, 4)
  for line in proc.stdout:  # training, `wanted` log steps on from where it resumed
    logs += line.startswith("step ") and "/" in line.split()[1]
    if logs >= wanted:
      break
  into_save = rng.random() < 0.5
  time.sleep(rng.uniform(0, 0.05))  # a random moment within the next steps
  deadline = time.time() + 10
  while into_save and not _saving(ckpt_dir) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.001)  # a save of these small states lasts tens of milliseconds
  where = "during a save" if _saving(ckpt_dir) else "while training"
  if proc.poll() is not None:
    proc.stdout.read()
    return ""
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return where


def _kill_again_and_again(name, overrides, workdir, rng, env):
  """KILLS runs of workdir, each SIGKILLed: (the newest committed step, where each kill landed)."""
  ckpt_dir = workdir / "checkpoints"
  landed, newest = [], 0
  while len(landed) < KILLS:
    where = _kill_once(_args(name, overrides, workdir), ckpt_dir, rng, env)
    assert where, f"the run ended after {len(landed)} kills: lengthen it"
    steps = checkpoints.committed(ckpt_dir)
    latest = steps[-1] if steps else 0
    assert latest >= newest, (where, steps, newest)  # nothing complete was lost
    newest = latest
    landed.append(where)
  return newest, landed


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ten_sigkills_then_resume_equal_an_uninterrupted_run(tmp_path, family):
  name, overrides = FAMILIES[family]
  straight, broken = tmp_path / "straight", tmp_path / "broken"
  log, env = tmp_path / "straight.log", _env()
  with open(log, "w") as out:  # the uninterrupted run, beside the kills: the second core
    uninterrupted = helpers.popen(*_args(name, overrides, straight), stdout=out, env=env)
  try:
    newest, landed = _kill_again_and_again(name, overrides, broken, random.Random(f"faults-{family}"),
                                           env)
    final = helpers.cli(*_args(name, overrides, broken), timeout=900, env=env)
    assert final.returncode == 0, final.stdout + final.stderr
    assert uninterrupted.wait(timeout=900) == 0, log.read_text()
  finally:
    uninterrupted.kill()
  print(f"{family}: {KILLS} SIGKILLs, {landed.count('during a save')} during a save, "
        f"{landed.count('while training')} while training; the last resume began at step "
        f"{newest}")

  assert json.load(open(broken / "results.json")) == json.load(open(straight / "results.json"))
  want = jax.tree.map(np.asarray, trainer.load_run(str(straight))[2])
  got = jax.tree.map(np.asarray, trainer.load_run(str(broken))[2])
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert landed.count("during a save") >= 2


def test_a_run_killed_in_its_final_evaluation_keeps_its_finished_parts(tmp_path):
  """The VAE's final evaluation has two parts (the test split's means, then the image
  metrics of its samples). Killed as soon as the first is on disk, the rerun computes
  only the second, and its results equal an uninterrupted run's."""
  env, straight, broken = _env(), tmp_path / "straight", tmp_path / "broken"
  uninterrupted = helpers.cli(*_args("vae_digits", {}, straight), env=env)
  assert uninterrupted.returncode == 0, uninterrupted.stdout + uninterrupted.stderr
  assert not (straight / trainer.PARTS_FILE).exists()  # results.json holds them all

  proc, parts = helpers.popen(*_args("vae_digits", {}, broken), env=env), broken / trainer.PARTS_FILE
  while proc.poll() is None and not parts.exists():
    time.sleep(0.001)
  assert proc.poll() is None, "the run ended before it could be killed: " + proc.stdout.read()
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert list(json.load(open(parts))["parts"]) == ["means"] and not (broken / "results.json").exists()

  rerun = helpers.cli(*_args("vae_digits", {}, broken), env=env)
  assert rerun.returncode == 0, rerun.stdout + rerun.stderr
  assert "final evaluation: means already done at step" in rerun.stdout, rerun.stdout
  want, got = (json.load(open(d / "results.json")) for d in (straight, broken))
  assert got.pop("train_step_traces") == 0  # the rerun trained no step
  want.pop("train_step_traces")
  assert got == want and {"iwae_nll", "fid"} <= set(got)
  assert not parts.exists()


def test_sigkills_during_small_file_writes_leave_the_old_file_or_the_new(tmp_path):
  """genflax's small files (results, config, sweep.json, reports, samples) all go
  through files.write_atomically. A process rewriting a 200 KB JSON file as fast as
  it can, SIGKILLed ten times at random moments: each time the file reads back
  whole, the version last written or the one before it."""
  path = tmp_path / "results.json"
  script = ("import sys\nfrom genflax import files\ni = int(sys.argv[2])\nwhile True:\n"
            "  files.write_json(sys.argv[1], {'i': i, 'pad': 'x' * 200_000})\n"
            "  print(i, flush=True)\n  i += 1\n")
  rng, written = random.Random("small-writes"), -1
  for _ in range(KILLS):
    proc = subprocess.Popen([sys.executable, "-c", script, str(path), str(written + 1)],
                            cwd=helpers.ROOT, stdout=subprocess.PIPE, text=True)
    first = int(proc.stdout.readline())  # one whole write done; the next under way
    time.sleep(rng.uniform(0, 0.01))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    value = files.read_json(str(path))
    assert value is not None and value["pad"] == "x" * 200_000
    assert value["i"] >= first
    written = value["i"]
  leftovers = [n for n in os.listdir(tmp_path) if n != "results.json"]
  assert all(n.startswith(".results.json.tmp") for n in leftovers), leftovers
