"""The families (genflax/trainer.py says what a family module defines), and what they share."""
import jax


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """(the key a run's `init` gets, the key its steps fold theirs from) for config.seed.

  In one place so that a family can rebuild the state a run started from
  (the GAN scores its initial generator as `fid_init`).
  """
  init_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
  return init_key, train_key


def run_once(fn, *args, out_shardings=None):
  """fn(*args) as one jitted program that runs once, such as a state's `init`.

  On CPU it is compiled without XLA's backend (LLVM) optimisation: an init is
  mostly unrolled random-number code, which that optimisation compiled 3-4x
  slower (a U-Net's 7.4 s against 2.1 s, a DCGAN's 3.8 against 0.8) to save
  under half a second of running. Its values can differ from an optimised
  program's in the last bit, so whatever must rebuild a run's start calls this.
  """
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  return jax.jit(fn, out_shardings=out_shardings).lower(*args).compile(options)(*args)


def ema_update(average, params, decay: float):
  """The exponential moving average of parameters, one step: decay * average + (1 - decay) * params.

  The GAN's generator and the diffusion model evaluate and sample with it.
  """
  return jax.tree.map(lambda a, p: decay * a + (1.0 - decay) * p, average, params)
