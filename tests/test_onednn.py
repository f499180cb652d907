"""bfloat16 matmuls through oneDNN (genflax/models/onednn.py): the same values and
gradients as XLA's bfloat16 dot, the same training, and a clear refusal where it
cannot run."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genflax import data, tasks, trainer
from genflax.models import conv, onednn, transformer
from genflax.tasks import vae
from tests import helpers



@pytest.fixture(autouse=True)
def _built():
  """Built on first use (about 30 s, once per machine); skipped where it cannot be."""
  if onednn.unavailable() is not None:
    pytest.skip(f"oneDNN matmul unavailable: {onednn.unavailable()}")


@pytest.mark.parametrize("x_shape", [(64, 48), (3, 5, 48)])
def test_values_and_gradients_are_xlas_bfloat16_dots(x_shape):
  x = jax.random.normal(jax.random.PRNGKey(0), x_shape).astype(jnp.bfloat16)
  w = jax.random.normal(jax.random.PRNGKey(1), (48, 40)).astype(jnp.bfloat16)
  c = jax.random.normal(jax.random.PRNGKey(2), (*x_shape[:-1], 40)).astype(jnp.bfloat16)
  loss = lambda mm: lambda x, w: jnp.sum((mm(x, w) * c).astype(jnp.float32))  # dy = c
  ours, xla = (jax.jit(jax.grad(loss(mm), (0, 1))) for mm in (onednn.matmul, jnp.matmul))
  got, want = (np.asarray(mm(x, w), np.float32) for mm in (jax.jit(onednn.matmul), jnp.matmul))
  assert onednn.matmul(x, w).dtype == jnp.bfloat16 and got.shape == (*x_shape[:-1], 40)
  # Both accumulate in float32 and round to bfloat16: at most a bfloat16 step apart.
  assert (np.abs(got - want) <= 2**-7 * np.abs(want) + 1e-6).all()
  for got, want in zip(ours(x, w), xla(x, w)):
    assert got.dtype == want.dtype == jnp.bfloat16 and got.shape == want.shape
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert (np.abs(got - want) <= 2**-7 * np.abs(want) + 1e-6).all()


def test_gradients_of_gradients_are_xlas():
  """A penalty on the input gradient (a GAN's R1), differentiated again: each of
  the matmul's forms has its VJP on oneDNN, so any order runs there."""
  x = jax.random.normal(jax.random.PRNGKey(0), (32, 48)).astype(jnp.bfloat16)
  w = (jax.random.normal(jax.random.PRNGKey(1), (48, 40)) / 7).astype(jnp.bfloat16)

  def penalty(mm):
    out = lambda x, w: jnp.sum(jnp.tanh(mm(x, w).astype(jnp.float32)))
    return lambda x, w: jnp.sum(jnp.square(jax.grad(out)(x, w).astype(jnp.float32)))

  ours = jax.jit(jax.grad(penalty(onednn.matmul), (0, 1)))
  assert onednn.TARGET in ours.lower(x, w).as_text()
  for got, want in zip(ours(x, w), jax.grad(penalty(jnp.matmul), (0, 1))(x, w)):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, atol=2**-6 * np.abs(want).max())


@pytest.mark.slow
def test_a_bfloat16_vae_trains_the_same_on_onednn_as_on_xla(tmp_path):
  losses = {}
  for kind in ("row_major", "onednn"):
    config = helpers.config("vae_digits", "smoke", **{
        "mesh.data": 1, "model.dtype": "bfloat16", "model.dense_grads": kind})
    setup = vae.build(config, data.load("digits")[2])
    state = helpers.init(vae, setup, jax.random.PRNGKey(0))
    train = data.load("digits")[0]
    step = jax.jit(lambda s, b, r: vae.train_step(setup, s, b, r))
    hlo = step.lower(state, data.Batches(train, 64, 0).get(0), jax.random.PRNGKey(0)).as_text()
    assert (onednn.TARGET in hlo) == (kind == "onednn")
    batches, curve = data.Batches(train, 64, 0), []
    for i in range(60):
      state, m = step(state, batches.get(i), jax.random.PRNGKey(i))
      curve.append(float(m["loss"]))
    losses[kind] = np.array(curve)
  np.testing.assert_allclose(losses["onednn"], losses["row_major"], rtol=2e-2)
  assert losses["onednn"][-20:].mean() < losses["onednn"][:20].mean()  # it learns


