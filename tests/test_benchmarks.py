"""The hot-loop benchmark runs the trainer's step, and its FLOP counts agree with XLA's."""
import os

import pytest

from benchmarks import allreduce, hot_loop, profile_ops
from genflax import trainer
from tests import helpers


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


def test_profile_steps_write_a_trace(tmp_path):
  trainer.train(helpers.config("vae_digits", **{"train.profile_steps": (2, 4)}), str(tmp_path))
  traces = [f for _, _, files in os.walk(tmp_path / "profile") for f in files]
  assert any(f.endswith(".xplane.pb") for f in traces), traces


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
