"""The hot-loop benchmark runs the trainer's step, and its FLOP counts agree with XLA's."""
import json
import os
import types

import jax
import numpy as np
import pytest

from benchmarks import allreduce, hot_loop, memory_plan, profile_ops
from genflax import platform, trainer
from genflax.models import conv
from genflax.tasks import vae
from tests import helpers


@pytest.mark.slow
@pytest.mark.parametrize("name,arg", [("vae_digits", ""), ("vae_digits", "conv"),
                                      ("lm_shakespeare", "nano")])
def test_hot_loop_reports_and_flops_match_xla(name, arg):
  config = helpers.config(name, arg, **{"mesh.data": 1})
  results = hot_loop.run(config, steps=3, warmup=1, peak_sizes=(512,))
  assert results["train_step_traces"] == 1
  assert results["step_ms_p10"] <= results["step_ms_median"] <= results["step_ms_p90"]
  assert 0 < results["mfu"] < 1.5  # against a peak measured in the same run
  assert 0 < results["input_share_of_step"] < 1
  assert 0 <= results["loop_time_waiting_on_input"] < 1
  # The family's analytic count against XLA's, which also counts elementwise work.
  ratio = results["model_gflops_per_step"] / results["xla_gflops_per_step"]
  assert 0.8 < ratio < 1.25, ratio
  assert "| mfu |" in hot_loop.markdown(results)
  if name.startswith("lm"):
    assert results["tokens_per_s"] == pytest.approx(results["examples_per_s"] * 64)
    # Even at nano size the cache saves most of the work over 256 tokens.
    assert results["decode_speedup"] > 2
    assert results["decode_rounds"] >= 3
    # The weights' matmuls alone bound the cached step from above.
    assert results["decode_tokens_per_s_matvecs_only"] > results["decode_tokens_per_s_cached"]


