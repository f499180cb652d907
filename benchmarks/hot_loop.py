"""Times the real train step of a config: `python -m benchmarks.hot_loop --config configs/X.py[:arg]`.

The step is the trainer's own (`trainer.make_train_step`: jitted, sharded,
state donated) on the config's real data, with the devices and mesh that
`genflax.main` gives the config (its `cpu_devices`, an XLA_FLAGS device count
set in the environment winning, as there) and its `auto` values resolved as
there. Printed as a markdown table and written as JSON (`--out`):
  compile time of the first step; step time median, p10 and p90 (each step
  synchronised); steps/s of an unsynchronised run, as the loop runs;
  examples/s (tokens/s for the LM); model FLOPs per step counted by the
  family (`task.train_flops`)
  beside XLA's own count; achieved FLOP/s and MFU against the matmul peak
  measured in the same run in the step's compute dtype (`model.dtype`), and,
  on accelerators in DATASHEET_TFLOPS, against the datasheet's bfloat16 peak;
  the device's peak memory (`memory_stats()`, where the backend keeps it);
  the input pipeline's time per batch;
  the loop's steps/s with every batch placed on the devices in advance (so
  how much of the loop waits on input); peak host memory; for the LM, decoding speed with the KV cache against
  recomputing the context for every new token (256 tokens).

Several processes (`--coordinator_address host:port --num_processes N
--process_id i`, one command each, as for `genflax.main`) time the step
across them through jax.distributed; process 0 measures the peak while the
others wait, and reports. Decoding is timed only in one-process runs.
"""
import argparse
import ast
import functools
import os
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax.experimental import multihost_utils

from genflax import configfile, errors, files, hostmem, main as genflax_main, tasks, trainer
from genflax.errors import ConfigError
from genflax.models import conv, layers
from genflax.models import onednn as onednn_matmul


# Dense bfloat16 peak TFLOP/s per chip from the vendors' datasheets (no
# sparsity), by a lower-case substring of `device.device_kind`.
DATASHEET_TFLOPS = {
    "a100": 312.0,      # NVIDIA A100 (SXM and PCIe)
    "h100": 989.4,      # NVIDIA H100 SXM (the PCIe card: 756)
    "h200": 989.4,      # NVIDIA H200 SXM
    "tpu v4": 275.0,
    "tpu v5 lite": 197.0,  # TPU v5e
    "tpu v5p": 459.0,
    "tpu v5": 459.0,       # v5p reports itself as "TPU v5"
}


def datasheet_peak(device) -> float:
  """The bfloat16 FLOP/s of DATASHEET_TFLOPS for `device`; nan where unknown (CPUs)."""
  kind = device.device_kind.lower()
  for name, tflops in DATASHEET_TFLOPS.items():  # "tpu v5 lite" before "tpu v5"
    if name in kind:
      return tflops * 1e12
  return float("nan")


def matmul_peak(sizes=(1024, 2048), repeats: int = 5, dtype=jnp.float32,
                onednn: bool = False) -> float:
  """Best FLOP/s of a jitted square matmul in `dtype` on device 0 (bfloat16 through
  oneDNN with `onednn`, genflax/models/onednn.py: the units such a step's layers use)."""
  best = 0.0
  for n in sizes:
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    f = jax.jit(lambda x: onednn_matmul.matmul(x, x) if onednn else x @ x)
    f(a).block_until_ready()
    for _ in range(repeats):
      t = time.perf_counter()
      f(a).block_until_ready()
      best = max(best, 2 * n**3 / (time.perf_counter() - t))
  return best


def measured_peak(sizes, dtype=jnp.float32, onednn: bool = False) -> float:
  """matmul_peak on process 0 while the other processes wait (nan on them)."""
  multihost_utils.sync_global_devices("peak")
  peak = (matmul_peak(sizes, dtype=dtype, onednn=onednn) if jax.process_index() == 0
          else float("nan"))
  multihost_utils.sync_global_devices("peak done")
  return peak


