"""Layer pieces shared by the model families.

`row_major_dot_general` is a drop-in `dot_general` for `nn.Dense` whose
backward pass forms the weight gradient x^T dy as a plain row-major matmul.
XLA writes that gradient as a dot contracting the leading (row) axis of
both operands; XLA:CPU's fast matmul library (YNNPACK) takes no transposed
left operand, so such dots fall back to a generic kernel about twice as
slow (benchmarks/README.md). Here the smaller of x and dy is transposed into
a real array first (an optimisation barrier keeps XLA from folding the
transpose back into the dot), so every matmul of the layer takes the fast
path. Same values as XLA's gradient up to float rounding; on GPUs and TPUs,
whose matmuls take transposed operands for free, keep XLA's.

`onednn_dot_general` runs the same layer's bfloat16 matmuls, forward and
backward, on the CPU's bfloat16 units through oneDNN (genflax/models/onednn.py),
which XLA:CPU leaves idle; other dtypes and shapes go as row_major's.

Mixed precision: every family's modules take `dtype` (what the layers
compute in, `config.model.dtype`) and `param_dtype` (what the parameters and
so the optimizer state are stored in, `config.model.param_dtype`). With
bfloat16 compute, the families keep in float32 what needs its range or
precision: losses and likelihoods, softmax and log-softmax, normalisation
statistics (Flax's norms reduce in float32), spectral norm's power iteration.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from genflax import platform
from genflax.errors import ConfigError
from genflax.models import onednn

DENSE_GRADS = ("auto", "xla", "row_major", "onednn")
DTYPES = ("float32", "bfloat16")


def dtypes(model_cfg) -> tuple:
  """(compute dtype, parameter dtype) of config.model (float32 where a run's
  config.json predates the keys)."""
  return tuple(jnp.dtype(model_cfg.get(key, "float32")) for key in ("dtype", "param_dtype"))


def dense_grads(kind: str) -> str:
  """"xla", "row_major" or "onednn" for config.model.dense_grads, one of DENSE_GRADS
  ("auto": row_major on CPU). "onednn" where it cannot run here is a ConfigError
  that says why."""
  if kind not in DENSE_GRADS:
    raise ConfigError(f"model.dense_grads={kind!r}: expected one of {DENSE_GRADS}")
  if kind == "auto":
    return platform.dense_grads(jax.default_backend())
  if kind == "onednn" and (jax.default_backend() != "cpu" or onednn.unavailable()):
    why = onednn.unavailable() if jax.default_backend() == "cpu" else "it runs on CPUs only"
    raise ConfigError(f"model.dense_grads=onednn cannot run here: {why}; use row_major or xla")
  return kind


def dense_dot_general(kind: str):
  """The dot_general for nn.Dense whose matmuls run as `kind` says."""
  return {"row_major": row_major_dot_general, "onednn": onednn_dot_general}.get(
      dense_grads(kind), jax.lax.dot_general)


@jax.custom_vjp
def row_major_matmul(x, w):
  """x [..., K] @ w [K, N] -> [..., N], whose gradients are row-major matmuls."""
  return jnp.matmul(x, w)


def _matmul_fwd(x, w):
  return row_major_matmul(x, w), (x, w)


def _matmul_bwd(residuals, dy):
  x, w = residuals
  x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])  # [M, K], [M, N]
  barrier = jax.lax.optimization_barrier
  if x2.shape[1] <= dy2.shape[1]:
    dw = barrier(x2.T) @ dy2                 # [K, M] @ [M, N]
  else:                                      # transpose the smaller dy, then the [N, K] result
    dw = barrier(barrier(dy2.T) @ x2).T
  return dy @ w.T, dw.astype(w.dtype)


row_major_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def row_major_dot_general(lhs, rhs, dimension_numbers, precision=None,
                          preferred_element_type=None):
  """lax.dot_general with the row-major weight gradient for nn.Dense's x [..., K] @ w [K, N]."""
  dense = (((lhs.ndim - 1,), (0,)), ((), ()))
  if (dimension_numbers != dense or rhs.ndim != 2 or precision is not None
      or preferred_element_type is not None):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)
  return row_major_matmul(lhs, rhs)


def onednn_dot_general(lhs, rhs, dimension_numbers, precision=None,
                       preferred_element_type=None):
  """row_major_dot_general, with nn.Dense's bfloat16 x [..., K] @ w [K, N] on oneDNN."""
  dense = (((lhs.ndim - 1,), (0,)), ((), ()))
  if (dimension_numbers == dense and rhs.ndim == 2 and precision is None
      and preferred_element_type is None and lhs.dtype == rhs.dtype == jnp.bfloat16):
    return onednn.matmul(lhs, rhs)
  return row_major_dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)


class BatchNorm(nn.Module):
  """Batch normalisation by the batch's own statistics, in training and sampling
  alike (no running averages, so no state beside the parameters): each channel
  (the last axis) of x [B, ..., C] normalised over every other axis, in float32,
  then scaled and shifted. Under a sharded batch the statistics are the whole
  batch's. A generator's samples then depend on the other samples of their batch,
  as the DCGAN's did in training; genflax draws them in fixed batches
  (image_metrics.generate)."""
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    h = x.astype(jnp.float32)
    axes, shape = tuple(range(h.ndim - 1)), (1,) * (h.ndim - 1) + (c,)
    mean = jnp.mean(h, axes, keepdims=True)
    var = jnp.mean(jnp.square(h - mean), axes, keepdims=True)
    h = (h - mean) * jax.lax.rsqrt(var + self.epsilon)
    h = h * scale.astype(jnp.float32).reshape(shape) + bias.astype(jnp.float32).reshape(shape)
    return h.astype(self.dtype)


def minibatch_std(h, group: int = 4):
  """ProGAN's minibatch standard deviation: h [B, ..., C] with one more channel that
  holds, for each group of `group` consecutive examples (the largest size up to it
  that divides B), the mean over features of their standard deviation (float32), so
  a discriminator sees how varied its inputs are (a collapsed generator's are not).
  Consecutive groups keep the halves of a [real; fake] batch apart."""
  b = h.shape[0]
  g = next(k for k in range(min(group, b), 0, -1) if b % k == 0)
  grouped = h.astype(jnp.float32).reshape(b // g, g, *h.shape[1:])
  std = jnp.sqrt(jnp.var(grouped, 1) + 1e-8)                  # [B / g, ...]
  std = jnp.repeat(jnp.mean(std, tuple(range(1, std.ndim))), g)  # [B]
  plane = jnp.broadcast_to(std.reshape(b, *(1,) * (h.ndim - 1)), (*h.shape[:-1], 1))
  return jnp.concatenate([h, plane.astype(h.dtype)], -1)
