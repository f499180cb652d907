"""genflax/models/conv.py: every formulation of Conv and ConvTranspose equals
Flax's nn.Conv / nn.ConvTranspose (outputs and gradients, same parameters),
and the families' train steps with model.conv=matmul equal XLA's convolution."""
import re

import flax.linen as nn
import jax
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
# channels.
SHAPES = [
    (8, 8, 4, 2, "SAME", 1, 8), (7, 9, 4, 2, "SAME", 3, 5), (14, 14, 3, 2, "SAME", 2, 4),
    (7, 8, 3, 2, "SAME", 4, 2), (9, 10, 3, 1, "SAME", 2, 3), (8, 9, 4, 2, "VALID", 2, 3),
    (7, 7, 3, 2, "VALID", 2, 3), (5, 6, 2, 3, "SAME", 2, 2), (6, 7, 3, (2, 1), "SAME", 2, 3),
    (9, 10, 3, 1, "SAME", 5, 2), (8, 9, 3, 2, "SAME", 9, 2), (7, 8, 4, 2, "VALID", 9, 2),
]


@pytest.mark.parametrize("flax_cls, ours", [(nn.Conv, conv.Conv), (nn.ConvTranspose, conv.ConvTranspose)])
@pytest.mark.parametrize("h, w, k, strides, padding, c_in, c_out", SHAPES)
def test_every_formulation_equals_flax(flax_cls, ours, h, w, k, strides, padding, c_in, c_out):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, h, w, c_in)), jnp.float32)
  ref = flax_cls(c_out, (k, k), strides=strides, padding=padding)
  params = ref.init(jax.random.key(0), x)
  params = jax.tree.map(lambda p: p + 0.1, params)  # a nonzero bias too
  loss = lambda module: lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))
  want_y, want_g = jax.jit(ref.apply)(params, x), jax.jit(jax.grad(loss(ref), (0, 1)))(params, x)
  for impl in IMPLS:
    module = ours(c_out, (k, k), strides, padding, impl=impl)
    assert jax.tree.structure(module.init(jax.random.key(0), x)) == jax.tree.structure(params)
    y = jax.jit(module.apply)(params, x)
    assert y.shape == want_y.shape, impl
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5, err_msg=impl)
    got_g = jax.jit(jax.grad(loss(module), (0, 1)))(params, x)
    for got, want in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=impl)


@pytest.mark.parametrize("name, arg", [("dcgan_digits", "smoke"), ("vae_digits", "smoke,conv")])
def test_train_step_with_matmul_or_forward_convs_equals_xla_convs(tmp_path, name, arg):
  results = {}
  for impl in IMPLS:
    config = helpers.config(name, arg, **{"mesh.data": 1, "model.conv": impl})
    run = trainer.build(config, str(tmp_path / impl))
    state = jax.jit(run.init, out_shardings=run.state_sh)(*tasks.run_keys(0))
    hlo = run.train_step.lower(state, run.feed.inputs(0)).compile().as_text()
    convs = re.findall(r"convolution\(.*", hlo)
    if impl == "matmul":  # no convolution left
      assert not convs
    elif impl == "forward":  # only forward ones: no dilated input, no kernel-gradient layout
      assert convs and all("lhs_dilate" not in c and "dim_labels=b01f_01io->b01f" in c
                           for c in convs), convs
    else:
      assert any("lhs_dilate" in c or "dim_labels=b01f_01io->b01f" not in c for c in convs)
    for step in range(2):
      state, metrics = run.train_step(state, run.feed.inputs(step))
    results[impl] = jax.device_get((state["task"]["params"], metrics))
  params_x, metrics_x = results["xla"]
  for impl in ("matmul", "forward"):
    params_m, metrics_m = results[impl]
    for key, value in metrics_x.items():
      np.testing.assert_allclose(metrics_m[key], value, rtol=1e-4, atol=1e-5, err_msg=f"{impl} {key}")
    for got, want in zip(jax.tree.leaves(params_m), jax.tree.leaves(params_x)):
      np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5, err_msg=impl)


@pytest.mark.parametrize("ours", [conv.Conv, conv.ConvTranspose])
def test_gradients_of_input_gradients_equal_xlas(ours):
  """R1 and WGAN-GP differentiate D's input gradient w.r.t. D's parameters."""
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 7, 3)), jnp.float32)
  module = lambda impl: ours(4, (4, 4), 2, "SAME", impl=impl)
  params = module("xla").init(jax.random.key(0), x)
  def penalty(impl):
    input_grad = jax.grad(lambda p, x: jnp.sum(jnp.sin(module(impl).apply(p, x))), 1)
    return jax.jit(jax.grad(lambda p: jnp.sum(input_grad(p, x) ** 2)))(params)
  want = penalty("xla")
  for impl in ("matmul", "forward"):
    for got, ref in zip(jax.tree.leaves(penalty(impl)), jax.tree.leaves(want)):
      np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4, err_msg=impl)
