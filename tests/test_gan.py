"""The GAN family: updates, EMA, penalties, FID maths, feature network, training, resume."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from PIL import Image

from genflax import checkpoints, data, sharding, tasks, trainer
from genflax.errors import ConfigError
from genflax.models import layers
from genflax.tasks import gan, image_metrics
from tests import helpers


def _setup(name="gan_digits", arg="smoke", **overrides):
  train, test, info = data.load("digits")
  return gan.build(helpers.config(name, arg, **overrides), info), train, test


def _changed(a, b) -> bool:
  return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ---- One step

@pytest.mark.slow
def test_each_update_changes_only_its_own_network():
  """With one optimizer's lr at 0, the other network alone moves: no gradient of
  D's loss reaches G's parameters, nor G's loss D's."""
  _, train, _ = _setup()
  batch = data.Batches(train, 64, 0).get(0)
  for frozen, moving in (("g", "d"), ("d", "g")):
    setup, _, _ = _setup(**{f"optim_{frozen}.lr": 0.0})
    state = helpers.init(gan, setup, jax.random.PRNGKey(0))
    new, metrics = jax.jit(functools.partial(gan.train_step, setup))(
        state, batch, jax.random.PRNGKey(1))
    assert not _changed(new["params"][frozen], state["params"][frozen])
    assert _changed(new["params"][moving], state["params"][moving])
    assert all(np.isfinite(float(v)) for v in metrics.values())
    # EMA of G: decay * old + (1 - decay) * the new parameters.
    decay = setup.config.loss.ema_decay
    want = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state["ema_g"],
                        new["params"]["g"])
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7),
                 new["ema_g"], want)
    assert int(new["step"]) == 1


@pytest.mark.slow
@pytest.mark.parametrize("name,arg", [("gan_digits", "wgan,sn,smoke"),
                                      ("cgan_digits", "mlp,concat,hinge,smoke")])
def test_loss_and_regulariser_variants_train(name, arg):
  setup, train, _ = _setup(name, arg)
  state = helpers.init(gan, setup, jax.random.PRNGKey(0))
  step = jax.jit(functools.partial(gan.train_step, setup))
  batches = data.Batches(train, 64, 0)
  for i in range(3):  # R1 is lazy every 2 steps in smoke: both branches run
    state, metrics = step(state, batches.get(i), jax.random.PRNGKey(i))
  assert all(np.isfinite(float(v)) for v in metrics.values())
  if setup.config.model.spectral_norm:
    assert "sn" in state


def test_dcgan_sizes_itself_from_the_image_shape():
  """28x28 (two upsamplings from 7x7) and 32x32x3 (three from 4x4) need no edits."""
  for shape, g_ch, d_ch in (((28, 28, 1), (32, 16), (16, 32)),
                            ((32, 32, 3), (32, 16, 8), (8, 16, 32))):
    info = data.DatasetInfo("fake", shape, 10, 256, 100, 100)
    config = helpers.config("cgan_digits", "smoke", **{"model.g_channels": g_ch,
                                                       "model.d_channels": d_ch})
    setup = gan.build(config, info)
    state = jax.eval_shape(functools.partial(gan.init, setup), jax.random.PRNGKey(0))
    z, y = jnp.zeros((2, config.model.latent_dim)), jnp.zeros((2,), jnp.int32)
    images = jax.eval_shape(lambda p: setup.g.apply({"params": p}, z, y), state["ema_g"])
    assert images.shape == (2, *shape)
    logits = jax.eval_shape(lambda p, x: setup.d.apply({"params": p}, x, y),
                            state["params"]["d"], images)
    assert logits.shape == (2,)



def test_step_settings_it_cannot_honour_are_refused():
  for key, value, message in (
      ("train.microbatches", 2, "gradient accumulation is not supported, use 1"),
      ("train.grad_allreduce", "flat", "use per_param")):
    with pytest.raises(ConfigError, match=message):
      gan.check(helpers.config("gan_digits", "smoke", **{key: value}))

# ---- Penalties against finite differences

def _toy_critic(x):
  """A smooth non-linear per-image critic: [B, H, W, C] -> [B]."""
  w = jnp.arange(1.0, 1.0 + x[0].size).reshape(x.shape[1:]) / x[0].size
  return jnp.sum(jnp.sin(3.0 * x * w[None]) + x**2 * w[None], axis=(1, 2, 3))


def _fd_grad_norms(x, eps=1e-3):
  """Central differences, per image, in float64 NumPy."""
  x = np.asarray(x, np.float64)
  grads = np.zeros_like(x)
  for idx in np.ndindex(*x.shape[1:]):
    step = np.zeros(x.shape[1:])
    step[idx] = eps
    up = np.asarray(_toy_critic(jnp.asarray(x + step, jnp.float32)), np.float64)
    down = np.asarray(_toy_critic(jnp.asarray(x - step, jnp.float32)), np.float64)
    grads[(slice(None), *idx)] = (up - down) / (2 * eps)
  return np.sqrt((grads.reshape(len(x), -1) ** 2).sum(1))


def test_gradient_penalty_and_r1_match_finite_differences():
  real = jax.random.uniform(jax.random.PRNGKey(0), (3, 2, 2, 1), minval=-1, maxval=1)
  fake = jax.random.uniform(jax.random.PRNGKey(1), (3, 2, 2, 1), minval=-1, maxval=1)
  rng = jax.random.PRNGKey(2)
  eps = np.asarray(jax.random.uniform(rng, (3, 1, 1, 1)))  # as gradient_penalty draws it
  x_hat = eps * np.asarray(real) + (1 - eps) * np.asarray(fake)
  want_gp = np.mean((_fd_grad_norms(x_hat) - 1) ** 2)
  want_r1 = np.mean(_fd_grad_norms(real) ** 2)
  assert float(gan.gradient_penalty(_toy_critic, real, fake, rng)) == pytest.approx(want_gp, rel=1e-3)
  assert float(gan.r1_penalty(_toy_critic, real)) == pytest.approx(want_r1, rel=1e-3)


def test_batch_norm_and_minibatch_std_use_the_batchs_statistics():
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 3, 3, 5)) * 3 + 2
  y, variables = layers.BatchNorm().init_with_output(jax.random.PRNGKey(1), x)
  assert set(variables) == {"params"}  # no running averages
  np.testing.assert_allclose(y.mean((0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(y.var((0, 1, 2)), 1, rtol=1e-4)
  h = layers.minibatch_std(x)  # groups of 4: examples 0-3 and 4-7
  assert h.shape == (8, 3, 3, 6)
  np.testing.assert_array_equal(h[..., :5], x)
  for group in (slice(0, 4), slice(4, 8)):
    want = np.sqrt(np.var(np.asarray(x[group]), 0) + 1e-8).mean()
    np.testing.assert_allclose(h[group, ..., 5], want, rtol=1e-5)
  same = layers.minibatch_std(jnp.broadcast_to(x[:1], x.shape))  # a collapsed batch
  np.testing.assert_allclose(same[..., 5], 1e-4, rtol=1e-3)
  assert layers.minibatch_std(x[:6]).shape == (6, 3, 3, 6)  # groups of 3


# ---- Scores

def test_fid_matches_scipy_and_is_zero_for_a_set_with_itself():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16))
  b = rng.normal(size=(200, 16)) @ rng.normal(size=(16, 16)) + 0.5
  mu_a, mu_b = a.mean(0), b.mean(0)
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  want = (np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b)
          - 2 * np.trace(scipy.linalg.sqrtm(cov_a @ cov_b).real))
  assert image_metrics.fid(a, b) == pytest.approx(want, rel=1e-8)
  assert abs(image_metrics.fid(a, a)) < 1e-8 * np.trace(cov_a)
  # KID is unbiased: ~0 between two draws of one distribution, clearly not for two.
  x, y = rng.normal(size=(2, 400, 16))
  assert abs(image_metrics.kid(x, y)) < 0.1 * image_metrics.kid(x, y + 0.5)
  assert image_metrics.precision_recall(a, a) == (1.0, 1.0)
  # Each point's k-th nearest other point, as a full sort of its distances finds it;
  # the real side's radii, computed once per run, give the same scores.
  d = np.sqrt(((a[:, None] - a[None]) ** 2).sum(-1))
  np.testing.assert_allclose(image_metrics.knn_radii(a, 3), np.sort(d, 1)[:, 3], rtol=1e-6)
  np.testing.assert_allclose(image_metrics.knn_radii(a, 3, block=64), np.sort(d, 1)[:, 3],
                             rtol=1e-6)  # rows 64 at a time, the last block short
  assert (image_metrics.precision_recall(a, b, real_radii=image_metrics.knn_radii(a))
          == image_metrics.precision_recall(a, b) != (1.0, 1.0))
  probs = np.eye(10)[np.arange(200) % 10]  # confident and balanced: the maximum
  assert image_metrics.inception_score(probs) == pytest.approx(10.0, rel=1e-6)
  probs[:150] = np.eye(10)[3] * 0.6 + 0.04  # three quarters called 3, each with p 0.64
  np.testing.assert_allclose(image_metrics.class_shares(probs),
                             [0.025] * 3 + [0.775] + [0.025] * 6)


@pytest.fixture(scope="module")
def features():
  """The network every digits run of this session uses (in the tests' TFDS_DATA_DIR)."""
  train, test, info = data.load("digits")
  return None, image_metrics.load_or_train(None, train, test, info)


def test_feature_network_is_accurate_saved_and_reused(features):
  data_dir, (fn, accuracy) = features
  assert accuracy >= 0.96  # measured: 0.989 on the 360 test digits
  path = image_metrics.feature_dir(data_dir, "digits")
  assert os.path.isdir(path)
  train, test, info = data.load("digits")
  again, accuracy_again = image_metrics.load_or_train(data_dir, train, test, info)
  assert accuracy_again == accuracy
  x = image_metrics.scale(test["image"][:10], info.num_levels)
  np.testing.assert_array_equal(again(x)[0], fn(x)[0])


@pytest.mark.slow
def test_feature_network_steps_default_to_three_epochs_and_others_are_kept_apart(tmp_path):
  assert image_metrics.train_steps(1437) == 400  # digits: the 400 every digits score used
  assert image_metrics.train_steps(60000) == 1407  # Fashion-MNIST: 3 epochs of 128
  train, test, info = data.load("digits")
  _, accuracy = image_metrics.load_or_train(str(tmp_path), train, test, info, steps=5)
  assert os.listdir(tmp_path / "genflax_features") == ["digits-steps5"]
  assert 0.1 < accuracy < 0.9  # 5 steps: far from the default network's 0.989
  image_metrics.load_or_train(str(tmp_path), train, test, info, steps=400)  # the default's count
  assert sorted(os.listdir(tmp_path / "genflax_features")) == ["digits", "digits-steps5"]
  # A process that trained the network too but saves second keeps the first's, leaving no copy.
  image_metrics.save(str(tmp_path / "genflax_features" / "digits"), {"x": np.zeros(3)})
  assert sorted(os.listdir(tmp_path / "genflax_features")) == ["digits", "digits-steps5"]


def test_class_coverage_shows_a_generator_that_draws_one_class(features):
  train, test, info = data.load("digits")
  ref = image_metrics.reference(helpers.config("dcgan_digits", ""), train, test, info, 360)
  real = image_metrics.scale(test["image"], info.num_levels)
  balanced = image_metrics.scores(ref, real)
  shares = [balanced[f"class_share_{k}"] for k in range(10)]
  assert sum(shares) == pytest.approx(1.0)
  # The 360 test digits hold 35 to 37 of each class (a share of 0.10); the network
  # is at least 96% accurate (measured here: a largest share of 0.13).
  assert balanced["class_share_max"] == max(shares) < 0.16
  assert balanced["class_share_max_real"] == balanced["class_share_max"]
  threes = image_metrics.scores(ref, real[test["label"] == 3])
  assert threes["class_share_max"] == threes["class_share_3"] > 0.9
  assert threes["class_share_max_real"] == balanced["class_share_max"]


def test_scores_over_draws_give_each_values_mean_and_its_spread(features):
  train, test, info = data.load("digits")
  ref = image_metrics.reference(helpers.config("dcgan_digits", ""), train, test, info, 360)
  sets = [image_metrics.scale(train["image"][i * 300:(i + 1) * 300], info.num_levels)
          for i in range(3)]
  keys = []
  def generate(rng):  # the next set of "samples", and the key it was drawn with
    keys.append(np.asarray(rng))
    return sets[len(keys) - 1]
  values = image_metrics.scores_over_draws(ref, generate, jax.random.PRNGKey(0), 3)
  each = [image_metrics.scores(ref, x) for x in sets]
  for key in ("fid", "recall", "class_share_max"):
    assert values[key] == pytest.approx(np.mean([e[key] for e in each]), rel=1e-12)
    assert values[f"{key}_sd"] == pytest.approx(np.std([e[key] for e in each], ddof=1))
  assert values["fid_sd"] > 0 and values["fid_draws"] == 3
  assert len({k.tobytes() for k in keys}) == 3  # independent draws
  keys.clear()
  assert image_metrics.scores_over_draws(ref, generate, jax.random.PRNGKey(0), 1) == each[0]


# ---- Training

@pytest.mark.slow
def test_short_dcgan_run_lowers_fid(features):
  setup, train, test = _setup("dcgan_digits", "", **{
      "model.g_channels": (32, 16), "model.d_channels": (16, 32)})
  state = helpers.init(gan, setup, jax.random.PRNGKey(0))
  step = jax.jit(functools.partial(gan.train_step, setup), donate_argnums=0)
  batches = data.Batches(train, 64, 0)
  for i in range(500):
    state, _ = step(state, batches.get(i), jax.random.PRNGKey(i))
  scores = gan.evaluate(setup, state, test, jax.random.PRNGKey(1), False)
  # Measured: FID 2039 at init, 810 after 500 steps (floor 12.6); the full
  # default DCGAN reaches ~42 in 3000 (experiments/gan_digits).
  assert scores["fid_floor"] < 0.1 * scores["fid_init"]
  assert scores["fid"] < 0.5 * scores["fid_init"]


@pytest.mark.slow
def test_interrupted_run_resumes_bitwise(tmp_path):
  """Steps 0-12 straight equal 0-6, an Orbax save and restore (genflax.checkpoints,
  as the trainer does), then 6-12: G, D, both optimizer states, EMA, the
  spectral-norm vectors and the R1 clock all survive."""
  config = helpers.config("cgan_digits", "mlp,sn,r1,smoke", **{"mesh.data": 1})
  train, _, info = data.load("digits")
  setup = gan.build(config, info)
  init, abstract, _ = trainer.state_layout(gan, setup, sharding.make_mesh(config.mesh))
  batches = data.Batches(train, config.data.batch_size, config.seed)

  @jax.jit
  def step(state, batch):  # the trainer's wrapping: the step's RNG depends on the step
    rng = jax.random.fold_in(state["rng"], state["step"])
    task_state, _ = gan.train_step(setup, state["task"], batch, rng)
    return {"step": state["step"] + 1, "rng": state["rng"], "task": task_state}

  def run(state, start, stop):
    for i in range(start, stop):
      state = step(state, batches.get(i))
    return state

  want = run(tasks.run_once(init, *tasks.run_keys(0)), 0, 12)
  mngr = checkpoints.manager(str(tmp_path))
  checkpoints.save(mngr, 6, run(tasks.run_once(init, *tasks.run_keys(0)), 0, 6), {"step": 6})
  mngr.wait_until_finished()
  restored, meta = checkpoints.restore(mngr, abstract)
  got = run(restored, meta["step"], 12)
  assert set(got["task"]) == {"params", "opt_state", "ema_g", "step", "sn"}
  assert int(got["task"]["step"]) == 12
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(want))


