"""`python -m genflax.main`: bad input gives one clear line and status 2."""
import json
import os

import pytest

from genflax import checkpoints, main
from tests import helpers

SMOKE = "--config=configs/vae_digits.py:smoke"


def _error(result) -> str:
  assert result.returncode == 2, result.stdout + result.stderr
  lines = result.stderr.strip().splitlines()
  assert "Traceback" not in result.stderr
  assert lines[-1].startswith("error: ")
  return lines[-1]


FLAG_ERRORS = [
    ([SMOKE, "--workdir=x", "--config.train.num_stepz=3"],
     ["unknown config key 'train.num_stepz'", "did you mean train.num_steps"]),
    ([SMOKE, "--workdir=x", "--config.optim.lr=fast"],
     ["--config.optim.lr='fast' is not a valid float", "the default is 0.001"]),
    ([SMOKE], ["--workdir is missing"]),
    (["--workdir=x"], ["--config is missing"]),
    (["--config=configs/nope.py", "--workdir=x"], ["no file 'configs/nope.py'"]),
    # Values that only the task, the mesh or the batch split can judge.
    ([SMOKE, "--workdir={w}", "--config.model.likelihood=poisson"],
     ["model.likelihood='poisson'", "discretized_gaussian"]),
    ([SMOKE, "--workdir={w}", "--config.task=gflownet"],
     ["task='gflownet'", "'vae'", "'lm'", "'diffusion'"]),
    ([SMOKE, "--workdir={w}", "--config.task=diffusion"],
     ["task='diffusion' reads config key 'loss', which this config lacks"]),
    ([SMOKE, "--workdir={w}", "--config.mesh.data=16"], ["does not fit 8 devices"]),
    ([SMOKE, "--workdir={w}", "--config.mesh.data=3"],
     ["data.batch_size=128 does not split over the mesh's 3 batch shards"]),
    ([SMOKE, "--workdir={w}", "--config.train.microbatches=3"],
     ["train.microbatches=3 does not divide data.batch_size=128"]),
]


@pytest.fixture(scope="module")
def flag_errors(tmp_path_factory):
  """Every FLAG_ERRORS command line, run in a fresh directory."""
  where = tmp_path_factory.mktemp("flag_errors")
  w = where / "w"
  results = [helpers.cli(*(a.format(w=w) for a in args)) for args, _ in FLAG_ERRORS]
  assert not os.path.exists(w) and not os.path.exists(os.path.join(helpers.ROOT, "x"))
  return results


@pytest.mark.parametrize("case", range(len(FLAG_ERRORS)),
                         ids=[" ".join(a[1:]) or a[0] for a, _ in FLAG_ERRORS])
def test_flag_and_value_errors(flag_errors, case):
  message = _error(flag_errors[case])
  for text in FLAG_ERRORS[case][1]:
    assert text in message


def test_dataset_not_prepared(tmp_path):
  message = _error(helpers.cli(SMOKE, f"--workdir={tmp_path / 'w'}", "--config.data.name=mnist",
                               f"--config.data.data_dir={tmp_path / 'tfds'}"))
  assert "'mnist' is not prepared" in message
  assert str(tmp_path / "tfds" / "mnist") in message and "tfds build mnist" in message


@pytest.mark.slow
def test_foreign_workdir_is_refused_and_left_intact(tmp_path):
  workdir = str(tmp_path)
  first = helpers.cli(SMOKE, f"--workdir={workdir}")
  assert first.returncode == 0, first.stderr
  before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  config_before = (tmp_path / "config.json").read_text()
  message = _error(helpers.cli("--config=configs/cvae_digits.py:smoke", f"--workdir={workdir}"))
  assert "another experiment" in message and "model.conditional=False there, True here" in message
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
  assert (tmp_path / "config.json").read_text() == config_before
  # The same experiment with a longer schedule is not foreign: it resumes.
  longer = helpers.cli(SMOKE, f"--workdir={workdir}", "--config.train.num_steps=16")
  assert longer.returncode == 0, longer.stderr
  assert "resumed from step 12" in longer.stdout