def test_where_it_cannot_be_built_the_run_says_why_before_its_first_step(tmp_path):
  env = {**os.environ, "CXX": "/nonexistent/g++", "GENFLAX_CACHE": str(tmp_path / "cache")}
  result = helpers.cli("--config=configs/vae_digits.py:smoke", f"--workdir={tmp_path / 'w'}",
                       "--config.model.dtype=bfloat16", "--config.model.dense_grads=onednn",
                       env=env, fork=False)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == (
      "error: model.dense_grads=onednn cannot run here: no C++ compiler (g++, or $CXX) to build "
      "the oneDNN matmul; use row_major or xla")
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "w").exists()  # refused with the config, before any work


@pytest.mark.parametrize("spec, x_shape, w_shape", [("btd,dhk->bthk", (2, 5, 16), (16, 4, 4)),
                                                    ("bthk,hkd->btd", (2, 5, 4, 4), (4, 4, 16))])
def test_the_attentions_projections_are_its_einsums(spec, x_shape, w_shape):
  x = jax.random.normal(jax.random.PRNGKey(0), x_shape).astype(jnp.bfloat16)
  w = jax.random.normal(jax.random.PRNGKey(1), w_shape).astype(jnp.bfloat16)
  got = jax.jit(lambda x, w: transformer.project(spec, x, w, "onednn"))
  assert onednn.TARGET in got.lower(x, w).as_text()
  want = np.asarray(jnp.einsum(spec, x, w), np.float32)
  assert (np.abs(np.asarray(got(x, w), np.float32) - want) <= 2**-7 * np.abs(want) + 1e-6).all()


@pytest.mark.slow
def test_a_bfloat16_lm_trains_the_same_on_onednn_as_on_xla(tmp_path):
  losses = {}
  for kind in ("row_major", "onednn"):
    config = helpers.config("lm_shakespeare", "smoke", **{
        "mesh.data": 1, "model.dtype": "bfloat16", "model.dense_grads": kind,
        "train.num_steps": 30, "optim.lr": 3e-3})
    run = trainer.build(config, str(tmp_path / kind))
    state = tasks.run_once(run.init, *tasks.run_keys(0), out_shardings=run.state_sh)
    hlo = run.train_step.lower(state, run.feed.inputs(0)).as_text()
    # Each layer's four projections and two dense layers: a call forward, two backward.
    depth = transformer.get_variant(config.model.variant).num_layers
    assert hlo.count("@" + onednn.TARGET) == (18 * depth if kind == "onednn" else 0)
    curve = []
    for step in range(30):
      state, m = run.train_step(state, run.feed.inputs(step))
      curve.append(float(m["loss"]))
    losses[kind] = np.array(curve)
  np.testing.assert_allclose(losses["onednn"], losses["row_major"], rtol=2e-2)
  assert losses["onednn"][-5:].mean() < 0.85 * losses["onednn"][0]


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("form, c_in, c_out", [("patches", 16, 24), ("patches", 1, 24),
                                               ("scatter", 24, 1)])