@pytest.mark.slow
def test_conditional_run_samples_one_class_from_the_cli(tmp_path):
  workdir = str(tmp_path / "run")
  config = helpers.config("cgan_digits", "mlp,smoke", **{
      "mesh.data": 1, "train.eval_every_steps": 1000, "eval.final_fid_samples": 64})
  results = trainer.train(config, workdir)
  assert results["fid_floor"] < results["fid_init"]
  out = tmp_path / "threes.png"
  result = helpers.cli("--workdir", workdir, "--num", "16", "--label", "3", "--out", str(out),
                       module="genflax.sample")
  assert result.returncode == 0, result.stderr
  assert np.asarray(Image.open(out)).std() > 0
  result = helpers.cli("--workdir", workdir, "--label", "10", "--out", str(out),
                       module="genflax.sample")
  assert result.returncode == 2 and "--label=10: the model's classes are 0 to 9" in result.stderr
  # As data: every class in turn, as the evaluation draws them, or the one asked for.
  arrays = helpers.sample_arrays(workdir, tmp_path / "all.npz", 250)
  np.testing.assert_array_equal(arrays["labels"], np.arange(250) % 10)
  _, setup, state, _ = trainer.load_run(workdir)
  want = gan.generate_images(setup, state["ema_g"], 250, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(arrays["images"], np.rint((want + 1) / 2 * 16))
  threes = helpers.sample_arrays(workdir, tmp_path / "threes.npz", 20, "--label", "3")
  np.testing.assert_array_equal(threes["labels"], np.full(20, 3))


def test_fid_init_scores_the_generator_the_run_started_from(tmp_path, features):
  """A run of 0 steps evaluates its initial EMA generator: its FID is fid_init exactly."""
  config = helpers.config("gan_digits", "smoke", **{
      "train.num_steps": 0, "eval.final_fid_samples": 64, "seed": 3})
  results = trainer.train(config, str(tmp_path))
  assert results["step"] == 0
  assert results["fid"] == results["fid_init"]


@pytest.mark.slow
def test_penalties_see_the_spectral_norm_the_loss_uses():
  """R1 and the gradient penalty differentiate the same normalised D as the
  loss: the penalty's D gives the loss's logits on the real images."""
  config = helpers.config("gan_digits", "sn,smoke")
  train, _, info = gan.datasets(config, "")
  setup = gan.build(config, info)
  state = helpers.init(gan, setup, jax.random.PRNGKey(0))
  x, y = gan.inputs(setup, {k: v[:8] for k, v in train.items()})
  fake = jax.random.uniform(jax.random.PRNGKey(1), x.shape, minval=-1, maxval=1)
  params, sn = state["params"]["d"], state["sn"]
  logits, new_sn = gan.apply_d(setup, params, sn, jnp.concatenate([x, fake]), y, update=True)
  assert not jax.tree.all(jax.tree.map(np.array_equal, new_sn, sn))  # the power step moved u
  penalty_d, _ = gan.apply_d(setup, params, sn, x, y)  # as d_update's d_fn calls it
  np.testing.assert_allclose(penalty_d, logits[:8], rtol=1e-5, atol=1e-6)
  stale_d, _ = gan.apply_d(setup, params, new_sn, x, y)  # what a later call would see
  assert not np.allclose(stale_d, logits[:8], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sharded_over_8_devices_equals_one_device(tmp_path):
  """Both networks, both optimizers and the EMA: the batch split 8 ways changes
  only the summation order."""
  states = []
  for data_axis in (1, 8):
    config = helpers.config("cgan_digits", **{"mesh.data": data_axis, "eval.batch_size": 40,
                                              "train.eval_every_steps": 1000,
                                              # statistics over the batch, split 8 ways
                                              "model.g_norm": "batch",
                                              "model.d_minibatch_std": True})
    trainer.train(config, str(tmp_path / f"data{data_axis}"))
    states.append(trainer.load_run(str(tmp_path / f"data{data_axis}"))[2])
  for key in ("params", "ema_g"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 states[0][key], states[1][key])
