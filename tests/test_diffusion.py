"""The diffusion family: preconditioning, samplers against a Gaussian's exact solution,
guidance, training, resume, devices, the sample CLI."""
import functools
import math
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from genflax import data, trainer
from genflax.errors import ConfigError
from genflax.models import unet
from genflax.tasks import diffusion, image_metrics
from tests import helpers


def _setup(arg="smoke", **overrides):
  train, test, info = data.load("digits")
  return diffusion.build(helpers.config("diffusion_digits", arg, **overrides), info), train, test


# ---- Maths

def test_edm_preconditioning_at_its_limits():
  c_skip, c_out, c_in, c_noise = diffusion.edm_preconditioning(jnp.array([1e-6, 0.5, 1e4]))
  np.testing.assert_allclose(c_skip, [1.0, 0.5, 2.5e-9], rtol=1e-4)
  np.testing.assert_allclose(c_out, [1e-6, 0.5 / np.sqrt(2), 0.5], rtol=1e-4)
  np.testing.assert_allclose(c_in, [2.0, 1 / np.sqrt(0.5), 1e-4], rtol=1e-4)
  np.testing.assert_allclose(c_noise, np.log([1e-6, 0.5, 1e4]) / 4, rtol=1e-6)
  # sigma -> 0: D returns its input whatever the network says.
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 1))
  loud = lambda x, level, y: 100.0 * jnp.ones_like(x)
  np.testing.assert_allclose(diffusion.denoise(loud, x, jnp.full((3,), 1e-8), None), x, atol=1e-5)


def test_patches_go_in_and_out_whole_and_the_flop_count_follows_them():
  x = jnp.arange(2 * 4 * 6 * 3.0).reshape(2, 4, 6, 3)
  patches = unet.space_to_depth(x, 2)
  assert patches.shape == (2, 2, 3, 12)
  np.testing.assert_array_equal(patches[1, 1, 2], x[1, 2:4, 4:6].reshape(-1))
  np.testing.assert_array_equal(unet.depth_to_space(patches, 2), x)
  macs = {}
  for patch in (1, 2):
    # Matmul convs do every tap's work, as the count does; XLA's cost analysis of its own
    # convolutions leaves out the taps that fall on padding (most of them at 2x2).
    setup, _, _ = _setup("conditional,smoke", **{"model.patch": patch, "model.conv": "matmul"})
    params = helpers.init(diffusion, setup, jax.random.PRNGKey(0))["params"]
    x, level, y = jnp.zeros((4, 8, 8, 1)), jnp.zeros((4,)), jnp.zeros((4,), jnp.int32)
    apply = jax.jit(lambda p, x: setup.net.apply({"params": p}, x, level, y))
    assert jax.eval_shape(apply, params, x).shape == x.shape
    # The analytic count against XLA's, which also counts norms and activations
    # (measured: 0.947 at both patch sizes).
    macs[patch] = diffusion.net_macs(setup)
    ratio = 2 * macs[patch] * 4 / apply.lower(params, x).cost_analysis()["flops"]
    assert 0.8 < ratio < 1.25, (patch, ratio)
  assert macs[2] < macs[1] / 2  # the levels run at half the side
  with pytest.raises(ConfigError, match="model.patch=3"):
    _setup("smoke", **{"model.patch": 3})


def test_edms_training_levels_lognormal_or_even_in_log_sigma_over_the_samplers_range():
  draws = {}
  for sampling in diffusion.SIGMA_SAMPLING:
    setup, _, _ = _setup("smoke", **{"loss.sigma_sampling": sampling})
    draws[sampling] = np.log(np.asarray(diffusion.training_sigmas(setup, jax.random.PRNGKey(0),
                                                                  20000)))
  normal, even = draws["lognormal"], draws["log_uniform"]
  assert abs(normal.mean() + 1.2) < 0.03 and abs(normal.std() - 1.2) < 0.03
  lo, hi = np.log(0.002), np.log(80.0)
  assert lo <= even.min() < lo + 0.01 and hi - 0.01 < even.max() <= hi
  counts = np.histogram(even, 10, (lo, hi))[0]
  assert counts.min() > 0.9 * 2000 and counts.max() < 1.1 * 2000, counts
  # Below sigma 0.02, where the bits/dim's last steps run: 22% of the draws against 1.2%.
  assert np.mean(even < np.log(0.02)) > 0.2 > 10 * np.mean(normal < np.log(0.02))


