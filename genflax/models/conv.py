"""2-D convolutions as XLA's convolution or as patches times one matmul.

`Conv` and `ConvTranspose` hold the parameters of Flax's `nn.Conv` and
`nn.ConvTranspose` under the same names (a checkpoint moves between them and
between `impl`s) and compute the same maths (NHWC, "SAME" or "VALID"
padding, no kernel flip, as Flax's defaults). `impl` picks how:

- `xla`: `lax.conv_general_dilated`, which GPUs and TPUs run natively;
- `matmul`: the patches of the input gathered by slicing (im2col) and
  contracted with the kernel in one matmul; a transposed convolution of
  stride s as s x s stride-1 convolutions, one per output phase, whose
  results interleave (sub-pixel convolution), so no multiply-add touches the
  zeros a dilated input would hold. Every multiply-add of forward and
  backward is then a row-major matmul (genflax/models/layers.py), the one
  fast path of XLA:CPU; its own convolution's gradients run on a generic
  kernel that is many times slower (benchmarks/README.md).

`model.conv=auto` takes `matmul` on CPU and `xla` elsewhere
(genflax/platform.py).
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from genflax import platform
from genflax.errors import ConfigError
from genflax.models import layers

CONVS = ("auto", "xla", "matmul")
PADDINGS = ("SAME", "VALID")
_DN = ("NHWC", "HWIO", "NHWC")


def conv_impl(kind: str) -> str:
  """"xla" or "matmul" for config.model.conv, one of CONVS ("auto": matmul on CPU)."""
  if kind not in CONVS:
    raise ConfigError(f"model.conv={kind!r}: expected one of {CONVS}")
  return platform.conv(jax.default_backend()) if kind == "auto" else kind


def _pairs(value) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


def _check(padding: str) -> None:
  if padding not in PADDINGS:
    raise ValueError(f"padding={padding!r}: genflax's convolutions take one of {PADDINGS}")


def patches_matmul(x, kernel, strides: Sequence[int], pads: Sequence[tuple[int, int]]):
  """lax.conv_general_dilated(x, kernel, strides, pads) for x [B, H, W, C] and
  kernel [kh, kw, C, O], as im2col: the kh * kw strided slices of the padded
  input side by side [B * Ho * Wo, kh * kw * C] times kernel [kh * kw * C, O]."""
  b, h, w, c = x.shape
  kh, kw, _, o = kernel.shape
  (sh, sw), ((ph0, ph1), (pw0, pw1)) = strides, pads
  ho, wo = (h + ph0 + ph1 - kh) // sh + 1, (w + pw0 + pw1 - kw) // sw + 1
  xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (ph0, ph1, 0), (pw0, pw1, 0), (0, 0, 0)))
  taps = [lax.slice(xp, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                    (1, sh, sw, 1))
          for i in range(kh) for j in range(kw)]
  cols = taps[0] if len(taps) == 1 else jnp.concatenate(taps, -1)  # [B, Ho, Wo, kh kw C]
  out = layers.row_major_matmul(cols.reshape(-1, kh * kw * c), kernel.reshape(-1, o))
  return out.reshape(b, ho, wo, o)


def conv(x, kernel, strides, padding: str, impl: str):
  """Flax nn.Conv's convolution (x [B, H, W, C], kernel [kh, kw, C, O])."""
  _check(padding)
  strides = _pairs(strides)
  pads = lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], strides, padding)
  if impl == "xla":
    return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_DN)
  return patches_matmul(x, kernel, strides, pads)


def _transpose_pads(k: int, s: int, padding: str) -> tuple[int, int]:
  """lax.conv_transpose's padding of the dilated input (transpose_kernel=False)."""
  if padding == "SAME":
    total = k + s - 2
    low = k - 1 if s > k - 1 else -(-total // 2)
  else:  # VALID
    total = k + s - 2 + max(k - s, 0)
    low = k - 1
  return low, total - low


def _phase(n: int, k: int, s: int, pads: tuple[int, int], a: int, length: int):
  """Output phase a (outputs a, a + s, ...) of a 1-D convolution of an
  s-dilated length-n input with pads and kernel size k, as a stride-1
  convolution of the undilated input: (first tap, number of taps, (low, high)
  padding of the input) for `length` outputs."""
  t0 = (pads[0] - a) % s
  taps = -(-(k - t0) // s) if k > t0 else 0
  offset = (a + t0 - pads[0]) // s  # input index of output 0's first tap
  return t0, taps, (-offset, length + taps - 1 + offset - n)


def conv_transpose(x, kernel, strides, padding: str, impl: str):
  """Flax nn.ConvTranspose's convolution (x [B, H, W, C], kernel [kh, kw, C, O],
  no kernel flip): the matmul impl runs one stride-1 convolution per output
  phase and interleaves them."""
  _check(padding)
  strides = _pairs(strides)
  if impl == "xla":
    return lax.conv_transpose(x, kernel, strides, padding, dimension_numbers=_DN)
  b, h, w, _ = x.shape
  kh, kw, _, o = kernel.shape
  sh, sw = strides
  pads = [_transpose_pads(k, s, padding) for k, s in ((kh, sh), (kw, sw))]
  out_h, out_w = [(n - 1) * s + 1 + sum(p) - k + 1
                  for n, k, s, p in ((h, kh, sh, pads[0]), (w, kw, sw, pads[1]))]
  ph, pw = -(-out_h // sh), -(-out_w // sw)  # outputs per phase (the last ones cropped)
  rows = []
  for a in range(sh):
    t0h, nh, padh = _phase(h, kh, sh, pads[0], a, ph)
    row = []
    for c in range(sw):
      t0w, nw, padw = _phase(w, kw, sw, pads[1], c, pw)
      if nh == 0 or nw == 0:  # a kernel smaller than its stride leaves this phase empty
        row.append(jnp.zeros((b, ph, pw, o), x.dtype))
        continue
      sub = kernel[t0h::sh, t0w::sw][:nh, :nw]
      row.append(patches_matmul(x, sub, (1, 1), (padh, padw)))  # [B, ph, pw, O]
    rows.append(jnp.stack(row, 3))                               # [B, ph, pw, sw, O]
  y = jnp.stack(rows, 2)                                         # [B, ph, sh, pw, sw, O]
  return y.reshape(b, ph * sh, pw * sw, o)[:, :out_h, :out_w]


class Conv(nn.Module):
  """nn.Conv's parameters and maths (NHWC, SAME or VALID padding), run as `impl` says."""
  features: int
  kernel_size: Sequence[int]
  strides: int | Sequence[int] = 1
  padding: str = "SAME"
  use_bias: bool = True
  impl: str = "xla"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  kernel_init: object = nn.initializers.lecun_normal()
  bias_init: object = nn.initializers.zeros_init()
  op = staticmethod(conv)  # (x, kernel, strides, padding, impl) -> y

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init,
                        (*self.kernel_size, x.shape[-1], self.features), self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    y = self.op(x, kernel, self.strides, self.padding, self.impl)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype).reshape(1, 1, 1, -1)
    return y


class ConvTranspose(Conv):
  """nn.ConvTranspose's parameters and maths (NHWC, SAME or VALID padding, no
  kernel flip), run as `impl` says."""
  op = staticmethod(conv_transpose)
