"""The VAE family's maths and training, on the real digits data."""
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genflax import data
from genflax.tasks import vae
from tests import helpers


def _setup(**overrides):
  config = helpers.config("vae_digits", "", **overrides)
  train, test, info = data.load("digits")
  return vae.build(config, info), train, test


@pytest.fixture(scope="module")
def trained():
  """An MLP VAE trained for 400 steps, with its test ELBO before and after."""
  setup, train, test = _setup(**{"train.num_steps": 400, "model.hidden": (128,),
                                 "model.latent_dim": 8})
  batches = data.Batches(train, 128, seed=0)
  state = helpers.init(vae, setup, jax.random.PRNGKey(0))
  step = jax.jit(functools.partial(vae.train_step, setup))
  evaluate = jax.jit(functools.partial(vae.eval_step, setup), static_argnums=3)
  test_batch = {k: jnp.asarray(v) for k, v in test.items()}
  before = evaluate(state, test_batch, jax.random.PRNGKey(1), False)
  for i in range(400):
    state, _ = step(state, batches.get(i), jax.random.PRNGKey(i))
  after = evaluate(state, test_batch, jax.random.PRNGKey(1), False)
  return setup, state, test_batch, before, after


@pytest.mark.slow
def test_elbo_improves_by_a_wide_margin(trained):
  _, _, _, before, after = trained
  neg_elbo_before = float(before["neg_elbo"].mean())
  neg_elbo_after = float(after["neg_elbo"].mean())
  # A discretised Gaussian over 17 levels at init is ~ 64 * log(17) = 181 nats or
  # worse; 400 steps bring the 8x8 digits below 110 nats (measured: ~95).
  assert neg_elbo_before > 150
  assert neg_elbo_after < 110
  assert neg_elbo_after < 0.65 * neg_elbo_before


@pytest.mark.slow
def test_iwae_bound_is_tighter_than_elbo(trained):
  setup, state, test_batch, _, after = trained
  k = setup.config.eval.iwae_k
  iwae_nll = float(after["iwae_nll"].mean())
  neg_elbo = float(after["neg_elbo"].mean())
  assert k > 1
  assert iwae_nll < neg_elbo - 1.0  # strictly tighter, by more than noise
  # More samples, tighter still (k = 1000 is the final evaluation).
  final = vae.eval_step(setup, state, test_batch, jax.random.PRNGKey(1), True)
  assert float(final["iwae_nll"].mean()) < iwae_nll + 0.1
  # Bits per dimension are the same numbers in other units.
  np.testing.assert_allclose(after["iwae_bpd"], after["iwae_nll"] / (64 * math.log(2)),
                             rtol=1e-6)


@pytest.mark.slow
def test_discretized_gaussian_is_a_distribution_over_levels():
  levels = 17
  x = jnp.arange(levels, dtype=jnp.float32) / (levels - 1)  # every level
  for mean, log_scale in [(0.3, -2.0), (0.0, 0.0), (1.2, -4.0), (0.5, -6.5)]:
    logp = vae.discretized_gaussian_log_prob(x, jnp.full_like(x, mean),
                                             jnp.full_like(x, log_scale), levels)
    assert float(jnp.exp(logp).sum()) == pytest.approx(1.0, abs=1e-4)
    assert bool(jnp.all(jnp.isfinite(logp)))


@pytest.mark.slow
def test_discretized_gaussian_matches_float64_into_the_tails():
  """log P(x's bin) and its gradients against the bin's probability in float64,
  for means from within the bin to 35 scales from it, on both sides and at the
  open-ended first and last bins."""
  from scipy import special  # pylint: disable=import-outside-toplevel
  levels, half = 256, 0.5 / 255
  rng = np.random.default_rng(0)
  x = rng.integers(0, levels, 20_000) / (levels - 1)
  log_scale = rng.uniform(-6.5, 0.0, x.size)
  mean = x + rng.normal(size=x.size) * np.exp(log_scale) * 10 ** rng.uniform(-1, 1.4, x.size)
  s = np.exp(log_scale)
  u, l = (x + half - mean) / s, (x - half - mean) / s
  keep = np.maximum(np.abs(u), np.abs(l)) < 35  # where float64's ndtr differences hold
  x, mean, log_scale, s, u, l = (a[keep] for a in (x, mean, log_scale, s, u, l))
  first, last = x < half, x > 1 - half
  assert first.sum() > 50 and last.sum() > 50 and (l > 10).sum() > 50 and (u < -10).sum() > 50
  phi = lambda t: np.exp(-t * t / 2) / np.sqrt(2 * np.pi)
  p = np.where(first, special.ndtr(u), np.where(last, special.ndtr(-l), np.where(
      l > 0, special.ndtr(-l) - special.ndtr(-u), special.ndtr(u) - special.ndtr(l))))
  dp_dmean = np.where(first, -phi(u), np.where(last, phi(l), phi(l) - phi(u))) / s
  dp_dlog_scale = np.where(first, -u * phi(u), np.where(last, l * phi(l), l * phi(l) - u * phi(u)))

  def logp(x, mean, log_scale):
    return vae.discretized_gaussian_log_prob(x, mean, log_scale, levels)

  args = [jnp.asarray(a, jnp.float32) for a in (x, mean, log_scale)]
  grads = jax.vmap(jax.grad(logp, (1, 2)))(*args)
  for got, want, tol in [(logp(*args), np.log(p), 1e-4), (grads[0], dp_dmean / p, 1e-2),
                         (grads[1], dp_dlog_scale / p, 1e-2)]:
    assert np.max(np.abs(np.asarray(got) - want) / (np.abs(want) + 1)) < tol