def decode_speed(setup, params, num_new: int = 256, batch: int = 1, rounds: int = 10,
                 budget_s: float = 10.0) -> dict:
  """LM only: new tokens/s with the KV cache against recomputing the window each token,
  and of `weight_matvecs`, the floor under the cached step.

  The three are timed in alternation, round after round, and each keeps its
  best round: on this shared machine single runs of a few ms vary by 10-30%,
  and alternating puts a slow moment on both sides. At least 3 rounds, at
  most `rounds`, stopping after `budget_s` seconds.
  """
  from genflax.tasks import lm  # pylint: disable=g-import-not-at-top
  t = setup.info.context
  prompt = jnp.zeros((batch, 1), jnp.int32)

  @functools.partial(jax.jit, static_argnums=1)
  def recompute(prompt, num_new):
    """Greedy decoding that runs the model over the last (up to) T tokens at every step."""
    buf = jnp.concatenate([prompt, jnp.zeros((batch, num_new), jnp.int32)], 1)

    def step(buf, i):  # i + 1 tokens are known; the window is the last T of them
      start = jnp.maximum(i + 1 - t, 0)
      window = jax.lax.dynamic_slice_in_dim(buf, start, t, axis=1)  # [B, T]
      logits, _ = setup.decoder.apply({"params": params}, window)  # as the cached decode computes
      last = jnp.minimum(i, t - 1)                                  # where token i sits
      tok = jnp.argmax(logits[:, last], -1).astype(buf.dtype)
      return jax.lax.dynamic_update_slice(buf, tok[:, None], (0, i + 1)), None

    return jax.lax.scan(step, buf, jnp.arange(num_new))[0]

  fns = {"cached": lambda: lm.generate_tokens(setup, params, prompt, num_new,
                                              jax.random.PRNGKey(0), 0.0, 0, 1.0),
         "recompute": lambda: recompute(prompt, num_new),
         "matvecs": functools.partial(weight_matvecs, params, setup.model.variant.num_layers,
                                      batch, num_new)}
  outputs = {name: jax.block_until_ready(fn()) for name, fn in fns.items()}  # compile
  # Both decode greedily from the same prompt and see the same tokens until
  # the cache first fills (T - 1 new tokens; after that the cache restarts
  # from the last T/2 tokens while recomputation keeps a full window).
  same = slice(1, min(num_new, t - 1) + 1)
  agree = float(np.mean(np.asarray(outputs["cached"])[:, same]
                        == np.asarray(outputs["recompute"])[:, same]))
  times = {name: [] for name in fns}
  start = time.perf_counter()
  for r in range(rounds):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t0)
    if r >= 2 and time.perf_counter() - start > budget_s:
      break
  best = {name: min(ts) for name, ts in times.items()}
  return {"decode_new_tokens": num_new, "decode_rounds": len(times["cached"]),
          "decode_tokens_per_s_cached": batch * num_new / best["cached"],
          "decode_tokens_per_s_recompute": batch * num_new / best["recompute"],
          "decode_speedup": best["recompute"] / best["cached"],
          "decode_tokens_per_s_matvecs_only": batch * num_new / best["matvecs"],
          "decode_agree_first_window": agree}


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def weight_matvecs(params, num_layers: int, batch: int, num_new: int):
  """The floor under cached decoding: each new token's matmuls with the weights alone.

  Per token, every block's query, key, value, output and MLP kernels and
  then the output projection multiply a [batch, D] activation that depends
  on the last token's (so nothing is hoisted out of the loop); no attention
  over the cache, norms, biases or sampling. On CPU these one-row matmuls
  stream every weight once per token, so the cached step cannot beat this.
  """
  blocks = [params[f"block{i}"] for i in range(num_layers)]
  head = params["head"]["kernel"] if "head" in params else params["embed"]["embedding"].T

  def step(x, _):                                                  # x [B, D]
    for blk in blocks:
      a = blk["attn"]
      h = sum(jnp.einsum("bd,dhk->bhk", x, a[name]) for name in ("query", "key", "value"))
      x = jnp.tanh(jnp.einsum("bhk,hkd->bd", h, a["out"]))        # tanh keeps x bounded
      x = jnp.tanh(x @ blk["mlp_in"]["kernel"]) @ blk["mlp_out"]["kernel"]
    return jnp.tanh(x + (x @ head)[:, :1]), None

  return jax.lax.scan(step, jnp.ones((batch, head.shape[0])), None, length=num_new)[0]


