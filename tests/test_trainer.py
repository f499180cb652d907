"""The shared training loop: outputs, compile-once, resume, signals, NaN, sharding."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from genflax import checkpoints, checks, data, evaluation, optim, sharding, tasks, trainer
from genflax.data import fashion_mnist
from genflax.tasks import vae
from genflax.errors import ConfigError
from tests import helpers


def _params(workdir: str):
  """(step, VAE parameters as numpy) of a workdir's latest checkpoint, on one device."""
  _, _, state, step = trainer.load_run(workdir)
  return step, jax.tree.map(np.asarray, state["params"])


def _read_until(proc, text: str) -> list[str]:
  """Lines of a running process's output up to the first that contains `text`."""
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if text in line:
      return lines
  raise AssertionError(f"process ended before printing {text!r}:\n{''.join(lines)}")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("smoke"))
  return workdir, trainer.train(helpers.config("vae_digits"), workdir)


def test_run_writes_metrics_images_checkpoints_and_config(smoke_run):
  workdir, results = smoke_run
  helpers.assert_smoke_ran(results)
  assert results["step"] == 12
  assert results["neg_elbo"] > 0 and results["iwae_nll"] > 0
  # The prior samples scored as every image family's are (120 of them at the end).
  assert results["fid_floor"] < results["fid"] < 1e4 and 0 <= results["recall"] <= 1
  assert sum(results[f"class_share_{k}"] for k in range(10)) == pytest.approx(1.0)
  assert json.load(open(os.path.join(workdir, "results.json")))["step"] == 12
  config = json.load(open(os.path.join(workdir, "config.json")))
  assert config["task"] == "vae" and config["train"]["num_steps"] == 12
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train_rows = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train_rows] == [4, 8, 12]
  for key in ("loss", "rec", "kl", "lr", "steps_per_s", "examples_per_s"):
    assert np.isfinite(train_rows[-1][key])
  # The learning rate logged at step 4 is the one its update (the 4th, count 3) used.
  schedule = optim.schedule(helpers.config("vae_digits").optim, 12)
  assert [r["lr"] for r in train_rows] == pytest.approx([float(schedule(s - 1)) for s in (4, 8, 12)])
  assert [r["step"] for r in rows if r["split"] == "eval"] == [8]
  assert [r["step"] for r in rows if r["split"] == "final"] == [12]
  for name in ("reconstructions", "samples", "interpolations"):
    assert os.path.exists(os.path.join(workdir, "images", f"{name}_0000012.png"))
  # Checkpoints at the interval and at the end.
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "8"]


def test_tensorboard_reads_the_event_files(smoke_run):
  workdir, _ = smoke_run
  acc = event_accumulator.EventAccumulator(os.path.join(workdir, "tb"))
  acc.Reload()
  assert [e.step for e in acc.Scalars("train/loss")] == [4, 8, 12]
  assert [e.step for e in acc.Scalars("final/neg_elbo")] == [12]
  assert "samples" in acc.Tags()["images"]


def test_train_step_compiles_once(smoke_run):
  # The smoke run logs, evaluates and checkpoints between steps.
  _, results = smoke_run
  assert results["train_step_traces"] == 1


def test_rerun_of_a_finished_run_keeps_its_results(smoke_run):
  workdir, results = smoke_run
  again = trainer.train(helpers.config("vae_digits"), workdir)
  assert again == json.load(open(os.path.join(workdir, "results.json")))
  assert again["neg_elbo"] == results["neg_elbo"]