def test_dequantised_levels_fill_their_bins_evenly():
  levels = jnp.tile(jnp.linspace(-1.0, 1.0, 17), 4000)  # the digits' 17 levels
  x = diffusion.dequantize(levels, 17, jax.random.PRNGKey(0))
  offset = np.asarray(x - levels) / (2.0 / 16)  # in bins
  assert np.abs(offset).max() <= 0.5 and np.abs(offset).max() > 0.499
  assert abs(offset.mean()) < 0.01 and offset.std() == pytest.approx(12 ** -0.5, rel=0.01)


@pytest.mark.slow
def test_a_train_step_on_dequantised_levels_sees_other_pixels():
  losses = {}
  for dequantize in (False, True):
    setup, train, _ = _setup("smoke", **{"loss.dequantize": dequantize})
    state = helpers.init(diffusion, setup, jax.random.PRNGKey(0))
    _, m = jax.jit(functools.partial(diffusion.train_step, setup))(
        state, data.Batches(train, 64, 0).get(0), jax.random.PRNGKey(1))
    losses[dequantize] = float(m["loss"])
  # The same noise and levels: only the dequantisation moves the loss, and by little.
  assert losses[True] != losses[False] and losses[True] == pytest.approx(losses[False], rel=0.1)


def _gaussian_drift(kind, mu, s):
  """dx/dtau of the exact model of data N(mu, s^2) (per dimension)."""
  if kind == "edm":  # D(x; sigma) = E[x0 | x] = mu + s^2 / (s^2 + sigma^2) (x - mu)
    return lambda x, sigma: (x - (mu + s**2 / (s**2 + sigma**2) * (x - mu))) / sigma
  # x_t = (1 - t) n + t x0: v = E[x0 - n | x_t], a linear regression on x_t.
  def v(x, t):
    cov = t * s**2 - (1 - t)
    var = (1 - t) ** 2 + t**2 * s**2
    return mu + cov / var * (x - t * mu)
  return v


def _draw(kind, sampler, steps, churn=0.0):
  """(std / s - 1, mean - mu) of 40,000 samples of the exact model of four 1-d Gaussians."""
  mu = jnp.array([[-0.5, 0.0, 0.3, 0.6]])  # [1, 4]: one Gaussian per dimension
  s = jnp.array([[0.1, 0.3, 0.5, 1.0]])
  noise = jax.random.normal(jax.random.PRNGKey(0), (40000, 4))
  sample_cfg = types.SimpleNamespace(sigma_min=0.002, sigma_max=80.0, rho=7.0)
  grid = diffusion.sample_grid(kind, steps, sample_cfg)
  x = jax.jit(lambda z: diffusion.solve(_gaussian_drift(kind, mu, s), z, grid,
                                        jax.random.PRNGKey(1), sampler, kind == "edm", churn))(noise)
  return np.asarray(x.std(0) / s[0] - 1), np.asarray(x.mean(0) - mu[0]) / np.asarray(s[0])


# Sampling error of 40,000 draws: 0.5% of s for the mean, 0.35% for the std.
# Measured worst std errors: 0.8%, -1.2%, 2.3% (churn adds noise it then
# removes in 50 steps), 2.5% (s = 0.1 in 18 flow steps), -1.0%.
@pytest.mark.parametrize("kind,sampler,steps,churn,tolerance", [
    ("edm", "heun", 50, 0.0, 0.015), ("edm", "euler", 500, 0.0, 0.02),
    ("edm", "heun", 50, 10.0, 0.035), ("flow", "heun", 18, 0.0, 0.035),
    ("flow", "euler", 500, 0.0, 0.02)])
