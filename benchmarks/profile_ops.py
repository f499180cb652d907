"""Where the train step's time goes: `python -m benchmarks.profile_ops --config configs/X.py[:arg]`.

Traces a few steps of the trainer's own compiled step (as `hot_loop` builds
it) with `jax.profiler`, reads the XLA ops of device 0 from the trace, and
names each op from the compiled HLO's metadata (the JAX operation that made
it). Prints, per step:
  - time by phase (forward, backward with the gradients' all-reduce or
    reduce-scatter, everything else: the optimizer update and any all-gather
    of the parameters,
    the loss's reduction) and kind (dot/conv, collective, other);
  - the ops that took longest, grouped over layers (block0, block1, ... ->
    blockN).
Op times are what XLA's runtime recorded on device 0; with several devices
on one host, they run at the same time on the other cores.
"""
import argparse
import collections
import glob
import gzip
import json
import re
import tempfile

import jax

from benchmarks import hot_loop
from genflax import errors

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def op_metadata(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> the JAX op_name it came from ("" when none)."""
  names = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
    if m:
      meta = re.search(r'op_name="([^"]+)"', line)
      names[m.group(1)] = meta.group(1) if meta else ""
  return names


def classify(op: str, jax_name: str) -> tuple[str, str]:
  """(phase, kind) of one XLA op."""
  if "transpose(jvp(" in jax_name or "grad_allreduce" in jax_name or "grad_reduce_scatter" in jax_name:
    phase = "backward"
  elif "jvp(" in jax_name:
    phase = "forward"
  else:
    phase = "update and other"
  if op.replace("_", "-").startswith(COLLECTIVES):  # XLA:CPU names some "reduce_scatter"
    kind = "collective"
  elif ("dot_general" in jax_name or "conv_general_dilated" in jax_name
        or re.match(r"(dot|convolution)(\.\d+)?$", op)):  # a dot XLA folded a transpose into
    kind = "dot/conv"
  else:
    kind = "other"
  return phase, kind


def device_op_times(trace_dir: str, device: str = "0") -> collections.Counter:
  """Total microseconds per XLA op name on one device, from a jax.profiler trace."""
  [path] = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
  with gzip.open(path) as f:
    events = json.load(f)["traceEvents"]
  times = collections.Counter()
  for e in events:
    args = e.get("args", {})
    if e.get("ph") == "X" and "hlo_op" in args and args.get("device_ordinal", device) == device:
      times[args["hlo_op"]] += e["dur"]
  return times


def profile(config, steps: int = 3, warmup: int = 3) -> dict:
  built, state = hot_loop.build(config)
  feed, train_step = built.feed, built.train_step
  hlo = train_step.lower(state, feed.inputs(0)).compile().as_text()
  for i in range(warmup):
    state, _ = train_step(state, feed.inputs(i))
  jax.block_until_ready(state)
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    for i in range(warmup, warmup + steps):
      state, _ = train_step(state, feed.inputs(i))
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    times = device_op_times(trace_dir)
  names = op_metadata(hlo)
  by_class, by_op = collections.Counter(), collections.Counter()
  for op, us in times.items():
    jax_name = names.get(op, "")
    by_class[classify(op, jax_name)] += us / steps / 1e3
    kind = re.sub(r"\.\d+$", "", op)
    where = re.sub(r"block\d+", "blockN", jax_name.removeprefix("jit(step_fn)/")) or "-"
    by_op[(kind, where)] += us / steps / 1e3
  return {"ms_per_step": sum(by_class.values()), "by_class": by_class, "by_op": by_op}


def report(result: dict, top: int = 15) -> str:
  total = result["ms_per_step"]
  lines = [f"XLA ops on device 0: {total:.2f} ms per step", "",
           "| phase | kind | ms/step | share |", "| --- | --- | --- | --- |"]
  for (phase, kind), ms in sorted(result["by_class"].items()):
    lines.append(f"| {phase} | {kind} | {ms:.2f} | {100 * ms / total:.1f}% |")
  lines += ["", "| ms/step | share | XLA op | from |", "| --- | --- | --- | --- |"]
  for (kind, where), ms in result["by_op"].most_common(top):
    lines.append(f"| {ms:.2f} | {100 * ms / total:.1f}% | {kind} | {where[-90:]} |")
  return "\n".join(lines)


@errors.one_line
def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, help="configs/X.py[:arg]")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--top", type=int, default=15)
  parser.add_argument("overrides", nargs="*", help="key=value config overrides")
  args = parser.parse_args()
  config = hot_loop.load_config(args.config, args.overrides)
  hot_loop.set_up_host(config, "benchmarks.profile_ops")
  print(report(profile(config, args.steps), args.top))


if __name__ == "__main__":
  main()