def test_convolutions_on_onednn_are_xlas_bfloat16_convolutions(transpose, form, c_in, c_out):
  """model.conv=onednn: the patches and scatter forms' matmuls on oneDNN give XLA's
  bfloat16 convolution, and its gradients, to a bfloat16 rounding step or two."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, c_in)).astype(jnp.bfloat16)
  w = (jax.random.normal(jax.random.PRNGKey(1), (4, 4, c_in, c_out)) / 4).astype(jnp.bfloat16)
  if transpose:
    op = lambda form, mm: lambda x, w: conv.conv_transpose_as(form, x, w, (2, 2), "SAME", mm)
  else:
    op = lambda form, mm: lambda x, w: conv.conv_as(form, x, w, (2, 2), ((1, 2), (1, 1)), mm)
  ours, xla = jax.jit(op(form, conv.onednn_matmul)), jax.jit(op("xla", None))
  assert onednn.TARGET in ours.lower(x, w).as_text()
  c = jax.random.normal(jax.random.PRNGKey(2), xla(x, w).shape).astype(jnp.bfloat16)
  loss = lambda f: lambda x, w: jnp.sum((f(x, w) * c).astype(jnp.float32))
  close = lambda got, want: np.testing.assert_allclose(
      np.asarray(got, np.float32), np.asarray(want, np.float32),
      atol=2**-6 * float(np.abs(np.asarray(want, np.float32)).max()))
  close(ours(x, w), xla(x, w))
  for got, want in zip(jax.grad(loss(ours), (0, 1))(x, w), jax.grad(loss(xla), (0, 1))(x, w)):
    assert got.dtype == want.dtype == jnp.bfloat16
    close(got, want)


@pytest.mark.parametrize("x_shape, kernel_hw, strides, pads", [
    ((2, 8, 8, 3), (4, 4), (2, 2), ((1, 2), (1, 2))),     # a GAN D's layer
    ((2, 7, 9, 5), (3, 3), (1, 1), ((1, 1), (1, 1))),     # a U-Net's
    ((1, 6, 7, 4), (3, 2), (2, 1), ((-1, 2), (0, -1))),   # cropped, unequal
    ((3, 5, 5, 2), (2, 2), (3, 3), ((0, 0), (1, 0)))])    # a kernel smaller than its stride
def test_patches_on_onednn_are_xlas_gather_to_the_bit(x_shape, kernel_hw, strides, pads):
  """onednn.im2col gives the slices' concatenation exactly, and its gradients (col2im,
  adding in float32 and rounding once), first and second order, those of the same
  gather in float32 rounded to bfloat16."""
  x = jax.random.normal(jax.random.PRNGKey(0), x_shape).astype(jnp.bfloat16)

  def xla(x):
    xp = conv._pad(x.astype(jnp.float32), pads)
    out_hw = conv._out_hw(*xp.shape[1:3], kernel_hw, strides)
    return jnp.concatenate(conv._taps(xp, *kernel_hw, strides, out_hw), -1).astype(jnp.bfloat16)

  ours = lambda x: onednn.im2col(x, kernel_hw, strides, pads)
  bits = lambda a: np.asarray(a).view(np.uint16)
  assert ours(x).dtype == jnp.bfloat16
  np.testing.assert_array_equal(bits(ours(x)), bits(xla(x)))
  c = jax.random.normal(jax.random.PRNGKey(1), xla(x).shape).astype(jnp.bfloat16)
  first = lambda f: jax.grad(lambda x: jnp.sum((f(x) * c).astype(jnp.float32)))
  second = lambda f: jax.grad(lambda x: jnp.sum(jnp.square(jax.grad(
      lambda x: jnp.sum(jnp.tanh(f(x).astype(jnp.float32))))(x).astype(jnp.float32))))
  for order in (first, second):
    got, want = order(ours)(x), order(xla)(x)
    assert got.dtype == jnp.bfloat16 and float(jnp.abs(want.astype(jnp.float32)).max()) > 0
    np.testing.assert_array_equal(bits(got), bits(want))


@pytest.mark.slow
def test_a_bfloat16_dcgan_trains_the_same_on_onednn_as_with_matmul_convs(tmp_path):
  """The smoke DCGAN in bfloat16 with model.conv=onednn (its convolutions' and dense
  layers' matmuls on oneDNN) follows model.conv=matmul's losses."""
  losses = {}
  for kind in ("matmul", "onednn"):
    config = helpers.config("dcgan_fashion", "smoke", **{
        "mesh.data": 1, "model.dtype": "bfloat16", "model.conv": kind, "train.num_steps": 20})
    run = trainer.build(config, str(tmp_path / kind))
    state = tasks.run_once(run.init, *tasks.run_keys(0), out_shardings=run.state_sh)
    hlo = run.train_step.lower(state, run.feed.inputs(0)).as_text()
    assert (onednn.TARGET in hlo) == (kind == "onednn")
    curve = []
    for step in range(20):
      state, m = run.train_step(state, run.feed.inputs(step))
      curve.append([float(m["d_loss"]), float(m["g_loss"])])
    losses[kind] = np.array(curve)
  np.testing.assert_allclose(losses["onednn"], losses["matmul"], rtol=5e-2, atol=2e-2)