def test_with_a_gaussians_exact_model_the_sampler_draws_that_gaussian(kind, sampler, steps,
                                                                      churn, tolerance):
  std_error, mean_error = _draw(kind, sampler, steps, churn)
  assert np.all(np.abs(std_error) < tolerance), std_error
  assert np.all(np.abs(mean_error) < 0.02), mean_error


def test_heun_on_edms_schedule_is_second_order():
  """At 18 steps the std is 4.5-9% too wide for these narrow Gaussians (float64 of the
  same recursion: 4.5%, 5.5%, 9.0% for s = 1, 0.5, 0.1); 50 steps cut that ~(50/18)^2."""
  coarse, fine = _draw("edm", "heun", 18)[0], _draw("edm", "heun", 50)[0]
  assert np.all(coarse > 0.03), coarse
  assert np.all(np.abs(fine) < coarse / 5), (coarse, fine)


@pytest.mark.parametrize("kind", ["edm", "flow"])
def test_the_odes_log_likelihood_of_a_gaussians_exact_model_is_the_closed_form(kind):
  """The exact model maps noise to data linearly, so its density is a Gaussian's: for
  the flow, N(mu, s^2) itself; for EDM, N(0, sigma_max^2) pulled back through
  x_T = mu + (x - mu) r, r = sqrt((s^2 + sigma_max^2) / (s^2 + sigma_min^2)), which is
  within ~mu z / sigma_max of N(mu, s^2 + sigma_min^2). A Rademacher probe's Hutchinson
  estimate is exact for this diagonal Jacobian, so what is left is the solver's error."""
  mu = jnp.array([[-0.5, 0.0, 0.3, 0.6]])
  s = jnp.array([[0.1, 0.3, 0.5, 1.0]])
  cfg = types.SimpleNamespace(sigma_min=0.002, sigma_max=80.0, rho=7.0)
  x = mu + s * jax.random.normal(jax.random.PRNGKey(0), (1000, 4))
  got = jax.jit(lambda x: diffusion.log_likelihood(
      kind, _gaussian_drift(kind, mu, s), x, cfg, jax.random.PRNGKey(1), 1e-5))(x)
  gaussian = lambda x, var: jnp.sum(-0.5 * x**2 / var - 0.5 * jnp.log(2 * jnp.pi * var), -1)
  if kind == "flow":
    want = gaussian(x - mu, s**2)
  else:
    r = jnp.sqrt((s**2 + cfg.sigma_max**2) / (s**2 + cfg.sigma_min**2))
    want = gaussian(mu + (x - mu) * r, cfg.sigma_max**2) + jnp.sum(jnp.log(r))
    near = gaussian(x - mu, s**2 + cfg.sigma_min**2)
    assert np.abs(np.mean(want - near)) < 1e-3 and np.abs(want - near).max() < 0.1
  # Measured: max error 6e-4 nats (EDM), 3e-4 (flow); the mean 2e-5 and 1e-5.
  assert np.abs(got - want).max() < 2e-3
  assert np.abs(np.mean(got - want)) < 2e-4


def _levels_drift(kind, levels, probs):
  """dx/dtau of the exact model of independent pixels, each on `levels` [L] with
  probabilities probs [dims, L]: the denoiser is the posterior mean over the levels."""
  levels, probs = levels[None, None], probs[None]  # [1, 1, L], [1, dims, L]

  def posterior_mean(x, mean_scale, sd):  # x [B, dims] ~ mean_scale * level + sd * noise
    logits = jnp.log(probs) - 0.5 * ((x[..., None] - mean_scale * levels) / sd) ** 2
    return jnp.sum(jax.nn.softmax(logits, -1) * levels, -1)
  if kind == "edm":
    return lambda x, sigma: (x - posterior_mean(x, 1.0, sigma)) / sigma
  return lambda x, t: (posterior_mean(x, t, 1 - t) - x) / (1 - t)  # E[x0 - n | x_t]