@pytest.mark.slow
def test_interrupted_runs_resume_bitwise(tmp_path):
  """SIGTERM, then SIGKILL, then resume: parameters equal an uninterrupted run."""
  overrides = {"train.num_steps": 40, "train.ckpt_every_steps": 5,
               "train.log_every_steps": 1, "train.eval_every_steps": 1000}
  straight = str(tmp_path / "straight")
  trainer.train(helpers.config("vae_digits", **overrides), straight)

  broken = str(tmp_path / "broken")
  args = ["--config=configs/vae_digits.py:smoke", f"--workdir={broken}"] + [
      f"--config.{k}={v}" for k, v in overrides.items()]
  # SIGTERM: a clean stop with a checkpoint at the step it stopped. A second
  # SIGTERM (a dying parent sends one per thread) does not cut that save short.
  proc = helpers.popen(*args)
  _read_until(proc, "step 11/40")
  proc.send_signal(signal.SIGTERM)
  _read_until(proc, "SIGTERM received")
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == 0, out
  stopped = int(out.split("stopped by SIGTERM at step ")[1].split(";")[0])
  assert stopped >= 11 and _params(broken)[0] == stopped
  # SIGKILL: no chance to save; the last completed checkpoint survives.
  proc = helpers.popen(*args)
  lines = _read_until(proc, "step 30/40")
  proc.kill()
  proc.wait()
  assert f"resumed from step {stopped}" in "".join(lines)
  # Resume to the end.
  done = helpers.cli(*args)
  assert done.returncode == 0, done.stdout + done.stderr
  # Saving step 25 waited for step 20's save to finish: 20 at least was complete.
  resumed_from = int(done.stdout.split("resumed from step ")[1].split()[0])
  assert resumed_from >= 20

  step, want = _params(straight)
  assert step == 40
  got = _params(broken)[1]
  jax.tree.map(np.testing.assert_array_equal, got, want)
  # metrics.jsonl reads as one run: no replayed rows, nothing missing.
  assert _history(broken) == _history(straight)


def _history(workdir: str) -> list[tuple[str, int]]:
  return [(r["split"], r["step"]) for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))]


@pytest.mark.slow
def test_a_resumed_run_redoes_the_eval_its_checkpoint_step_missed(tmp_path):
  """Killed between the save at step 10 and its eval: the resumed run evaluates
  step 10 first; rows written after the checkpoint (and a torn line) are dropped."""
  overrides = {"train.num_steps": 20, "train.ckpt_every_steps": 10, "train.eval_every_steps": 10,
               "train.log_every_steps": 5}
  straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
  trainer.train(helpers.config("vae_digits", **overrides), straight)
  shutil.copytree(straight, broken)
  shutil.rmtree(os.path.join(broken, "checkpoints", "20"))  # as if killed after the save at 10
  os.remove(os.path.join(broken, "results.json"))
  rows = [json.loads(l) for l in open(os.path.join(broken, "metrics.jsonl"))]
  with open(os.path.join(broken, "metrics.jsonl"), "w") as f:
    for r in rows:
      if not (r["split"] == "eval" and r["step"] == 10):
        f.write(json.dumps(r) + "\n")  # the train rows of 15 and 20, and the final one, stay
    f.write('{"step": 16, "split": "tr')  # torn by the kill
  resumed = trainer.train(helpers.config("vae_digits", **overrides), broken)
  assert _history(broken) == _history(straight)
  assert resumed == json.load(open(os.path.join(straight, "results.json")))
  evals = [json.loads(l) for l in open(os.path.join(broken, "metrics.jsonl")) if '"eval"' in l]
  assert evals == [r for r in rows if r["split"] == "eval"]


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
  workdir = str(tmp_path)
  trainer.train(helpers.config("vae_digits", **{"train.num_steps": 8}), workdir)
  before = _params(workdir)
  # Resume with an absurd learning rate: the parameters overflow in a step or two.
  result = helpers.cli("--config=configs/vae_digits.py:smoke", f"--workdir={workdir}",
                       "--config.train.num_steps=16", "--config.optim.lr=1e30",
                       "--config.optim.warmup_steps=0", "--config.optim.schedule=constant")
  assert result.returncode == 2
  message = result.stderr.strip().splitlines()[-1]
  assert message.startswith("error: ") and " at step " in message
  assert f"the newest complete checkpoint is step 8 in {workdir}/checkpoints" in message
  step = int(message.split(" at step ")[1].split(";")[0])
  assert 9 <= step <= 16
  after = _params(workdir)
  assert after[0] == 8
  jax.tree.map(np.testing.assert_array_equal, after[1], before[1])


