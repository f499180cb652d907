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

Mixed precision: every family's modules take `dtype` (what the layers
compute in, `config.model.dtype`) and `param_dtype` (what the parameters and
so the optimizer state are stored in, `config.model.param_dtype`). With
bfloat16 compute, the families keep in float32 what needs its range or
precision: losses and likelihoods, softmax and log-softmax, normalisation
statistics (Flax's norms reduce in float32), spectral norm's power iteration.
"""
import jax
import jax.numpy as jnp

from genflax import platform
from genflax.errors import ConfigError

DENSE_GRADS = ("auto", "xla", "row_major")
DTYPES = ("float32", "bfloat16")


def dtypes(model_cfg) -> tuple:
  """(compute dtype, parameter dtype) of config.model (float32 where a run's
  config.json predates the keys)."""
  return tuple(jnp.dtype(model_cfg.get(key, "float32")) for key in ("dtype", "param_dtype"))


def dense_grads(kind: str) -> str:
  """"xla" or "row_major" for config.model.dense_grads, one of DENSE_GRADS
  ("auto": row_major on CPU)."""
  if kind not in DENSE_GRADS:
    raise ConfigError(f"model.dense_grads={kind!r}: expected one of {DENSE_GRADS}")
  if kind == "auto":
    return platform.dense_grads(jax.default_backend())
  return kind


def dense_dot_general(kind: str):
  """The dot_general for nn.Dense whose gradients are computed as `kind` says."""
  return row_major_dot_general if dense_grads(kind) == "row_major" else jax.lax.dot_general


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
