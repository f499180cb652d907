"""Square matmuls on this machine: XLA in float32 and bfloat16, and bfloat16 through
oneDNN (genflax/models/onednn.py) where it runs, timed in alternation.

    python -m benchmarks.matmul [--sizes 1024 2048] [--rounds 5]

Prints a markdown table: each kind's GFLOP/s (median over rounds of each round's
best of 5 runs at the largest size that is fastest) and its ratio to XLA's float32.
"""
import argparse
import statistics

import jax.numpy as jnp

from benchmarks import hot_loop
from genflax.models import onednn


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()
  kinds = {"XLA float32": dict(dtype=jnp.float32), "XLA bfloat16": dict(dtype=jnp.bfloat16)}
  why = onednn.unavailable()
  if why is None:
    kinds["oneDNN bfloat16"] = dict(dtype=jnp.bfloat16, onednn=True)
  rates = {k: [] for k in kinds}
  for _ in range(args.rounds):  # alternated, so a slow moment lands on every kind
    for kind, how in kinds.items():
      rates[kind].append(hot_loop.matmul_peak(tuple(args.sizes), **how) / 1e9)
  base = statistics.median(rates["XLA float32"])
  print(f"CPU bfloat16 units: {'yes' if onednn.cpu_has_bf16_units() else 'no'}; "
        f"oneDNN: {why or 'built'}\n\n| matmul | GFLOP/s (median of {args.rounds}) | "
        "range | x XLA float32 |\n| --- | ---: | --- | ---: |")
  for kind, values in rates.items():
    median = statistics.median(values)
    print(f"| {kind} | {median:.0f} | {min(values):.0f}-{max(values):.0f} | {median / base:.2f} |")


if __name__ == "__main__":
  main()