@pytest.mark.slow
def test_hot_loop_runs_a_config_on_the_devices_main_gives_it(tmp_path):
  """The LM configs split the host into one device per core (cpu_devices=-1)
  under genflax.main; the benchmark of the config measures the same mesh,
  with the `auto` values resolved as there. In bfloat16, the peak is bfloat16's."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = tmp_path / "new" / "folder" / "lm.json"  # made for it
  proc = helpers.cli("--config", "configs/lm_shakespeare.py:smoke", "--steps", "3", "--warmup",
                     "1", "--out", str(out), "model.dtype=bfloat16", module="benchmarks.hot_loop",
                     env=env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  results = json.loads(out.read_text())
  cores = len(os.sched_getaffinity(0))
  assert results["devices"] == cores
  assert results["grad_allreduce"] == ("reduce_scatter" if cores > 1 else "per_param")
  # Where oneDNN drives the CPU's bfloat16 units, the dense layers go there (platform.py).
  onednn = platform.bf16_units_here(helpers.config("lm_shakespeare", "smoke",
                                                    **{"model.dtype": "bfloat16"}))
  assert (results["attention"], results["dense_grads"]) == (
      "einsum", "onednn" if onednn else "row_major")
  assert results["dtype"] == "bfloat16" and 0 < results["mfu"]
  assert results["datasheet_tflops"] != results["datasheet_tflops"]  # nan: a CPU has none


CONFIG = ["--config", "configs/vae_digits.py:smoke"]


@pytest.mark.parametrize("module, args, message", [
    *((m, ["--config", "configs/nope.py"], "--config configs/nope.py: there is no file")
      for m in (hot_loop, profile_ops, memory_plan)),
    *((m, [*CONFIG, "model.nokey=3"], "unknown config key 'model.nokey'; did you mean")
      for m in (hot_loop, profile_ops)),
    (hot_loop, [*CONFIG, "model.latent_dim"], "override 'model.latent_dim' has no value"),
    (hot_loop, [*CONFIG, "model.latent_dim=0"], "model.latent_dim=0: must be an integer >= 1"),
    *((m, [*CONFIG[:2], "--out", "README.md/x.json"], "--out README.md/x.json: its folder ")
      for m in (hot_loop, memory_plan)),
    (hot_loop, [*CONFIG, "--out", "tests"], "--out tests is a directory"),
], ids=lambda v: v.__name__.split(".")[-1] if hasattr(v, "__name__") else None)
def test_a_bad_benchmark_command_is_one_line_before_any_work(module, args, message, capsys,
                                                            monkeypatch):
  monkeypatch.setattr("sys.argv", [module.__name__, *args])
  with pytest.raises(SystemExit) as exit_:
    module.main()
  err = capsys.readouterr().err
  assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
  assert message in err, err


def test_a_benchmark_without_its_dataset_says_how_to_get_it(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr("sys.argv", ["hot_loop", "--config", "configs/dcgan_fashion.py:smoke",
                                   f"data.idx_dir={tmp_path}", f"data.data_dir={tmp_path / 'tfds'}"])
  with pytest.raises(SystemExit) as exit_:
    hot_loop.main()
  err = capsys.readouterr().err
  assert exit_.value.code == 2 and err.count("\n") == 1, err
  assert f"from {tmp_path}, which lacks train-images-idx3-ubyte" in err


def test_datasheet_peaks_of_known_accelerators():
  device = lambda kind: types.SimpleNamespace(device_kind=kind)
  assert hot_loop.datasheet_peak(device("NVIDIA H100 80GB HBM3")) == 989.4e12
  assert hot_loop.datasheet_peak(device("NVIDIA H200")) == 989.4e12
  assert hot_loop.datasheet_peak(device("NVIDIA A100-SXM4-40GB")) == 312e12
  assert hot_loop.datasheet_peak(device("TPU v5 lite")) == 197e12
  assert hot_loop.datasheet_peak(device("TPU v5")) == 459e12
  assert hot_loop.datasheet_peak(device("TPU v4")) == 275e12
  peak = hot_loop.datasheet_peak(device("cpu"))
  assert peak != peak


@pytest.mark.slow
def test_memory_plan_reads_the_compiled_step():
  """The pod plan's numbers are XLA's memory analysis of the compiled LM step:
  on 8 devices FSDP holds 1/8 of DP's parameters and AdamW moments (12 bytes
  per parameter in float32), and its plan resolves `auto` as on GPUs."""
  config = helpers.config("lm_shakespeare", "gpt2", **{"model.variant": "L2-D64-H4-T32"})
  rows = {name: memory_plan.plan(config, sizes(8), vocab_size=256, batch_size=16)
          for name, sizes in memory_plan.PLANS.items()}
  dp, fsdp = rows["DP"], rows["FSDP"]
  assert dp["params"] == fsdp["params"] > 0
  state_gib = 12 * dp["params"] / 2**30
  batch_gib = 16 // 8 * 33 * 4 / 2**30
  assert dp["argument_gib"] == pytest.approx(state_gib + batch_gib, rel=0.05)
  assert fsdp["argument_gib"] == pytest.approx(state_gib / 8 + batch_gib, rel=0.25)
  assert dp["auto"]["train.grad_allreduce"] == "per_param"
  assert dp["auto"]["model.attention"] == "dot_product_attention"
  assert all(r["temp_gib"] > 0 and r["total_gib"] > r["argument_gib"] for r in rows.values())
  assert rows["FSDPxTP"]["mesh"] == {"data": 1, "fsdp": 2, "tensor": 4}
  assert "| FSDP | 8 | 1, 8, 1 | 16 |" in memory_plan.markdown([{"plan": "FSDP", **fsdp}])


@pytest.mark.slow
def test_profile_steps_write_a_trace(tmp_path):
  trainer.train(helpers.config("vae_digits", **{"train.profile_steps": (2, 4)}), str(tmp_path))
  traces = [f for _, _, files in os.walk(tmp_path / "profile") for f in files]
  assert any(f.endswith(".xplane.pb") for f in traces), traces


@pytest.mark.slow
def test_profile_ops_splits_the_step_into_phases_and_kinds():
  config = helpers.config("lm_shakespeare", "smoke", **{"mesh.data": 2,
                                                       "train.grad_allreduce": "flat"})
  result = profile_ops.profile(config, steps=2, warmup=1)
  by_class = result["by_class"]
  for phase in ("forward", "backward"):
    assert by_class[(phase, "dot/conv")] > 0
  # Data-parallel over 2 devices: the gradients' all-reduce is in the backward pass,
  # one buffer (train.grad_allreduce=flat).
  assert by_class[("backward", "collective")] > 0
  assert [where for kind, where in result["by_op"] if kind == "all-reduce"] == [
      "shard_map/grad_allreduce/psum"]
  assert sum(by_class.values()) == pytest.approx(result["ms_per_step"])
  assert any("blockN/mlp_in/dot_general" in where for _, where in result["by_op"])
  assert "| backward | dot/conv |" in profile_ops.report(result)
  # ZeRO stage 1: the gradients' reduce-scatter in the backward pass, the
  # parameters' all-gather after the update.
  config = helpers.config("lm_shakespeare", "smoke", **{"mesh.data": 2,
                                                       "train.grad_allreduce": "reduce_scatter"})
  by_op = profile_ops.profile(config, steps=2, warmup=1)["by_op"]
  kinds = {kind.replace("_", "-"): where for kind, where in by_op if "shard_map/" in where
           and profile_ops.classify(kind, where)[1] == "collective"}
  assert "grad_reduce_scatter" in kinds["reduce-scatter"] and "param_all_gather" in kinds["all-gather"]
  assert profile_ops.classify("reduce_scatter", kinds["reduce-scatter"]) == ("backward", "collective")
  assert profile_ops.classify("all_gather", kinds["all-gather"]) == ("update and other", "collective")


def test_allreduce_benchmark_times_each_buffer_count(capsys, monkeypatch):
  monkeypatch.setattr("sys.argv", ["allreduce", "--floats", "4000", "--repeats", "3"])
  allreduce.main()
  rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()[2:]]
  assert [int(r[0]) for r in rows] == [1, 8, 50]
  assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)


def test_matmul_shapes_do_the_layers_multiply_adds():
  """Each output pixel of a layer takes kh kw C multiply-adds per channel; a
  transposed convolution's phases share them out (SAME, 3x3 stride 2: 1, 2,
  2 and 4 taps; 4x4 stride 2: 4 each)."""
  shapes = conv.matmul_shapes((2, 5, 5, 3), (3, 3, 3, 4), 2, "SAME", transposed=True)
  assert shapes == [(50, 12, 4), (50, 6, 4), (50, 6, 4), (50, 3, 4)]
  assert sum(n * k for n, k, _ in shapes) == 10 * 10 * 2 * 9 / 4 * 3  # 9/4 taps per pixel
  assert conv.matmul_shapes((2, 4, 4, 3), (4, 4, 3, 5), 2, "SAME", True) == [(32, 12, 5)] * 4
  assert conv.matmul_shapes((2, 8, 8, 3), (3, 3, 3, 5), 2, "SAME", False) == [(32, 27, 5)]


@pytest.mark.slow
def test_conv_layers_times_the_layers_matmuls_alone():
  result = helpers.cli("--layers", "vae8 dec convT 2", "--repeats", "1", "--matmuls",
                       module="benchmarks.conv_layers")
  assert result.returncode == 0, result.stderr
  header, row = [line for line in result.stdout.splitlines() if line.startswith("| layer") or
                 line.startswith("| vae8")]
  cells = [c.strip() for c in row.split("|")[1:-1]]
  assert len(header.split("|")) == len(row.split("|")) and len(cells) == 3 + 6, result.stdout
  assert cells[2] == f"{2 * 128 * 4 * 4 * 64 * 9 * 32 / 1e9:.2f}"  # 9 taps over 4 phases
  assert all(0 < float(c) for c in cells[3:]), row


@pytest.mark.slow
def test_conv_layers_times_every_form_and_marks_the_pick():
  result = helpers.cli("--layers", "vae8 dec conv out,dcgan8 G convT 2", "--repeats", "1", module="benchmarks.conv_layers")
  assert result.returncode == 0, result.stderr
  rows = [line for line in result.stdout.splitlines() if line.startswith("| vae8") or
          line.startswith("| dcgan8")]
  assert len(rows) == 2, result.stdout
  for row in rows:  # both layers have one output channel or two: scatter is the pick
    patches, scatter, forward = [cell.strip() for cell in row.split("|")[2:5]]
    assert scatter.endswith("*") and "*" not in patches + forward, row
    assert all(float(v) > 0 for cell in (patches, scatter, forward)
               for v in cell.rstrip(" *").split(" / ")), row


@pytest.mark.slow
@pytest.mark.parametrize("name,arg", [("vae_fashion", "conv"), ("dcgan_fashion", "")])
def test_torch_reference_builds_genflax_networks_and_times_their_step(name, arg):
  """benchmarks.torch_reference's PyTorch networks have the genflax model's
  parameters, size for size (layouts differ), and its step trains and reports.
  Needs PyTorch, which genflax does not depend on."""
  torch = pytest.importorskip("torch", reason="the PyTorch reference needs PyTorch, which genflax "
                              "does not depend on: pip install torch==2.13.0 (the CPU wheel)")
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
  config = helpers.config(name, arg, **{"data.batch_size": 16})
  task = trainer.load_task(config.task)
  setup = task.build(config, torch_reference.INFOS[config.data.name])
  params = helpers.init(task, setup, jax.random.PRNGKey(0))["params"]
  networks, step = torch_reference.build(config)
  assert (sorted(np.size(p) for p in jax.tree.leaves(params))
          == sorted(p.numel() for net in networks for p in net.parameters()))
  losses = [torch.stack(step()) for _ in range(3)]
  assert all(torch.isfinite(loss).all() for loss in losses)
  networks, step = torch_reference.build(config, dtype="bfloat16")  # under torch.autocast
  seen = []  # the dtype of the last layer's output
  list(networks[-1].modules())[-1].register_forward_hook(lambda *args: seen.append(args[2].dtype))
  assert torch.isfinite(torch.stack(step())).all()
  assert seen and set(seen) == {torch.bfloat16}, seen
  results = torch_reference.run(config, steps=2, warmup=1, channels_last=True, peak_sizes=(256,))
  assert results["gflop_per_step"] == pytest.approx(task.train_flops(setup) * 16 / 1e9)
  assert 0 < results["mfu"] < 1.5 and results["channels_last"]
  if name == "vae_fashion":  # the same likelihood, into both tails
    x = np.repeat(np.arange(256) / 255, 40).astype(np.float32)
    rng = np.random.default_rng(0)
    mean = (x + rng.normal(0, 0.3, x.size)).astype(np.float32)
    log_scale = rng.uniform(-6, 0, x.size).astype(np.float32)
    ours = vae.discretized_gaussian_log_prob(x, mean, log_scale, 256)
    theirs = torch_reference.discretized_gaussian_log_prob(
        *map(torch.from_numpy, (x, mean, log_scale)), 256)
    np.testing.assert_allclose(theirs.numpy(), ours, rtol=1e-4, atol=1e-4)


def test_the_matmul_benchmark_tables_every_kind_that_runs_here(capsys, monkeypatch):
  from benchmarks import matmul  # pylint: disable=g-import-not-at-top
  from genflax.models import onednn  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr("sys.argv", ["matmul", "--sizes", "128", "--rounds", "2"])
  matmul.main()
  rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
  rows = rows[2:]  # under the header and its rule
  kinds = [row.split(" | ")[0][2:] for row in rows]
  assert kinds == ["XLA float32", "XLA bfloat16"] + (["oneDNN bfloat16"] if onednn.unavailable()
                                                     is None else [])
  assert rows[0].endswith("| 1.00 |")  # float32 against itself
  assert all(float(row.split(" | ")[1]) > 0 for row in rows)
