"""genflax/models/conv.py: every formulation of Conv and ConvTranspose equals
Flax's nn.Conv / nn.ConvTranspose (outputs and gradients, same parameters),
each layer takes the form the rule says, and the families' train steps with
model.conv=matmul or forward equal XLA's convolution."""
import re

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from genflax import tasks, trainer
from genflax.models import conv
from tests import helpers

IMPLS = ("xla", "matmul", "forward")
# (input H, W, kernel, strides, padding, channels in, out): the families' layers
# (4x4 and 3x3 stride 2, 3x3 stride 1) and the edges: VALID, odd sizes, a kernel
# smaller than its stride, unequal strides; fewer output than input
# channels; one layer wide on both sides (more than conv.NARROW channels).
SHAPES = [
    (8, 8, 4, 2, "SAME", 1, 8), (7, 9, 4, 2, "SAME", 3, 5), (14, 14, 3, 2, "SAME", 2, 4),
    (7, 8, 3, 2, "SAME", 4, 2), (9, 10, 3, 1, "SAME", 2, 3), (8, 9, 4, 2, "VALID", 2, 3),
    (7, 7, 3, 2, "VALID", 2, 3), (5, 6, 2, 3, "SAME", 2, 2), (6, 7, 3, (2, 1), "SAME", 2, 3),
    (9, 10, 3, 1, "SAME", 5, 2), (8, 9, 3, 2, "SAME", 9, 2), (7, 8, 4, 2, "VALID", 9, 2),
    (6, 7, 3, 2, "SAME", 9, 10),
]
# The fast tier (-m "not slow") runs one of them, the smallest.
QUICK = (5, 6, 2, 3, "SAME", 2, 2)
SHAPES = [s if s == QUICK else pytest.param(*s, marks=pytest.mark.slow) for s in SHAPES]


@pytest.mark.parametrize("flax_cls, ours", [(nn.Conv, conv.Conv), (nn.ConvTranspose, conv.ConvTranspose)])
@pytest.mark.parametrize("h, w, k, strides, padding, c_in, c_out", SHAPES)
def test_every_formulation_equals_flax(flax_cls, ours, h, w, k, strides, padding, c_in, c_out):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, h, w, c_in)), jnp.float32)
  ref = flax_cls(c_out, (k, k), strides=strides, padding=padding)
  params = jax.jit(ref.init)(jax.random.key(0), x)
  params = jax.tree.map(lambda p: p + 0.1, params)  # a nonzero bias too
  modules = {impl: ours(c_out, (k, k), strides, padding, impl=impl) for impl in IMPLS}
  for impl, module in modules.items():
    assert jax.tree.structure(jax.eval_shape(module.init, jax.random.key(0), x)) == \
        jax.tree.structure(params), impl
  loss = lambda module: lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))

  @jax.jit
  def outputs(params, x):  # every module's output and gradients, compiled as one program
    return {name: (module.apply(params, x), jax.grad(loss(module), (0, 1))(params, x))
            for name, module in {"flax": ref, **modules}.items()}

  got = outputs(params, x)
  want_y, want_g = got.pop("flax")
  for impl, (y, g) in got.items():
    assert y.shape == want_y.shape, impl
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5, err_msg=impl)
    for got_leaf, want_leaf in zip(jax.tree.leaves(g), jax.tree.leaves(want_g)):
      np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-4, atol=1e-4, err_msg=impl)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("h, w, k, strides, padding, c_in, c_out", SHAPES)