@pytest.mark.slow
def test_a_non_finite_loss_before_any_checkpoint_names_none(tmp_path):
  result = helpers.cli("--config=configs/vae_digits.py:smoke", f"--workdir={tmp_path}",
                       "--config.optim.lr=1e30", "--config.optim.warmup_steps=0",
                       "--config.optim.schedule=constant")
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert "no checkpoint has been saved yet" in result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_an_error_right_after_a_save_still_commits_it(tmp_path):
  """The eval after the save at step 8 fails: the save in flight is waited for."""
  def fail(step, values):
    raise RuntimeError(f"eval hook failed at {step}")
  config = helpers.config("vae_digits", **{"train.num_steps": 12, "train.eval_every_steps": 8})
  with pytest.raises(RuntimeError, match="failed at 8"):
    trainer.train(config, str(tmp_path), on_eval=fail)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["8"]  # committed, no tmp left
  assert _params(str(tmp_path))[0] == 8


def _long_run(workdir):
  return helpers.popen("--config=configs/vae_digits.py:smoke", f"--workdir={workdir}",
                       "--config.train.num_steps=1000000", "--config.train.log_every_steps=500",
                       "--config.train.ckpt_every_steps=500", "--config.train.eval_every_steps=1000000")


def _wait_for(path, proc):
  for _ in range(1200):
    if os.path.exists(path) or proc.poll() is not None:
      return
    time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["read_only", "full"])
def test_a_save_that_fails_stops_the_run_in_one_line_and_keeps_the_last_checkpoint(
    tmp_path, how, request):
  """The checkpoints made immutable (chattr +i), or the disk full (a small tmpfs):
  the next save fails (in Orbax's background thread); the run stops at once with
  one line naming the cause and the newest complete checkpoint, no hang."""
  workdir = tmp_path / "w"
  if how == "full":
    workdir.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(workdir)],
                      capture_output=True, check=False).returncode:
      pytest.skip("cannot mount a small tmpfs here: run the tests as root, where mount is allowed")
    request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(workdir)], check=False))
  proc = _long_run(workdir)
  try:
    _wait_for(workdir / "checkpoints" / "500", proc)
    if how == "read_only":
      if subprocess.run(["chattr", "+i", str(workdir / "checkpoints")], capture_output=True,
                        check=False).returncode:
        proc.kill()
        pytest.skip("chattr +i does not work here: run the tests as root, with the temporary "
                    "directory on ext2/3/4 (chattr is in e2fsprogs)")
    else:
      subprocess.run(["dd", "if=/dev/zero", f"of={workdir}/fill", "bs=64k"], capture_output=True,
                     check=False)
    out = proc.communicate(timeout=180)[0]
  finally:
    subprocess.run(["chattr", "-i", str(workdir / "checkpoints")], capture_output=True, check=False)
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 2, out
  assert "Traceback" not in out
  last = out.strip().splitlines()[-1]
  assert last.startswith("error: ")
  # Full: the next write fails, the checkpoint's or the metrics' (which come first).
  assert ("Operation not permitted" if how == "read_only" else "No space left on device") in last
  assert f"the newest complete checkpoint is step 500 in {workdir}/checkpoints" in last
  if how == "full":
    os.remove(workdir / "fill")
  assert _params(str(workdir))[0] == 500


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["cut_data", "lost_metadata", "lost_manifest", "lost_meta"])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_one_before_resumes(tmp_path, damage):
  workdir = tmp_path
  trainer.train(helpers.config("vae_digits"), str(workdir))  # checkpoints 8 and 12
  want = json.load(open(workdir / "results.json"))
  os.remove(workdir / "results.json")
  state = workdir / "checkpoints" / "12" / "state"
  if damage == "cut_data":  # every data file cut in half: which arrays share a file varies
    for data_file in (state / "ocdbt.process_0" / "d").iterdir():
      os.truncate(data_file, data_file.stat().st_size // 2)
  elif damage == "lost_metadata":
    os.remove(state / "_METADATA")
  elif damage == "lost_manifest":
    os.remove(state / "manifest.ocdbt")
    os.remove(state / "ocdbt.process_0" / "manifest.ocdbt")
  else:
    os.remove(workdir / "checkpoints" / "12" / "meta" / "metadata")
  result = helpers.cli("--config=configs/vae_digits.py:smoke", f"--workdir={workdir}")
  assert result.returncode == 0, result.stdout + result.stderr
  assert "Traceback" not in result.stdout + result.stderr
  named = [l for l in result.stdout.splitlines() if "is unreadable" in l]
  assert len(named) == 1 and named[0].startswith(f"checkpoint 12 in {workdir}/checkpoints")
  assert f"set aside as {workdir}/checkpoints/12.unreadable" in named[0]
  assert "resumed from step 8" in result.stdout
  assert json.load(open(workdir / "results.json")) == want  # 8 -> 12 again, bitwise
  assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "12.unreadable", "8"]


