"""The families (genflax/trainer.py says what a family module defines), and what they share."""
import jax


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """(the key a run's `init` gets, the key its steps fold theirs from) for config.seed.

  In one place so that a family can rebuild the state a run started from
  (the GAN scores its initial generator as `fid_init`).
  """
  init_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
  return init_key, train_key


def ema_update(average, params, decay: float):
  """The exponential moving average of parameters, one step: decay * average + (1 - decay) * params.

  The GAN's generator and the diffusion model evaluate and sample with it.
  """
  return jax.tree.map(lambda a, p: decay * a + (1.0 - decay) * p, average, params)
