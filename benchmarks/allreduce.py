"""What an all-reduce of many buffers costs between CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m benchmarks.allreduce

Averages the same number of floats (default 800k, the nano LM's gradient)
split into 1, 8 and 50 buffers over two CPU devices of one process, as
`shard_map` + `pmean` does, and prints the median time of each beside a
local elementwise op on the same buffers (dispatch and memory alone).
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def median_ms(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--floats", type=int, default=800_000)
  parser.add_argument("--repeats", type=int, default=200)
  args = parser.parse_args()
  if jax.device_count() < 2:
    raise SystemExit("benchmarks.allreduce needs two devices: on CPU, run it with "
                     "XLA_FLAGS=--xla_force_host_platform_device_count=2")
  mesh = Mesh(np.array(jax.devices()[:2]), ("d",))
  print("| buffers | all-reduce ms | local op ms |\n| --- | --- | --- |")
  for count in (1, 8, 50):
    xs = [jax.device_put(jnp.ones((2, args.floats // count)), NamedSharding(mesh, P("d")))
          for _ in range(count)]
    run = lambda f: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("d"), out_specs=P("d")))
    reduce = run(lambda *a: [jax.lax.pmean(x, "d") for x in a])
    local = run(lambda *a: [x * 2 for x in a])
    print(f"| {count} | {median_ms(reduce, xs, args.repeats):.3f} | "
          f"{median_ms(local, xs, args.repeats):.3f} |")


if __name__ == "__main__":
  main()
