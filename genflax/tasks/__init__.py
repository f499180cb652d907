"""The families (genflax/trainer.py says what a family module defines)."""
import jax


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """(the key a run's `init` gets, the key its steps fold theirs from) for config.seed.

  In one place so that a family can rebuild the state a run started from
  (the GAN scores its initial generator as `fid_init`).
  """
  init_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
  return init_key, train_key
