"""Steps/s of each GAN config's real train step on digits, one device, no eval.

    python experiments/gan_digits/time_steps.py [config[:arg] ...]

Times `genflax.tasks.gan.train_step` jitted as the trainer jits it (donated
state) on real batches: the best of 5 blocks of 100 steps after a warm-up,
because the 2-core machine is shared and the best block is the least
disturbed. Prints the load average beside the numbers.
"""
import functools
import os
import sys
import time

import jax

from genflax import configfile, data
from genflax.tasks import gan

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")  # where configs/ is
DEFAULT = ("gan_digits", "dcgan_digits", "cgan_digits", "dcgan_digits:hinge",
           "dcgan_digits:r1", "dcgan_digits:sn,hinge", "dcgan_digits:wgan")


def steps_per_s(spec: str, blocks: int = 5, block: int = 100) -> float:
  name, _, arg = spec.partition(":")
  config = configfile.load_config(os.path.join(ROOT, "configs", f"{name}.py") + f":{arg}")
  train, _, info = data.load(config.data.name, config.data.data_dir or None)
  setup = gan.build(config, info)
  state = gan.init(setup, jax.random.PRNGKey(0))
  step = jax.jit(functools.partial(gan.train_step, setup), donate_argnums=0)
  batches = data.Batches(train, config.data.batch_size, config.seed)
  batch = {k: jax.device_put(v) for k, v in batches.get(0).items()}
  rng = jax.random.PRNGKey(0)
  state, _ = step(state, batch, rng)  # compile
  best = 0.0
  for _ in range(blocks):
    start = time.perf_counter()
    for _ in range(block):
      state, _ = step(state, batch, rng)
    jax.block_until_ready(state)
    best = max(best, block / (time.perf_counter() - start))
  return best


if __name__ == "__main__":
  for spec in sys.argv[1:] or DEFAULT:
    rate = steps_per_s(spec)
    print(f"{spec:28s} {rate:8.1f} steps/s  load average {os.getloadavg()[0]:.1f}", flush=True)