def percentile(values, q):
  return float(np.percentile(np.asarray(values), q))


def build(config) -> tuple[trainer.Run, dict]:
  """What the trainer builds for `config` (its data, setup and compiled step), and the
  initial state."""
  built = trainer.build(config, "/tmp/genflax_benchmark")
  state = tasks.run_once(built.init, *tasks.run_keys(config.seed), out_shardings=built.state_sh)
  return built, state


def run(config, steps: int, warmup: int, peak_sizes=(1024, 2048)) -> dict:
  built, state = build(config)
  config = built.setup.config  # with its `auto` values resolved
  dtype = layers.dtypes(config.model)[0]
  task, setup, info, feed, train_step = (built.task, built.setup, built.info, built.feed,
                                         built.train_step)
  mesh = feed.batch_sharding.mesh

  t = time.perf_counter()
  compiled = train_step.lower(state, feed.inputs(0)).compile()
  compile_s = time.perf_counter() - t
  xla_flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
  on_onednn = config.model.get("dense_grads") == "onednn"  # its layers' matmuls run there
  peak_before = measured_peak(peak_sizes, dtype, on_onednn)

  # Steps run at state["step"] = 0, 1, ...: step i takes feed.inputs(i), as in training.
  i = 0
  for _ in range(warmup):
    state, _ = train_step(state, feed.inputs(i))
    i += 1
  jax.block_until_ready(state)
  step_times = []
  for _ in range(steps):
    inputs = feed.inputs(i)
    jax.block_until_ready(inputs)
    t = time.perf_counter()
    state, _ = train_step(state, inputs)
    jax.block_until_ready(state)
    step_times.append(time.perf_counter() - t)
    i += 1
  def loop(step_inputs) -> float:
    """steps/s of the trainer's loop over step_inputs(k), at most two steps in flight."""
    nonlocal state
    t = time.perf_counter()
    previous = None
    for k in range(steps):
      state, metrics = train_step(state, step_inputs(k))
      jax.block_until_ready(previous)
      previous = metrics
    jax.block_until_ready(state)
    return steps / (time.perf_counter() - t)

  # As the trainer runs it: the host prepares the inputs of step i+1 while step
  # i computes. Then the same loop with every step's inputs already on the
  # devices: what the loop would gain from an input pipeline that cost nothing.
  # Short steps are noisy here, so they take the best of 3 rounds of each.
  loop_steps_per_s = placed_steps_per_s = 0.0
  for _ in range(3 if statistics.median(step_times) < 0.1 else 1):
    loop_steps_per_s = max(loop_steps_per_s, loop(lambda k, i=i: feed.inputs(i + k)))
    i += steps
    placed = [feed.inputs(i + k) for k in range(steps)]
    jax.block_until_ready(placed)
    placed_steps_per_s = max(placed_steps_per_s, loop(placed.__getitem__))
    i += steps
  del placed
  input_times = []
  for j in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(feed.inputs(j))
    input_times.append(time.perf_counter() - t)

  # The peak is measured before and after the steps, and the higher kept:
  # on a shared machine a single measurement can land in a slow moment.
  peak = max(peak_before, measured_peak(peak_sizes, dtype, on_onednn))
  # One CPU device's matmul runs on all the host's cores, so its peak is the
  # host's; an accelerator's is one chip's, and the step runs on all of them.
  chips = 1 if jax.devices()[0].platform == "cpu" else int(np.prod(list(mesh.shape.values())))
  peak *= chips
  sheet = datasheet_peak(jax.devices()[0]) * chips
  median = statistics.median(step_times)
  flops = task.train_flops(setup) * config.data.batch_size
  device_mem = jax.local_devices()[0].memory_stats() or {}
  # Decoding is timed on one device: with params replicated over several CPU
  # devices every device would run the same decode, splitting the cores.
  extras = (decode_speed(setup, jax.device_put(state["task"]["params"], jax.devices()[0]))
            if config.task == "lm" and jax.process_count() == 1 else {})
  return {
      "config": config.task, "dataset": info.name, "batch_size": config.data.batch_size,
      "devices": int(np.prod(list(mesh.shape.values()))), "processes": jax.process_count(),
      "batches": feed.mode,
      "microbatches": config.train.microbatches, "grad_allreduce": config.train.grad_allreduce,
      "dense_grads": (layers.dense_grads(config.model.dense_grads)   # the LM's dense layers
                      if "dense_grads" in config.get("model", {}) else "-"),
      "attention": config.model.get("attention", "-"), "dtype": str(dtype),
      "conv": (conv.conv_impl(config.model.conv)                     # the image families' convs
               if "conv" in config.get("model", {}) else "-"),
      "host_malloc": hostmem.resolve(config.host_malloc, config.cpu_devices),
      "platform": jax.devices()[0].platform, "device_kind": jax.devices()[0].device_kind,
      "compile_s": compile_s,
      "step_ms_median": 1e3 * median, "step_ms_p10": 1e3 * percentile(step_times, 10),
      "step_ms_p90": 1e3 * percentile(step_times, 90),
      "steps_per_s_synced": 1 / median, "steps_per_s_loop": loop_steps_per_s,
      "examples_per_s": loop_steps_per_s * config.data.batch_size,
      **({"tokens_per_s": loop_steps_per_s * config.data.batch_size * info.context}
         if config.task == "lm" else {}),
      "model_gflops_per_step": flops / 1e9, "xla_gflops_per_step": xla_flops / 1e9,
      "achieved_gflops_per_s": flops / median / 1e9, "peak_matmul_gflops_per_s": peak / 1e9,
      "mfu": flops / median / peak,
      "datasheet_tflops": sheet / 1e12, "mfu_datasheet": flops / median / sheet,
      "input_ms_per_batch": 1e3 * statistics.median(input_times),
      "input_share_of_step": statistics.median(input_times) / median,
      "steps_per_s_loop_preplaced": placed_steps_per_s,
      "loop_time_waiting_on_input": max(0.0, 1 - loop_steps_per_s / placed_steps_per_s),
      "peak_host_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "peak_device_mem_mb": device_mem.get("peak_bytes_in_use", float("nan")) / 2**20,
      "train_step_traces": built.traces[0],
      **extras,
  }