@pytest.mark.slow
def test_with_no_readable_checkpoint_the_run_refuses_and_says_how_to_start_afresh(tmp_path):
  trainer.train(helpers.config("vae_digits", **{"train.num_steps": 8}), str(tmp_path))
  os.remove(tmp_path / "results.json")
  os.remove(tmp_path / "checkpoints" / "8" / "state" / "_METADATA")
  args = ["--config=configs/vae_digits.py:smoke", f"--workdir={tmp_path}", "--config.train.num_steps=8"]
  for _ in range(2):  # and again, with the checkpoint already set aside
    result = helpers.cli(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: no readable checkpoint in {tmp_path}/checkpoints")
    assert f"move {tmp_path}/checkpoints away" in last
  shutil.move(tmp_path / "checkpoints", tmp_path / "old")
  assert helpers.cli(*args).returncode == 0


def test_one_process_saves_replicated_arrays_without_compiling(tmp_path):
  """Orbax's replica-parallel save has each of the 8 replicas write a slice,
  compiling a slicing program per array and device (seconds of a run's first
  save); within one process each array is written whole, from one device."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = {f"w{i}": jax.device_put(np.arange(8 * (i + 1) * 16, dtype=np.float32).reshape(-1, 16),
                                   replicated) for i in range(3)}
  compiles = []

  def listener(event, duration, **_):
    del duration
    compiles.extend([event] if event == "/jax/core/compile/backend_compile_duration" else [])

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    mngr = checkpoints.manager(str(tmp_path))
    checkpoints.save(mngr, 1, state, {"step": 1})
    mngr.wait_until_finished()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not compiles, compiles
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          state)
  restored, meta = checkpoints.restore(mngr, abstract)
  assert meta["step"] == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))


@pytest.mark.slow
def test_sharded_over_8_devices_equals_one_device(tmp_path):
  assert jax.device_count() == 8
  runs = {}
  for data_axis in (1, 8):
    workdir = str(tmp_path / f"data{data_axis}")
    config = helpers.config("vae_digits", **{"mesh.data": data_axis, "eval.batch_size": 40,
                                             "train.eval_every_steps": 1000})
    runs[data_axis] = trainer.train(config, workdir)
    runs[data_axis]["params"] = _params(workdir)[1]
  # The same maths with the batch split 8 ways: equal up to summation order.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               runs[1]["params"], runs[8]["params"])
  assert runs[8]["neg_elbo"] == pytest.approx(runs[1]["neg_elbo"], rel=1e-4)


@pytest.mark.slow
def test_batches_gathered_on_the_devices_train_like_batches_from_the_host(tmp_path):
  params = {}
  for mb in (0, 256):
    workdir = str(tmp_path / f"on_device_mb{mb}")
    trainer.train(helpers.config("vae_digits", **{"data.on_device_mb": mb}), workdir)
    params[mb] = _params(workdir)[1]
  jax.tree.map(np.testing.assert_array_equal, params[0], params[256])


# Trained by module fixtures instead, whose tests check the same: vae_digits by
# smoke_run here, lm_shakespeare by tests/test_lm.py's smoke_run, diffusion_digits
# (conditional) by tests/test_diffusion.py's conditional_runs.
SMOKE_RUN_ELSEWHERE = ("vae_digits", "lm_shakespeare", "diffusion_digits")


@pytest.mark.slow
@pytest.mark.parametrize("name,arg", [(n, "smoke") for n in helpers.CONFIGS
                                      if n not in SMOKE_RUN_ELSEWHERE] + [("vae_digits", "conv,smoke")])
def test_every_config_smoke_variant_trains(tmp_path, name, arg):
  overrides = {}
  if name == "dcgan_mnist":  # any MNIST-format files: here 2,000 + 500 of Debian's Fashion-MNIST
    if not os.path.isdir(fashion_mnist.DEFAULT_DIR):
      pytest.skip(f"dcgan_mnist needs MNIST-format IDX files; none in {fashion_mnist.DEFAULT_DIR}: "
                  "apt-get install dataset-fashion-mnist (Debian's; CI installs it)")
    overrides["data.idx_dir"] = helpers.idx_subset(fashion_mnist.DEFAULT_DIR, tmp_path / "idx",
                                                   2000, 500)
  try:
    results = trainer.train(helpers.config(name, arg, **overrides), str(tmp_path))
  except data.DatasetNotPreparedError as e:  # catalogue data (MNIST...) is never downloaded
    pytest.skip(str(e))
  helpers.assert_smoke_ran(results)


def test_sample_cli_writes_a_grid_from_the_latest_checkpoint(smoke_run, tmp_path):
  workdir, _ = smoke_run
  out = tmp_path / "grid.png"
  result = helpers.cli("--workdir", workdir, "--num", "16", "--out", str(out),
                       module="genflax.sample")
  assert result.returncode == 0, result.stderr
  assert "step 12" in result.stdout
  picture = np.asarray(Image.open(out))
  assert picture.shape[0] > 0 and picture.std() > 0  # two rows of 8, not blank
  # A conditional-only flag on an unconditional model is a clear error.
  result = helpers.cli("--workdir", workdir, "--label", "3", "--out", str(out),
                       module="genflax.sample")
  assert result.returncode == 2 and "--label needs a conditional model" in result.stderr
  # An --out that cannot be written is refused before sampling.
  result = helpers.cli("--workdir", workdir, "--out", str(out / "x.png"), module="genflax.sample")
  assert result.returncode == 2 and result.stderr.strip() == (
      f"error: --out {out / 'x.png'}: its folder {out} is a file, not a folder: name another")
  # As data, in folders made for it: the decoder's mean images, as the run's API draws them.
  out = tmp_path / "new" / "folder" / "samples.npz"
  images = helpers.sample_arrays(workdir, out, 250, "--seed", "5")["images"]
  _, setup, state, _ = trainer.load_run(workdir)
  want = vae.generate_images(setup, state["params"], 250, jax.random.PRNGKey(5))
  np.testing.assert_array_equal(images, np.rint((want + 1) / 2 * 16))
  assert os.listdir(out.parent) == ["samples.npz"]  # no temporary file left



def _launch_two(args, workdir):
  """Two local processes of `genflax.main ARGS` joined by jax.distributed, 2 CPU devices each."""
  # Compiled afresh: a program read from JAX's cache may run its cross-process
  # collectives in another order in each process (tests/conftest.py).
  env = {**{k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"},
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  return [subprocess.Popen(
      [sys.executable, "-m", "genflax.main", *args, f"--workdir={workdir}",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=helpers.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]


def _both_finish(procs) -> list[str]:
  """The two processes' outputs, once both exit 0. Printed, so that a failure
  shows both in full (an assertion message is cut short)."""
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for i, out in enumerate(outs):
    print(f"---- process {i}:\n{out}")
  assert [p.returncode for p in procs] == [0, 0]
  return outs


def _assert_two_trained_like_one(args, tmp_path, key, rel):
  """tmp_path/two (two processes, 2 devices each) ends as one process with 4
  devices ends on `args`: parameters, and results.json's `key` within `rel`."""
  one = helpers.cli(*args, f"--workdir={tmp_path / 'one'}",
                    env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert one.returncode == 0, one.stderr
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               _params(str(tmp_path / "two"))[1], _params(str(tmp_path / "one"))[1])
  if key:
    two_results = json.load(open(tmp_path / "two" / "results.json"))
    one_results = json.load(open(tmp_path / "one" / "results.json"))
    assert two_results[key] == pytest.approx(one_results[key], rel=rel)


def test_the_stop_signals_ride_the_steps_own_all_reduce(tmp_path):
  """Over 8 devices (data 4 x fsdp 2) the signalled step compiles to as many
  all-reduces as the plain one, returns each process's signal summed over the
  devices, and trains the same state."""
  config = helpers.config("vae_digits", **{"mesh.data": 4, "mesh.fsdp": 2})
  run = trainer.build(config, str(tmp_path))
  state = tasks.run_once(run.init, *tasks.run_keys(0), out_shardings=run.state_sh)
  inputs = run.feed.inputs(0)
  rows = np.zeros((8, 1), np.float32)
  rows[0, 0] = signal.SIGTERM
  signals = jax.device_put(rows, trainer.signals_sharding(run.feed.batch_sharding.mesh))
  plain = run.train_step.lower(state, inputs).compile()
  signalled = run.signalled_step.lower(state, inputs, signals).compile()
  count = lambda step: len(re.findall(r" all-reduce(?:-start)?\(", step.as_text()))
  assert count(plain) >= 1 and count(signalled) == count(plain)

  state_a, metrics_a = plain(jax.tree.map(jnp.copy, state), inputs)
  state_b, metrics_b = signalled(state, inputs, signals)
  np.testing.assert_array_equal(metrics_b.pop(trainer.SIGNALS), [float(signal.SIGTERM)])
  jax.tree.map(np.testing.assert_array_equal, (state_b, metrics_b), (state_a, metrics_a))


@pytest.mark.slow
def test_two_processes_train_like_one_through_a_sigterm_and_a_damaged_checkpoint(tmp_path):
  """jax.distributed over two local processes (2 CPU devices each) vs one process with 4.

  SIGTERM reaches process 1 only: both stop at the same step, two or three
  steps after the signal (it rides the steps), and save its checkpoint; run again, they finish like
  the uninterrupted single process. Then the newest checkpoint's data files
  are cut in half: both processes call it unreadable, process 0 moves it
  aside, both resume from the one before and finish as the undamaged run did.
  """
  args = ["--config=configs/vae_digits.py:smoke", "--config.train.num_steps=150",
          "--config.train.eval_every_steps=1000", "--config.train.ckpt_every_steps=140"]
  workdir = tmp_path / "two"
  launch = lambda: _launch_two(args, workdir)

  procs = launch()
  first = _read_until(procs[0], "train step compiled")
  procs[1].send_signal(signal.SIGTERM)
  outs = _both_finish(procs)
  assert "4 cpu devices, 2 process(es)" in "".join(first)
  stopped = int(outs[0].split("stopped by SIGTERM (process 1) at step ")[1].split(";")[0])
  received = int(outs[1].split("SIGTERM received by process 1 at step ")[1].split()[0])
  assert 0 < stopped < 140 and 2 <= stopped - received <= 3  # all stop within three steps
  assert _params(str(workdir))[0] == stopped

  procs = launch()
  outs = _both_finish(procs)
  assert f"resumed from step {stopped}" in outs[0]
  assert "final eval" in outs[0] and "final eval" not in outs[1]  # process 0 reports
  _assert_two_trained_like_one(args, tmp_path, "neg_elbo", 1e-5)

  want = json.load(open(workdir / "results.json"))
  os.remove(workdir / "results.json")
  for data_file in (workdir / "checkpoints" / "150" / "state").glob("ocdbt.process_*/d/*"):
    os.truncate(data_file, data_file.stat().st_size // 2)  # each cut in half
  outs = _both_finish(launch())
  assert "Traceback" not in "".join(outs)
  assert "checkpoint 150" in outs[0] and "set aside as" in outs[0]
  assert "resumed from step 140" in outs[0]
  assert sorted(os.listdir(workdir / "checkpoints")) == sorted(
      [str(stopped), "140", "150", "150.unreadable"])
  assert json.load(open(workdir / "results.json")) == want


@pytest.mark.slow
@pytest.mark.parametrize("how", ["flat", "reduce_scatter"])
def test_two_processes_with_one_flat_collective_train_like_one(tmp_path, how):
  """train.grad_allreduce=flat|reduce_scatter across processes (gloo): the
  gradient as one buffer per step, the same shards, so the same randomness,
  as one process with 4 devices."""
  args = ["--config=configs/vae_digits.py:smoke", "--config.train.num_steps=40",
          "--config.train.eval_every_steps=1000", f"--config.train.grad_allreduce={how}"]
  procs = _launch_two(args, tmp_path / "two")
  outs = _both_finish(procs)
  assert "4 cpu devices, 2 process(es)" in outs[0]
  _assert_two_trained_like_one(args, tmp_path, None, None)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gan_digits", "lm_shakespeare"])
def test_two_processes_train_the_gan_and_the_lm_like_one(tmp_path, name):
  """The GAN's feature network and the LM's tokenizer are made once, by
  process 0, in a fresh data dir / workdir; parameters and final metrics equal
  one process's with 4 devices."""
  features = tmp_path / "features"  # the GAN's feature network, trained here once
  args = [f"--config=configs/{name}.py:smoke", "--config.train.num_steps=16",
          f"--config.data.data_dir={features}", "--config.eval.feature_steps=50"
          ] if name == "gan_digits" else [
          f"--config=configs/{name}.py:smoke", "--config.train.num_steps=16"]
  procs = _launch_two(args, tmp_path / "two")
  outs = _both_finish(procs)
  assert "4 cpu devices, 2 process(es)" in outs[0] and "Traceback" not in "".join(outs)
  if name == "gan_digits":
    assert len(os.listdir(features / "genflax_features")) == 1  # one network, no leftovers
  else:
    assert sorted(os.listdir(tmp_path / "two" / "tokenizer")) == ["chars.json"]
  _assert_two_trained_like_one(args, tmp_path, "fid" if name == "gan_digits" else "loss", 1e-4)


def test_microbatched_gradients_average_the_pieces_and_fold_their_rng():
  """optim.grads with M microbatches: the one-pass gradient and means for a
  row-mean loss; microbatch m draws from fold_in(rng, m) and holds rows m::M."""
  x = np.random.default_rng(0).normal(size=(12, 3)).astype(np.float32)
  params = {"w": np.ones(3, np.float32)}

  def loss_fn(p, batch, rng):
    loss = jax.numpy.mean((batch["x"] @ p["w"]) ** 2)
    return loss, {"loss": loss, "noise": jax.random.uniform(rng), "first": batch["x"][0, 0]}

  rng = jax.random.PRNGKey(7)
  want_grads, want = optim.grads(loss_fn, params, {"x": x}, rng)
  got_grads, got = jax.jit(optim.grads, static_argnums=(0, 4))(loss_fn, params, {"x": x}, rng, 4)
  np.testing.assert_allclose(got_grads["w"], want_grads["w"], rtol=1e-6)
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
  noise = np.mean([jax.random.uniform(jax.random.fold_in(rng, m)) for m in range(4)])
  np.testing.assert_allclose(got["noise"], noise, rtol=1e-6)
  np.testing.assert_allclose(got["first"], x[:4, 0].mean(), rtol=1e-6)  # rows 0, 1, 2, 3


def _allreduced_arrays(hlo_text: str) -> list[list[str]]:
  """The array types each all-reduce of a compiled program reduces, e.g. [["f32[300]", "f32[]"]]."""
  ops = [line.split("=", 1)[1].split(" all-reduce(")[0] for line in hlo_text.splitlines()
         if " all-reduce(" in line]
  return [re.findall(r"\w+\[[\d,]*\]", op) for op in ops]


@pytest.mark.slow
def test_flat_allreduce_averages_the_devices_gradients_in_one_buffer():
  """train.grad_allreduce=flat on 8 devices (4 batch rows each, 2 microbatches):
  the one-device gradient and means; one all-reduce of one gradient buffer
  (plus the aux means); device d draws from fold_in(rng, d)."""
  x = np.random.default_rng(0).normal(size=(32, 3)).astype(np.float32)
  params = {"w": np.ones((3, 5), np.float32), "b": np.zeros(5, np.float32)}
  mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})

  def loss_fn(p, batch, rng):
    loss = jax.numpy.mean((batch["x"] @ p["w"] + p["b"][None]) ** 2)
    return loss, {"loss": loss, "noise": jax.random.uniform(rng)}

  rng = jax.random.PRNGKey(7)
  want_grads, want = optim.grads(loss_fn, params, {"x": x}, rng)
  flat = jax.jit(optim.grads, static_argnums=(0, 4, 5))
  batch = sharding.put_batch({"x": x}, sharding.batch_sharding(mesh))
  got_grads, got = flat(loss_fn, params, batch, rng, 2, mesh)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), got_grads, want_grads)
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
  noise = np.mean([jax.random.uniform(jax.random.fold_in(jax.random.fold_in(rng, d), m))
                   for d in range(8) for m in range(2)])
  np.testing.assert_allclose(got["noise"], noise, rtol=1e-6)

  flat_hlo = flat.lower(loss_fn, params, batch, rng, 2, mesh).compile().as_text()
  assert _allreduced_arrays(flat_hlo) == [["f32[20]", "f32[]", "f32[]"]]
  per_param = jax.jit(optim.grads, static_argnums=(0, 4)).lower(loss_fn, params, batch, rng, 2)
  arrays = sum(_allreduced_arrays(per_param.compile().as_text()), [])
  assert len([a for a in arrays if a != "f32[]"]) == 2  # w and b, each its own buffer


