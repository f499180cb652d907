"""The pod plan on paper: memory per device of the GPT-2-small train step, compiled ahead of time.

    XLA_FLAGS=--xla_force_host_platform_device_count=256 python -m benchmarks.memory_plan \\
        [--devices 8 64 256] [--out benchmarks/results/memory_plan.json]

Lowers and compiles, but never runs, the LM's real train step
(`lm.train_step`, AdamW through `optim.update`, jitted over the trainer's
state shardings with the state donated) for the config's `gpt2` variant
(12 layers x 768, context 1024, scanned blocks, remat of everything but the
weight matmuls, bfloat16 compute) with GPT-2's vocabulary (50,304: 50,257
padded to a multiple of 64; 124M parameters), on fake CPU devices, for each
plan and device count, and prints XLA's memory analysis of the compiled
per-device program: arguments (this device's parameters, optimizer state
and batch), temporaries (activations kept for the backward pass,
gradients, workspace) and their sum less what the donated state lets
outputs reuse. The `auto` values are those a GPU run would resolve
(genflax/platform.py). Plans:

  DP        every device holds everything; the batch is split
  FSDP      parameters and optimizer state split over all devices (ZeRO-3)
  FSDPxTP   FSDP over n/4 devices x tensor parallelism over 4 (heads, MLP, vocabulary)
"""
import argparse
import json
import time
import types

import jax
import jax.numpy as jnp

from genflax import configfile, errors, files, platform, sharding, trainer
from genflax.tasks import lm

PLANS = {
    "DP": lambda n: dict(data=n, fsdp=1, tensor=1),
    "FSDP": lambda n: dict(data=1, fsdp=n, tensor=1),
    "FSDPxTP": lambda n: dict(data=1, fsdp=n // 4, tensor=4),
}
GPT2_VOCAB = 50304


def plan(config, mesh_sizes: dict, vocab_size: int, batch_size: int) -> dict:
  """Compiles config's train step on mesh_sizes devices; XLA's per-device memory."""
  n = mesh_sizes["data"] * mesh_sizes["fsdp"] * mesh_sizes["tensor"]
  config = platform.resolve(config, {"mesh.data": mesh_sizes["data"],
                                     "mesh.fsdp": mesh_sizes["fsdp"],
                                     "mesh.tensor": mesh_sizes["tensor"]})
  config.data.batch_size = batch_size
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:n])
  sharding.check_batch_size(mesh, "data.batch_size", batch_size)
  info = lm.TextInfo("paper", types.SimpleNamespace(vocab_size=vocab_size),
                     lm.variant(config).context, 0, 0, 0, 0, "tokens", 1.0)
  params = platform.count(jax.eval_shape(lambda k: lm.init(lm.build(config, info), k),
                                         jax.random.PRNGKey(0))["params"])
  auto = platform.choices(config, "gpu", dict(mesh.shape), params)
  config = platform.resolve(config, auto)
  setup = lm.build(config, info)  # its mesh: the first n devices, as `mesh`
  _, abstract, _ = trainer.state_layout(lm, setup, mesh)
  batch_sh = sharding.batch_sharding(mesh)
  batch = {"tokens": jax.ShapeDtypeStruct((batch_size, info.context + 1), jnp.int32,
                                          sharding=batch_sh)}
  step = jax.jit(lambda s, b, r: lm.train_step(setup, s, b, r), donate_argnums=0,
                 out_shardings=(jax.tree.map(lambda a: a.sharding, abstract["task"]),
                                sharding.replicated(mesh)))
  t = time.perf_counter()
  compiled = step.lower(abstract["task"], batch, jax.random.PRNGKey(0)).compile()
  compile_s = time.perf_counter() - t
  m = compiled.memory_analysis()
  gib = lambda b: b / 2**30
  return {
      "devices": n, "mesh": dict(mesh.shape), "batch_size": batch_size,
      "params": params, "auto": auto, "compile_s": compile_s,
      "argument_gib": gib(m.argument_size_in_bytes), "output_gib": gib(m.output_size_in_bytes),
      "alias_gib": gib(m.alias_size_in_bytes), "temp_gib": gib(m.temp_size_in_bytes),
      "total_gib": gib(m.argument_size_in_bytes + m.output_size_in_bytes
                       - m.alias_size_in_bytes + m.temp_size_in_bytes),
  }


def markdown(rows: list[dict]) -> str:
  lines = ["| plan | devices | mesh (data, fsdp, tensor) | batch | arguments GiB | temporaries GiB "
           "| total GiB per device | compile s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    mesh = ", ".join(str(r["mesh"][a]) for a in sharding.AXES)
    lines.append(f"| {r['plan']} | {r['devices']} | {mesh} | {r['batch_size']} | "
                 f"{r['argument_gib']:.2f} | {r['temp_gib']:.2f} | {r['total_gib']:.2f} | "
                 f"{r['compile_s']:.0f} |")
  return "\n".join(lines)


@errors.one_line
def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/lm_shakespeare.py:gpt2")
  parser.add_argument("--devices", type=int, nargs="+", default=[8, 64, 256])
  parser.add_argument("--batch_size", type=int, default=256, help="global, in windows of 1024")
  parser.add_argument("--vocab_size", type=int, default=GPT2_VOCAB)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  if args.out:
    files.check_output(args.out)
  config = configfile.load_config(args.config)
  rows = []
  for n in args.devices:
    for name, sizes in PLANS.items():
      row = {"plan": name, **plan(config, sizes(n), args.vocab_size, args.batch_size)}
      rows.append(row)
      print(json.dumps(row), flush=True)
  print(markdown(rows))
  if args.out:
    files.write_json(args.out, rows)


if __name__ == "__main__":
  main()