@pytest.mark.parametrize("kind", ["edm", "flow"])
def test_the_gaussian_bound_scores_an_exact_model_of_the_levels_at_their_entropy(kind):
  """Independent pixels on the digits' 17 levels, their exact model: the Gaussian
  dequantisation's bound (sigma a tenth of a bin) equals -log P(levels) within the
  solver's error, where the uniform one, which spreads the levels' sharp peaks over
  their bins, scores far worse. Hutchinson is exact for this diagonal Jacobian."""
  levels = jnp.linspace(-1.0, 1.0, 17)
  probs = jax.nn.softmax(2.0 * jax.random.normal(jax.random.PRNGKey(0), (4, 17)), -1)
  x = levels[jax.random.categorical(jax.random.PRNGKey(1), jnp.log(probs), -1, (400, 4))]
  want = -np.sum(np.log(np.asarray(probs))[np.arange(4), np.asarray((x + 1) * 8).round().astype(int)], -1)
  cfg = types.SimpleNamespace(sigma_min=0.002, sigma_max=80.0, rho=7.0)
  bound = lambda dequantization: -jax.jit(lambda x: diffusion.levels_log_likelihood(
      kind, _levels_drift(kind, levels, probs), x, 17, cfg, jax.random.PRNGKey(2), 1e-5,
      dequantization, sigma=0.0125))(x)
  gaussian = np.asarray(bound("gaussian"))
  # Measured (nats per image of 4 pixels, entropy 7.65): mean error 2e-4 (edm) and 1e-5
  # (flow), max 0.015 and 0.003; at sigma 0.05 (0.4 bins) both 0.97 above, since these
  # levels' probabilities are far from even; uniform 638 above (edm).
  assert np.abs(gaussian - want).max() < 0.05, np.abs(gaussian - want).max()
  assert abs(np.mean(gaussian - want)) < 0.01, np.mean(gaussian - want)
  if kind == "edm":  # the flow's exact drift is singular at t = 1, where uniform starts
    uniform = np.asarray(bound("uniform"))
    assert np.mean(uniform - want) > 10, np.mean(uniform - want)


def test_the_exact_divergence_and_many_probes_agree_where_one_probe_scatters():
  """A linear flow x' = A x with a full A maps x at t = 1 to noise exp(-A) x at t = 0,
  so log p(x) = log N(exp(-A) x; 0, I) - tr(A) exactly."""
  a = 0.3 * jax.random.normal(jax.random.PRNGKey(0), (6, 6))
  x = jax.random.normal(jax.random.PRNGKey(1), (50, 6))
  noise = x @ jax.scipy.linalg.expm(-a).T
  want = np.asarray(jnp.sum(-0.5 * noise**2, -1) - 3 * np.log(2 * np.pi) - jnp.trace(a))
  cfg = types.SimpleNamespace(sigma_min=0.002, sigma_max=80.0, rho=7.0)
  got = {probes: np.asarray(jax.jit(lambda x: diffusion.log_likelihood(
      "flow", lambda x, t: x @ a.T, x, cfg, jax.random.PRNGKey(2), 1e-6, probes=probes))(x))
      for probes in (0, 1, 64)}
  np.testing.assert_allclose(got[0], want, atol=1e-4)
  assert np.abs(got[1] - want).std() > 0.05  # one probe's estimate scatters round it
  assert np.abs(got[64] - want).std() < np.abs(got[1] - want).std() / 4