def markdown(results: dict) -> str:
  rows = [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
          for k, v in results.items()]
  return "\n".join(["| metric | value |", "| --- | --- |", *rows])


def load_config(config_file: str, overrides: list[str]):
  """configs/X.py[:arg] with key=value overrides (values as Python literals, else
  strings); a key the config lacks is a ConfigError, as in genflax.main."""
  config = configfile.load_config(config_file)
  keys = configfile.flat_keys(config)
  for item in overrides:
    key, equals, value = item.partition("=")
    if not equals:
      raise ConfigError(f"override {item!r} has no value: write key=value, e.g. "
                        "train.num_steps=10")
    configfile.check_key(key, keys)
    *path, last = key.split(".")
    node = config
    for part in path:
      node = node[part]
    try:
      node[last] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      node[last] = value  # a plain string
  return config


def set_up_host(config, module: str) -> None:
  """The host as genflax.main sets it up for `config`, before the backend starts:
  its CPU devices, and malloc (jax is imported here, its threads started, so
  `python -m module` runs afresh with malloc's settings in the environment)."""
  if (hostmem.resolve(config.host_malloc, config.cpu_devices) == "keep"
      and not hostmem.KEEP_ENV.items() <= os.environ.items()):
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]],
              {**os.environ, **hostmem.KEEP_ENV})
  genflax_main.split_cpu(config.cpu_devices)


@errors.one_line
def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, help="configs/X.py[:arg]")
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--out", default=None, help="JSON file (default: print only)")
  parser.add_argument("--coordinator_address", default=None, help="host:port of process 0")
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  parser.add_argument("overrides", nargs="*", help="key=value config overrides")
  args = parser.parse_args()
  if args.out:
    files.check_output(args.out)
  config = load_config(args.config, args.overrides)
  set_up_host(config, "benchmarks.hot_loop")
  if args.coordinator_address:
    genflax_main.start_distributed(args.coordinator_address, args.num_processes, args.process_id)
  results = {"command_config": args.config, **run(config, args.steps, args.warmup)}
  if jax.process_index() > 0:
    return
  print(markdown(results))
  if args.out:
    files.write_json(args.out, results)


if __name__ == "__main__":
  main()