def test_every_form_equals_xlas_convolution(transpose, h, w, k, strides, padding, c_in, c_out):
  """Each form on every layer shape, whichever form the rule would pick there."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, h, w, c_in)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, k, c_in, c_out)) / k, jnp.float32)
  strides = conv._pairs(strides)
  if transpose:
    op = lambda form: lambda x, w: conv.conv_transpose_as(form, x, w, strides, padding)
  else:
    pads = tuple(map(tuple, jax.lax.padtype_to_pads((h, w), (k, k), strides, padding)))
    op = lambda form: lambda x, w: conv.conv_as(form, x, w, strides, pads)
  grad = lambda form: jax.grad(lambda x, w: jnp.sum(jnp.sin(op(form)(x, w))), (0, 1))

  @jax.jit
  def outputs(x, kernel):  # every form's output and gradients, compiled as one program
    return {form: (op(form)(x, kernel), grad(form)(x, kernel)) for form in conv.FORMS}

  got = outputs(x, kernel)
  want_y, want_g = got.pop("xla")
  for form, (y, g) in got.items():
    assert y.shape == want_y.shape, form
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5, err_msg=form)
    for got_leaf, want_leaf in zip(g, want_g):
      np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-4, atol=1e-4, err_msg=form)


def test_narrow_layers_gather_or_scatter_and_wide_ones_run_as_the_impl_says():
  # (impl, channels in, out, input pixels, output pixels) -> form
  cases = {
      ("forward", 1, 64, 784, 196): "patches",   # a GAN's D on grey images: the input is narrow
      ("forward", 32, 2, 784, 784): "scatter",   # a VAE's last conv: mean, scale per pixel
      ("forward", 64, 1, 196, 784): "scatter",   # DCGAN's G, 14x14 -> 28x28: one channel out
      ("matmul", 3, 3, 64, 16): "patches",       # both narrow: the fewer floats (16 x 3)
      ("matmul", 8, 8, 16, 64): "scatter",       # ... (16 x 8 against 64 x 8)
      ("forward", 64, 32, 196, 784): "forward",  # wide: as the impl says
      ("matmul", 64, 32, 196, 784): "patches",
      ("xla", 1, 2, 784, 784): "xla",            # xla: every layer
  }
  assert {key: conv.form(*key) for key in cases} == cases
  assert conv.form("forward", conv.NARROW + 1, conv.NARROW + 1, 64, 64) == "forward"


def _bfloat16_movements(jaxpr) -> list[str]:
  """The pads, slices, concatenates and adds in jaxpr (and the jaxprs inside it)
  whose results are bfloat16."""
  moves = {"pad", "slice", "concatenate", "add", "add_any", "split"}
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in moves and any(v.aval.dtype == jnp.bfloat16 for v in eqn.outvars):
      found.append(eqn.primitive.name)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += _bfloat16_movements(sub)
  return found


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("form", ["patches", "scatter"])
def test_bfloat16_matmul_forms_move_and_add_in_float32(form, transpose):
  # XLA:CPU runs a bfloat16 pad, concatenate or add in float32 between two
  # conversions; the transposed gather, kh kw padded adds rounded after each,
  # took a third of a bfloat16 DCGAN step. Forward and backward round to
  # bfloat16 only at the matmuls, and the values stay bfloat16 ones.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 6)), jnp.bfloat16)
  kernel = jnp.asarray(rng.normal(size=(4, 4, 6, 5)), jnp.bfloat16)
  if transpose:
    layer = lambda x, k: conv.conv_transpose_as(form, x, k, (2, 2), "SAME")
  else:
    layer = lambda x, k: conv.conv_as(form, x, k, (2, 2), ((1, 2), (1, 2)))
  loss = lambda x, k: jnp.sum(layer(x, k).astype(jnp.float32) ** 2)
  jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, (0, 1)))(x, kernel).jaxpr
  assert _bfloat16_movements(jaxpr) == []
  y = layer(x, kernel)
  assert y.dtype == jnp.bfloat16
  want = conv.conv_transpose_as("xla", x.astype(jnp.float32), kernel.astype(jnp.float32), (2, 2),
                                "SAME") if transpose else conv.conv_as(
      "xla", x.astype(jnp.float32), kernel.astype(jnp.float32), (2, 2), ((1, 2), (1, 2)))
  np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=2e-2, atol=5e-2)


# Channels that give every form a layer: narrow in (patches), narrow out (scatter), wide.
WIDE = {"dcgan_digits": {"model.g_channels": (16, 12), "model.d_channels": (12, 16)},
        "vae_digits": {"model.channels": (12, 12)}, "diffusion_digits": {}}


@pytest.mark.slow
@pytest.mark.parametrize("name, arg", [("dcgan_digits", "smoke"), ("vae_digits", "smoke,conv"),
                                       ("diffusion_digits", "smoke")])
def test_train_step_with_matmul_or_forward_convs_equals_xla_convs(tmp_path, name, arg):
  results = {}
  for impl in IMPLS:
    config = helpers.config(name, arg, **{"mesh.data": 1, "model.conv": impl, **WIDE[name]})
    run = trainer.build(config, str(tmp_path / impl))
    state = tasks.run_once(run.init, *tasks.run_keys(0), out_shardings=run.state_sh)
    step = run.train_step.lower(state, run.feed.inputs(0)).compile()  # run as compiled here
    hlo = step.as_text()
    convs = re.findall(r"convolution\(.*", hlo)
    if impl == "matmul":  # no convolution left
      assert not convs
    elif impl == "forward":  # only forward ones: no dilated input, no kernel-gradient layout
      assert convs and all("lhs_dilate" not in c and "dim_labels=b01f_01io->b01f" in c
                           for c in convs), convs
    else:
      assert any("lhs_dilate" in c or "dim_labels=b01f_01io->b01f" not in c for c in convs)
    for i in range(2):
      state, metrics = step(state, run.feed.inputs(i))
    results[impl] = jax.device_get((state["task"]["params"], metrics))
  params_x, metrics_x = results["xla"]
  for impl in ("matmul", "forward"):
    params_m, metrics_m = results[impl]
    for key, value in metrics_x.items():
      np.testing.assert_allclose(metrics_m[key], value, rtol=1e-4, atol=1e-5, err_msg=f"{impl} {key}")
    for got, want in zip(jax.tree.leaves(params_m), jax.tree.leaves(params_x)):
      np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5, err_msg=impl)


@pytest.mark.slow
@pytest.mark.parametrize("transpose", [False, True])
def test_gradients_of_input_gradients_equal_xlas(transpose):
  """R1 and WGAN-GP differentiate D's input gradient w.r.t. D's parameters."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 8, 7, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(4, 4, 3, 4)) / 4, jnp.float32)
  if transpose:
    op = lambda form: lambda x, w: conv.conv_transpose_as(form, x, w, (2, 2), "SAME")
  else:
    op = lambda form: lambda x, w: conv.conv_as(form, x, w, (2, 2), ((1, 2), (1, 1)))
  def penalty(form):
    input_grad = jax.grad(lambda w, x: jnp.sum(jnp.sin(op(form)(x, w))), 1)
    return jax.jit(jax.grad(lambda w: jnp.sum(input_grad(w, x) ** 2)))(kernel)
  want = penalty("xla")
  for form in conv.FORMS[1:]:
    np.testing.assert_allclose(penalty(form), want, rtol=1e-4, atol=1e-4, err_msg=form)