def test_flat_allreduce_needs_replicated_parameters():
  config = helpers.config("vae_digits", **{"train.grad_allreduce": "flat", "mesh.data": 4,
                                           "mesh.fsdp": 2})
  with pytest.raises(ConfigError, match=r"grad_allreduce=flat needs parameters replicated .* "
                                        r"use mesh.fsdp=1 and mesh.tensor=1"):
    trainer.check_step(config, sharding.make_mesh(config.mesh))
  config = helpers.config("vae_digits", **{"train.grad_allreduce": "ring"})
  with pytest.raises(ConfigError, match=r"train.grad_allreduce='ring': expected one of "
                                        r"\('auto', 'per_param', 'flat', 'reduce_scatter'\)"):
    checks.config(config, trainer.load_task("vae"))
  config = helpers.config("vae_digits", **{"train.grad_allreduce": "reduce_scatter",
                                           "mesh.data": 3})
  with pytest.raises(ConfigError, match=r"over the 3 batch shards .* which must divide 1024"):
    trainer.check_step(config, sharding.make_mesh(config.mesh))


@pytest.mark.slow
def test_reduce_scatter_runs_resume_like_uninterrupted_ones(tmp_path):
  """train.grad_allreduce=reduce_scatter on 8 devices: the optimizer state is
  split over them, checkpointed and restored so; 8 + 8 steps equal 16."""
  overrides = {"train.grad_allreduce": "reduce_scatter", "mesh.data": 8,
               "train.eval_every_steps": 1000, "train.ckpt_every_steps": 8,
               "optim.schedule": "constant"}  # the same learning rates whatever num_steps is
  trainer.train(helpers.config("vae_digits", **overrides, **{"train.num_steps": 16}),
                str(tmp_path / "straight"))
  resumed = str(tmp_path / "resumed")
  trainer.train(helpers.config("vae_digits", **overrides, **{"train.num_steps": 8}), resumed)
  trainer.train(helpers.config("vae_digits", **overrides, **{"train.num_steps": 16}), resumed)
  (step, want), (_, got) = _params(str(tmp_path / "straight")), _params(resumed)
  assert step == 16
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_final_parts_are_reused_only_at_their_own_step_and_config(tmp_path):
  """The run killed in its final evaluation is tests/test_faults.py's; here, the file's
  key: parts saved at another step or under another config are computed again."""
  path, key, lines = str(tmp_path / trainer.PARTS_FILE), {"step": 5, "config": {"a": 1}}, []
  first = evaluation.Parts(path, key, write=True)
  assert first("draws", lambda: {"fid": np.float64(3.5), "fid_draws": 3}) == {
      "fid": 3.5, "fid_draws": 3}
  again = evaluation.Parts(path, key, write=True, log=lines.append)
  assert again("draws", lambda: pytest.fail("recomputed")) == {"fid": 3.5, "fid_draws": 3}
  assert lines == [f"final evaluation: draws already done at step 5 ({path}); computing the rest"]
  for other in ({"step": 6, "config": {"a": 1}}, {"step": 5, "config": {"a": 2}}):
    assert evaluation.Parts(path, other, write=True)("draws", lambda: {"fid": 1.0}) == {"fid": 1.0}
  assert evaluation.Parts()("draws", lambda: {"fid": 2.0}) == {"fid": 2.0}  # no file at all