@pytest.mark.slow
def test_guidance_zero_is_the_unconditional_model_and_one_the_conditional():
  setup, _, _ = _setup("conditional,smoke")
  params = helpers.init(diffusion, setup, jax.random.PRNGKey(0))["params"]
  # Away from the initialisation, whose zero output layer would make every drift alike.
  keys = iter(jax.random.split(jax.random.PRNGKey(1), len(jax.tree.leaves(params))))
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(next(keys), p.shape), params)
  x = jax.random.normal(jax.random.PRNGKey(2), (6, 8, 8, 1))
  y, null = jnp.arange(6), jnp.full((6,), 10)

  @jax.jit  # every guidance value's path in one program (op by op took a minute)
  def drifts(params):
    f = lambda labels, w: diffusion.drift(setup, params, labels, w)(x, 1.3)
    return f(y, 0.0), f(null, 1.0), f(y, 1.0), f(y, 2.0)

  unguided, null_label, conditional, guided = drifts(params)
  np.testing.assert_array_equal(unguided, null_label)
  assert np.abs(conditional - null_label).max() > 1e-3  # the labels matter
  np.testing.assert_allclose(guided, 2 * conditional - null_label, atol=1e-4)


# ---- Training

@pytest.mark.slow
@pytest.mark.parametrize("arg", ["smoke", "flow,smoke"])
def test_a_short_run_lowers_the_loss(arg):
  setup, train, _ = _setup(arg, **{"optim.warmup_steps": 20, "model.channels": (16, 32)})
  state = helpers.init(diffusion, setup, jax.random.PRNGKey(0))
  step = jax.jit(functools.partial(diffusion.train_step, setup), donate_argnums=0)
  batches, losses = data.Batches(train, 64, 0), []
  for i in range(200):
    state, m = step(state, batches.get(i), jax.random.PRNGKey(i))
    losses.append(float(m["loss"]))
  first, last = np.mean(losses[:20]), np.mean(losses[-20:])
  # Measured (mean of the first and last 20 steps): edm 1.57 -> 1.29, flow 1.63 -> 1.31.
  # Neither can approach 0: at high noise the best denoiser (velocity) is still far
  # from the clean image (the velocity's noise part), so the floor is high.
  assert last < 0.9 * first, (first, last)


@pytest.fixture(scope="module")
def conditional_runs(tmp_path_factory):
  """The conditional smoke config trained on one device and on eight: {devices: (final
  evaluation, workdir)}. The one-device run is the config's smoke run (for
  tests/test_trainer.py's every config), with its final FID by sampler steps and
  bits/dim; the eight-device one evaluates only what the two compare."""
  runs = {}
  for devices in (1, 8):
    workdir = str(tmp_path_factory.mktemp(f"data{devices}"))
    overrides = {"mesh.data": devices}
    if devices == 8:
      overrides.update({"train.eval_every_steps": 1000, "eval.final_fid_steps": (),
                        "eval.final_nll": False})
    runs[devices] = trainer.train(helpers.config("diffusion_digits", "conditional,smoke",
                                                 **overrides), workdir), workdir
  return runs


@pytest.mark.slow
def test_the_smoke_run_reports_fid_by_sampler_steps_and_bits_per_dim(conditional_runs):
  results = conditional_runs[1][0]
  helpers.assert_smoke_ran(results)
  assert {"fid", "fid_steps2", "nll_bpd", "nll_bpd_sem"} <= set(results), sorted(results)


@pytest.mark.slow
def test_interrupted_run_resumes_bitwise(conditional_runs, tmp_path):
  """The one-device run again from its checkpoint at step 8 (its last, 12, and its
  results gone) ends as it did: the parameters, the optimizer state and the EMA
  survive Orbax's save and restore, and so does the label dropout's randomness."""
  results, workdir = conditional_runs[1]
  again = tmp_path / "again"
  shutil.copytree(workdir, again)
  shutil.rmtree(again / "checkpoints" / "12")
  os.remove(again / "results.json")
  config = helpers.config("diffusion_digits", "conditional,smoke", **{"mesh.data": 1})
  assert trainer.train(config, str(again)) == {**results, "train_step_traces": 1}
  got, want = (jax.device_get(trainer.load_run(str(w))[2]) for w in (again, workdir))
  assert set(got) == {"params", "opt_state", "ema"}
  jax.tree.map(np.testing.assert_array_equal, got, want)
  ema, params = got["ema"], got["params"]
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(params)))