def test_how_the_gradient_is_computed_is_not_part_of_the_experiment():
  """A workdir written with model.dense_grads=xla (or before the key existed) resumes
  with row_major: the same model, computed another way."""
  def ident(**overrides):
    config = helpers.config("lm_shakespeare", "smoke", **overrides)
    return checkpoints.identity(json.loads(config.to_json_best_effort()))

  ours = ident(**{"model.dense_grads": "row_major"})
  assert ours == ident(**{"model.dense_grads": "xla"})
  assert "model.variant" in ours and "model.dense_grads" not in ours
  assert ours != ident(**{"model.variant": "nano"})


@pytest.mark.slow
def test_cpu_devices_splits_the_host_unless_the_environment_says(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = helpers.cli(SMOKE, f"--workdir={tmp_path / 'a'}", "--config.cpu_devices=2",
                       "--config.train.num_steps=2", env=env)
  assert result.returncode == 0, result.stderr
  assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1} over 2 cpu devices" in result.stdout
  # The tests' own XLA_FLAGS (8 devices) take precedence over the config.
  result = helpers.cli(SMOKE, f"--workdir={tmp_path / 'b'}", "--config.cpu_devices=2",
                       "--config.train.num_steps=2")
  assert result.returncode == 0, result.stderr
  assert "over 8 cpu devices" in result.stdout


@pytest.mark.parametrize("devices, cached, preset, want", [
    (8, True, {}, str(max(16 * 8, main.usable_cores()))),  # 16 threads a device
    (8, True, {"NPROC": "4"}, None),       # the environment's size wins
    (8, True, {"PJRT_NPROC": "4"}, "4"),
    (8, False, {}, None),                  # compiled afresh: collectives in order
    (0, True, {}, None),                   # one device: nothing to wait for
])
def test_a_split_host_reading_compiled_programs_gets_a_pool_for_their_collectives(
    monkeypatch, devices, cached, preset, want):
  for name in ("PJRT_NPROC", "NPROC", "JAX_COMPILATION_CACHE_DIR", "XLA_FLAGS"):
    monkeypatch.delenv(name, raising=False)
  if devices:
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count={devices}")
  if cached:
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/tmp/cache")
  for name, value in preset.items():
    monkeypatch.setenv(name, value)
  main.size_cpu_pool()
  assert os.environ.get("PJRT_NPROC") == want


@pytest.mark.slow
def test_a_second_run_in_the_same_workdir_is_refused_until_the_first_is_gone(tmp_path):
  args = [SMOKE, f"--workdir={tmp_path}", "--config.train.num_steps=1000000",
          "--config.train.log_every_steps=1000", "--config.train.ckpt_every_steps=1000",
          "--config.train.eval_every_steps=1000000"]
  first = helpers.popen(*args)
  for line in first.stdout:  # training has started: the lock is held
    if "compiled and ran" in line:
      break
  message = _error(helpers.cli(*args))
  assert "is in use by another run" in message and f"process {first.pid} on " in message
  for damaged in (b"", b'{"pid": 12', os.urandom(40), b"[1, 2, 3]"):  # who holds it: unknown
    (tmp_path / "run.owner").write_bytes(damaged)
    message = _error(helpers.cli(*args))
    assert "is in use by another run (a process that has not said who it is yet)" in message
  first.kill()  # no clean exit: the kernel frees the lock
  first.wait()
  again = helpers.cli(SMOKE, f"--workdir={tmp_path}", "--config.train.num_steps=4")
  assert again.returncode == 0, again.stdout + again.stderr


@pytest.mark.slow
@pytest.mark.parametrize("make", ["workdir_file", "checkpoints_file"])
def test_a_workdir_that_cannot_hold_checkpoints_is_refused_before_any_step(tmp_path, make):
  workdir = tmp_path / "w"
  if make == "workdir_file":
    workdir.write_text("not a directory")
    bad = workdir
  else:
    workdir.mkdir()
    (workdir / "checkpoints").write_text("not a directory")
    bad = workdir / "checkpoints"
  message = _error(helpers.cli(SMOKE, f"--workdir={workdir}"))
  assert f"{bad} is a file, not a directory" in message
  assert bad.read_text() == "not a directory"