def test_kl_matches_monte_carlo():
  mu = jnp.array([[0.5, -1.0, 2.0]])
  logvar = jnp.array([[0.0, -1.0, 0.7]])
  z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(jax.random.PRNGKey(0), (200_000, 3))
  mc = jnp.mean(vae.gaussian_log_prob(z, mu, logvar) - vae.gaussian_log_prob(z, 0.0, 0.0))
  assert float(vae.kl_to_prior(mu, logvar)[0]) == pytest.approx(float(mc), abs=0.02)


@pytest.mark.parametrize("arch,conditional", [
    ("mlp", True), pytest.param("conv", False, marks=pytest.mark.slow),
    pytest.param("conv", True, marks=pytest.mark.slow)])
def test_variants_give_image_grids(arch, conditional):
  setup, _, test = _setup(**{"model.arch": arch, "model.conditional": conditional,
                             "model.hidden": (16,), "model.channels": (4, 8)})
  state = helpers.init(vae, setup, jax.random.PRNGKey(0))
  batch = {k: jnp.asarray(v[:32]) for k, v in test.items()}
  grids = jax.jit(functools.partial(vae.samples, setup))(state, batch, jax.random.PRNGKey(0))
  assert grids["reconstructions"].shape == (8, 8, 8, 8, 1)
  # The conditional VAE samples one row per class.
  assert grids["samples"].shape == ((10 if conditional else 8), 8, 8, 8, 1)
  assert grids["interpolations"].shape[1:] == (8, 8, 8, 1)
  for grid in grids.values():
    assert 0.0 <= float(grid.min()) and float(grid.max()) <= 1.0
  # Reconstructions sit beside their inputs: even columns are the test images.
  np.testing.assert_allclose(grids["reconstructions"][0, 0], batch["image"][0] / 16.0)


def test_conditional_decoder_uses_the_label():
  setup, _, _ = _setup(**{"model.conditional": True})
  state = helpers.init(vae, setup, jax.random.PRNGKey(0))
  z = jnp.zeros((2, setup.config.model.latent_dim))
  y = jax.nn.one_hot(jnp.array([3, 7]), 10)
  out = setup.model.apply({"params": state["params"]}, z, y, method=vae.VAE.decode)
  assert not np.allclose(out[0], out[1])


@pytest.mark.slow
def test_row_major_dense_grads_give_the_same_step_without_transposed_matmuls():
  """model.dense_grads=row_major: the step XLA's gradients give, and no dot in
  the compiled step contracts its left operand's leading axis (XLA:CPU's slow
  path; genflax/models/layers.py)."""
  train, _, _ = data.load("digits")
  batch = data.Batches(train, 128, seed=0).get(0)
  steps = {}
  for kind in ("xla", "row_major"):
    setup, _, _ = _setup(**{"model.dense_grads": kind})
    step = jax.jit(functools.partial(vae.train_step, setup))
    state = helpers.init(vae, setup, jax.random.PRNGKey(0))
    compiled = step.lower(state, batch, jax.random.PRNGKey(1)).compile()
    contractions = re.findall(r" dot\(.*lhs_contracting_dims=\{([\d,]*)\}", compiled.as_text())
    steps[kind] = compiled(state, batch, jax.random.PRNGKey(1)), contractions
  (xla_state, xla_metrics), xla_dots = steps["xla"]
  (state, metrics), dots = steps["row_major"]
  assert "0" in xla_dots and dots and "0" not in dots
  assert float(metrics["loss"]) == pytest.approx(float(xla_metrics["loss"]), rel=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               state["params"], xla_state["params"])


@pytest.mark.parametrize("likelihood", [pytest.param("gaussian", marks=pytest.mark.slow),
                                        "bernoulli"])
def test_bits_per_dimension_only_for_a_likelihood_of_the_discrete_pixels(likelihood):
  setup, _, test = _setup(**{"model.likelihood": likelihood, "model.hidden": (16,),
                             "model.latent_dim": 2, "eval.iwae_k": 2})
  state = helpers.init(vae, setup, jax.random.PRNGKey(0))
  batch = {k: jnp.asarray(v[:8]) for k, v in test.items()}
  values = vae.eval_step(setup, state, batch, jax.random.PRNGKey(1), False)
  assert sorted(values) == ["iwae_nll", "kl", "neg_elbo", "rec"]