@pytest.mark.slow
def test_eight_devices_train_like_one(conditional_runs):
  states = {d: jax.device_get(trainer.load_run(w)[2]) for d, (_, w) in conditional_runs.items()}
  # atol: a bias that feeds a one-channel-per-group GroupNorm (the last block's output at
  # 8 channels) has no gradient in exact arithmetic; rounding noise, different for each
  # summation order, moves it by ~1e-5 (seen on AVX2), while a wrong all-reduce or batch
  # split moves every weight by up to lr * steps = 1e-2.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
               states[1], states[8])
  fid = {d: values["fid"] for d, (values, _) in conditional_runs.items()}
  assert fid[8] == pytest.approx(fid[1], rel=1e-2)


@pytest.mark.slow
def test_the_sample_cli_draws_the_asked_label_with_guidance(conditional_runs, tmp_path):
  workdir = conditional_runs[1][1]
  out = tmp_path / "threes.png"
  result = helpers.cli("--workdir", workdir, "--label", "3", "--guidance", "2", "--steps", "4",
                       "--num", "16", "--out", str(out), module="genflax.sample")
  assert result.returncode == 0, result.stderr
  task, setup, state, _ = trainer.load_run(workdir)  # the same draw through the API
  path = tmp_path / "api.png"
  task.generate(setup, state, types.SimpleNamespace(
      num=16, label=3, seed=0, steps=4, guidance=2.0, out=str(path)))
  np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(path)))
  refused = helpers.cli("--workdir", workdir, "--steps", "0", "--out", str(out),
                        module="genflax.sample")
  assert refused.returncode == 2 and "--steps=0 must be >= 1" in refused.stderr
  # As data, with the run's own sampler: the images its evaluation scores.
  arrays = helpers.sample_arrays(workdir, tmp_path / "samples.npz", 250)
  np.testing.assert_array_equal(arrays["labels"], np.arange(250) % 10)
  want = diffusion.generate_images(setup, state["ema"], 250, jax.random.PRNGKey(0),
                                   setup.config.sample.steps)
  np.testing.assert_array_equal(arrays["images"], np.rint((want + 1) / 2 * 16))


@pytest.mark.slow
def test_bits_per_dim_compares_two_runs_image_by_image(conditional_runs, tmp_path, monkeypatch,
                                                        capsys):
  """experiments/bits_per_dim.py: --save keeps a run's per-image values and
  --against gives another run's paired difference to them (here the same run:
  exactly zero); a comparison over other images is refused before any work."""
  script = helpers.load_script("experiments/bits_per_dim.py")
  workdir, saved = conditional_runs[1][1], str(tmp_path / "a.npz")
  run = lambda *args: (monkeypatch.setattr("sys.argv", ["bits_per_dim.py", workdir, *args]),
                       script.main())
  run("--images", "3", "--bounds", "uniform", "gaussian:0.05", "--save", saved)
  first = capsys.readouterr().out
  values = np.load(saved)
  assert values["bpd"].shape == (2, 3) and list(values["bounds"]) == ["uniform:0",
                                                                      "gaussian:0.05"]
  assert f"| gaussian | 0.05 | {values['bpd'][1].mean():.4f} +- " in first
  run("--images", "3", "--bounds", "gaussian:0.05", "--against", saved)
  against = capsys.readouterr().out.splitlines()[-1]
  assert against.startswith(f"| gaussian:0.05 against gaussian:0.05 of {saved} | | ")
  assert against.endswith(" | +0.0000 +- 0.0000 |"), against
  with pytest.raises(SystemExit) as exit_:
    run("--images", "4", "--against", saved)
  assert exit_.value.code == 2
  assert "scored 3 test images with seed 0" in capsys.readouterr().err


@pytest.mark.slow
def test_bits_per_dim_compares_a_diffusion_run_with_a_vae_image_by_image(
    conditional_runs, tmp_path, monkeypatch, capsys):
  """A VAE run's IWAE bound on the same images as a diffusion run's ODE bound:
  more importance samples bound tighter, and the diffusion run's paired
  difference to the VAE's values is the difference of the two tables' rows."""
  script = helpers.load_script("experiments/bits_per_dim.py")
  vae_dir, saved = str(tmp_path / "vae"), str(tmp_path / "vae.npz")
  trainer.train(helpers.config("vae_digits", "smoke"), vae_dir)
  run = lambda workdir, *args: (
      monkeypatch.setattr("sys.argv", ["bits_per_dim.py", workdir, *args]), script.main())
  run(vae_dir, "--images", "5", "--bounds", "iwae:1", "iwae:64", "--save", saved)
  vae_bpd = np.load(saved)["bpd"]
  capsys.readouterr()
  assert vae_bpd.shape == (2, 5) and np.all(np.isfinite(vae_bpd))
  # log p(x) >= IWAE_64 >= IWAE_1 on average; the smoke VAE's gap is wide.
  assert vae_bpd[1].mean() < vae_bpd[0].mean() - 0.01, vae_bpd
  diffusion_dir = conditional_runs[1][1]
  run(diffusion_dir, "--images", "5", "--bounds", "gaussian:0.05", "--save",
      str(tmp_path / "d.npz"))
  ode = np.load(str(tmp_path / "d.npz"))["bpd"][0]
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_:  # two bounds there: which one is ambiguous
    run(diffusion_dir, "--images", "5", "--bounds", "gaussian:0.05", "--against", saved)
  assert "has no gaussian:0.05 bound (it has iwae:1, iwae:64)" in str(exit_.value)
  run(vae_dir, "--images", "5", "--bounds", "iwae:64", "--save", saved)
  capsys.readouterr()
  run(diffusion_dir, "--images", "5", "--bounds", "gaussian:0.05", "--against", saved)
  row = capsys.readouterr().out.splitlines()[-1]
  diff = ode - np.load(saved)["bpd"][0]
  assert row.startswith(f"| gaussian:0.05 against iwae:64 of {saved} | | ")
  assert row.endswith(f" | {diff.mean():+.4f} +- {diff.std() / math.sqrt(5):.4f} |"), row
  run(str(tmp_path / "d.npz"), "--against", saved)  # the saved values, nothing recomputed
  assert capsys.readouterr().out.splitlines()[-1] == row
  with pytest.raises(SystemExit) as exit_:
    run(vae_dir, "--images", "5", "--bounds", "gaussian:0.05")
  assert "a VAE takes iwae:K bounds" in str(exit_.value)


@pytest.mark.slow
def test_the_fid_by_sampler_table_scores_the_runs_own_samples(conditional_runs):
  script = helpers.load_script("experiments/fid_by_sampler.py")
  workdir = conditional_runs[1][1]
  rows, _, _ = script.table(workdir, ["heun", "euler"], [2, 3], [0, 2], 60, 2)
  assert [(r["sampler"], r["guidance"], r["steps"], r["passes"]) for r in rows] == [
      ("heun", 0, 2, 3), ("heun", 0, 3, 5), ("heun", 2, 2, 6), ("heun", 2, 3, 10),
      ("euler", 0, 2, 2), ("euler", 0, 3, 3), ("euler", 2, 2, 4), ("euler", 2, 3, 6)]
  assert all(r["fid_draws"] == 2 and r["fid_sd"] > 0 for r in rows)
  assert rows[0]["fid"] != rows[2]["fid"]  # guidance changes the samples
  # One draw at the run's own sampler is the set its evaluation draws from that key.
  (row,), _, ref = script.table(workdir, ["heun"], [3], [1], 60, 1)
  _, setup, state, _ = trainer.load_run(workdir)
  images = diffusion.generate_images(setup, state["ema"], 60, jax.random.PRNGKey(0), 3)
  assert row["fid"] == pytest.approx(image_metrics.fid(ref["features"](images)[0], ref["real"]),
                                     rel=1e-6)
  assert script.markdown_row(row, 1).startswith("| heun | 3 | 5 | 1 | ")
