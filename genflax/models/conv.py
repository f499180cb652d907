"""2-D convolutions as XLA's convolution, as forward convolutions only, or as matmuls.

`Conv` and `ConvTranspose` hold the parameters of Flax's `nn.Conv` and
`nn.ConvTranspose` under the same names (a checkpoint moves between them and
between `impl`s) and compute the same maths (NHWC, "SAME" or "VALID"
padding, no kernel flip, as Flax's defaults). `impl` picks how:

- `xla`: `lax.conv_general_dilated`, which GPUs and TPUs run natively;
- `forward`: XLA's convolution forward, which XLA:CPU runs on YNNPACK,
  with its gradients written as forward convolutions too (the input
  gradient: the flipped kernel over the output gradient, one stride-1
  convolution per phase where strided) and, for the kernel gradient, one
  matmul per tap (`forward_conv`); a transposed convolution as stride-1
  forward convolutions, one per output phase, as below;
- `onednn`: `matmul`'s forms with oneDNN's bfloat16 matmuls
  (genflax/models/onednn.py) where both operands are bfloat16, on the CPU's
  bfloat16 units (AVX512-BF16, AMX), the patches gathered (and their
  gradient scattered back) by the same library; row-major matmuls otherwise;
- `matmul`: the patches of the input gathered by slicing (im2col) and
  contracted with the kernel in one matmul; a transposed convolution of
  stride s as s x s stride-1 convolutions, one per output phase, whose
  results interleave (sub-pixel convolution), so no multiply-add touches the
  zeros a dilated input would hold. Every multiply-add of forward and
  backward is then a row-major matmul (genflax/models/layers.py), the one
  fast path of XLA:CPU; its own convolution's gradients run on a generic
  kernel that is many times slower (benchmarks/README.md).

Under `matmul` and `forward`, a layer with at most NARROW channels on one
side (an image's first and last layers: its channels in, or its pixels'
parameters out) moves only the narrow side's taps: the input's patches
times the kernel (`patches_matmul`), or the input times the kernel
[C, kh kw O] with each tap's O channels then added where that tap sends them
(`scatter_matmul`), whichever moves fewer floats (`form`). Forward and
backward then pass over the wide side's memory a few times, where XLA's
convolution and the per-tap kernel gradient pass kh * kw times.

`model.conv=auto` takes `xla` on GPUs and TPUs; on CPU `forward` for images
of 16x16 and up and `matmul` below, and `onednn` for a bfloat16 run where
oneDNN drives the CPU's bfloat16 units (genflax/platform.py; measured in
benchmarks/README.md).
"""
import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from genflax import platform
from genflax.errors import ConfigError
from genflax.models import layers, onednn

CONVS = ("auto", "xla", "matmul", "forward", "onednn")
FORMS = ("xla", "patches", "scatter", "forward")  # how one layer runs (`form`)
PADDINGS = ("SAME", "VALID")
NARROW = 8  # channels: a side with at most this many is gathered or scattered (`form`)
_DN = ("NHWC", "HWIO", "NHWC")


def conv_impl(kind: str, image_hw: tuple[int, int] = (0, 0)) -> str:
  """The impl for config.model.conv, one of CONVS, on images of image_hw (H, W)
  ("auto": genflax/platform.py's choice for this backend and size)."""
  if kind not in CONVS:
    raise ConfigError(f"model.conv={kind!r}: expected one of {CONVS}")
  if kind == "onednn" and (jax.default_backend() != "cpu" or onednn.unavailable()):
    why = onednn.unavailable() if jax.default_backend() == "cpu" else "it runs on CPUs only"
    raise ConfigError(f"model.conv=onednn cannot run here: {why}; use forward or matmul")
  return platform.conv(jax.default_backend(), tuple(image_hw)) if kind == "auto" else kind


def onednn_matmul(x, w):
  """x [..., K] @ w [K, N] on oneDNN where both are bfloat16, else row-major."""
  if x.dtype == w.dtype == jnp.bfloat16:
    return onednn.matmul(x, w)
  return layers.row_major_matmul(x, w)


def dense_dot_general(impl: str):
  """The dot_general for the nn.Dense layers of a network whose convolutions run
  as `impl`: under `onednn` their bfloat16 matmuls go to oneDNN as well
  (layers.onednn_dot_general), otherwise XLA's."""
  return layers.onednn_dot_general if impl == "onednn" else lax.dot_general


def matmul_of(impl: str):
  """The matmul a layer of `impl` multiplies with: oneDNN's for `onednn`."""
  return onednn_matmul if impl == "onednn" else layers.row_major_matmul


def form(impl: str, c: int, o: int, in_pixels: int, out_pixels: int) -> str:
  """How `impl` runs one layer of c input and o output channels (one of
  FORMS): a layer narrow on one side (min(c, o) <= NARROW) gathers its input's
  patches or scatters its output's taps, whichever moves fewer floats
  (out_pixels * c against in_pixels * o); a wide one runs as impl says."""
  if impl == "xla":
    return "xla"
  if min(c, o) <= NARROW:
    return "patches" if out_pixels * c <= in_pixels * o else "scatter"
  return "forward" if impl == "forward" else "patches"


def _pairs(value) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


def _check(padding: str) -> None:
  if padding not in PADDINGS:
    raise ValueError(f"padding={padding!r}: genflax's convolutions take one of {PADDINGS}")


def _taps(xp, kh: int, kw: int, strides, out_hw):
  """The kh * kw strided slices of a padded input xp [B, Hp, Wp, C] that tap
  (i, j) of a VALID convolution reads, each [B, Ho, Wo, C], in tap order."""
  b, _, _, c = xp.shape
  (sh, sw), (ho, wo) = strides, out_hw
  return [lax.slice(xp, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                    (1, sh, sw, 1))
          for i in range(kh) for j in range(kw)]


def _moved(x):
  """x in float32 where it is a narrower float: the matmul forms pad, slice, gather
  and add in float32 and round to the compute dtype only at the matmul. XLA:CPU has
  no bfloat16 pad, concatenate or add; it runs each in float32 between two
  conversions, and the transposed gather (kh kw padded adds) became a chain of
  rounding conversions, a sixth of a bfloat16 DCGAN step."""
  return x.astype(jnp.float32) if jnp.finfo(x.dtype).bits < 32 else x


def _pad(x, pads):
  """x [B, H, W, C] padded (negative: cropped) by pads ((top, bottom), (left, right))."""
  (ph0, ph1), (pw0, pw1) = pads
  return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (ph0, ph1, 0), (pw0, pw1, 0), (0, 0, 0)))


def _out_hw(hp: int, wp: int, kernel_hw, strides) -> tuple[int, int]:
  """Output size of a VALID convolution of a [hp, wp] input."""
  return tuple((n - k) // s + 1 for n, k, s in zip((hp, wp), kernel_hw, strides))


def patches_matmul(x, kernel, strides: Sequence[int], pads: Sequence[tuple[int, int]],
                   mm=layers.row_major_matmul, dtype=None):
  """lax.conv_general_dilated(x, kernel, strides, pads) for x [B, H, W, C] and
  kernel [kh, kw, C, O], as im2col: the kh * kw strided slices of the padded
  input side by side [B * Ho * Wo, kh * kw * C] times kernel [kh * kw * C, O]
  (by `mm`, a matmul as `matmul_of` gives, in `dtype`: x's by default)."""
  dtype = dtype or x.dtype
  b, kh, kw, c, o = x.shape[0], *kernel.shape
  if mm is onednn_matmul and dtype == jnp.bfloat16:  # gathered in bfloat16 by oneDNN's library
    cols = onednn.im2col(x.astype(dtype), (kh, kw), tuple(strides), tuple(map(tuple, pads)))
    ho, wo = cols.shape[1:3]
  else:
    xp = _pad(_moved(x), pads)
    ho, wo = _out_hw(*xp.shape[1:3], (kh, kw), strides)
    taps = _taps(xp, kh, kw, strides, (ho, wo))
    cols = taps[0] if len(taps) == 1 else jnp.concatenate(taps, -1)  # [B, Ho, Wo, kh kw C]
  out = mm(cols.reshape(-1, kh * kw * c).astype(dtype), kernel.reshape(-1, o).astype(dtype))
  return out.reshape(b, ho, wo, o)


def scatter_matmul(x, kernel, strides: Sequence[int], pads: Sequence[tuple[int, int]],
                   dilation: Sequence[int] = (1, 1), mm=layers.row_major_matmul):
  """lax.conv_general_dilated(x, kernel, strides, pads, lhs_dilation=dilation)
  for x [B, H, W, C] and kernel [kh, kw, C, O], from the output side: z = x
  [B H W, C] times the kernel [C, kh kw O]; tap (i, j)'s O channels of z go
  where that tap sends each input (padded, dilated and shifted by (i, j)) and
  add up; the sum is read at the strides. Its gradients gather the output
  gradient's taps, so all of its memory traffic is O channels wide but for
  one pass over x."""
  b, h, w, c = x.shape
  kh, kw, _, o = kernel.shape
  (sh, sw), (dh, dw) = strides, dilation
  hd, wd = (h - 1) * dh + 1, (w - 1) * dw + 1  # the dilated input's size
  (ph0, ph1), (pw0, pw1) = pads
  ho, wo = _out_hw(hd + ph0 + ph1, wd + pw0 + pw1, (kh, kw), strides)
  lh, lw = sh * (ho - 1) + 1, sw * (wo - 1) + 1  # the outputs' span before striding
  z = _moved(mm(x.reshape(-1, c), kernel.transpose(2, 0, 1, 3).reshape(c, -1)))
  # One split (not kh kw slices): its gradient is one concatenate, not kh kw padded adds.
  taps = jnp.split(z.reshape(b, h, w, kh * kw, o), kh * kw, axis=3)
  y = 0
  for i in range(kh):
    for j in range(kw):
      low_h, low_w = ph0 - i, pw0 - j  # where input (0, 0) lands for this tap
      y = y + lax.pad(taps[i * kw + j].reshape(b, h, w, o), jnp.zeros((), z.dtype),
                      ((0, 0, 0), (low_h, lh - low_h - hd, dh - 1),
                       (low_w, lw - low_w - wd, dw - 1), (0, 0, 0)))
  return y[:, ::sh, ::sw].astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def forward_conv(x, kernel, strides: tuple[int, int], pads: tuple[tuple[int, int], ...]):
  """lax.conv_general_dilated(x, kernel, strides, pads) whose gradients are
  forward convolutions and matmuls: the input gradient is the kernel, flipped
  and with its channels swapped, over the output gradient (for strides > 1,
  one stride-1 convolution per phase: `lhs_dilated`); the kernel gradient,
  tap by tap, dy^T [O, B Ho Wo] times that tap's slice of x [B Ho Wo, C]."""
  return lax.conv_general_dilated(_pad(x, pads), kernel, strides, "VALID", dimension_numbers=_DN)


def _forward_conv_fwd(x, kernel, strides, pads):
  return forward_conv(x, kernel, strides, pads), (x, kernel)


def _forward_conv_bwd(strides, pads, residuals, dy):
  x, kernel = residuals
  kh, kw, c, o = kernel.shape
  xp = _pad(x, pads)
  (hp, wp), (ho, wo) = xp.shape[1:3], dy.shape[1:3]
  # Every output reads taps at stride s of xp: scatter dy back through the flipped kernel.
  back = [(k - 1, n - (m - 1) * s - 1) for n, m, k, s in ((hp, ho, kh, strides[0]),
                                                             (wp, wo, kw, strides[1]))]
  flipped = kernel[::-1, ::-1].transpose(0, 1, 3, 2)  # [kh, kw, O, C]
  dxp = lhs_dilated(dy, flipped, strides, back, _forward_conv1(dy.dtype))[:, :hp, :wp]
  dx = _pad(dxp, [(-lo, -hi) for lo, hi in pads])  # undo the padding (or cropping) of x
  dyt = lax.optimization_barrier(dy.reshape(-1, o).T)  # [O, B Ho Wo], once for every tap
  dw = jnp.stack([dyt @ tap.reshape(-1, c) for tap in _taps(xp, kh, kw, strides, (ho, wo))])
  return dx, dw.reshape(kh, kw, o, c).transpose(0, 1, 3, 2).astype(kernel.dtype)


forward_conv.defvjp(_forward_conv_fwd, _forward_conv_bwd)


def _forward_conv1(dtype):
  """lhs_dilated's stride-1 convolution as forward_conv, in dtype."""
  return lambda v, k, p: forward_conv(v.astype(dtype), k.astype(dtype), (1, 1), p)


def conv(x, kernel, strides, padding: str, impl: str):
  """Flax nn.Conv's convolution (x [B, H, W, C], kernel [kh, kw, C, O]), each
  layer in the form `form` picks for impl."""
  _check(padding)
  strides = _pairs(strides)
  pads = tuple(map(tuple, lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], strides, padding)))
  (h, w), (c, o) = x.shape[1:3], kernel.shape[2:]
  ho, wo = _out_hw(h + sum(pads[0]), w + sum(pads[1]), kernel.shape[:2], strides)
  return conv_as(form(impl, c, o, h * w, ho * wo), x, kernel, strides, pads, matmul_of(impl))


def conv_as(form_: str, x, kernel, strides: tuple[int, int], pads: tuple[tuple[int, int], ...],
            mm=layers.row_major_matmul):
  """lax.conv_general_dilated(x, kernel, strides, pads) in form_, one of FORMS
  (`mm`: the matmul of the patches and scatter forms)."""
  if form_ == "xla":
    return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_DN)
  if form_ == "forward":
    return forward_conv(x, kernel, strides, pads)
  if form_ == "scatter":
    return scatter_matmul(x, kernel, strides, pads, mm=mm)
  return patches_matmul(x, kernel, strides, pads, mm)


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


def _dilated_out(n: int, k: int, s: int, pads: tuple[int, int]) -> tuple[int, int]:
  """Outputs of a 1-D convolution of an s-dilated length-n input with pads and
  kernel size k, and outputs per phase (ceil: the last phases' last ones cropped)."""
  out = (n - 1) * s + 1 + sum(pads) - k + 1
  return out, -(-out // s)


def lhs_dilated(x, kernel, strides, pads, conv1):
  """lax.conv_general_dilated(x, kernel, 1, pads, lhs_dilation=strides) as
  s x s stride-1 convolutions conv1(x, sub-kernel, pads), one per output phase,
  interleaved: no multiply-add touches the zeros of the dilated input. conv1
  gets x and the kernel in float32 where they are narrower (`_moved`), so the
  phases' gradients add up in float32, and computes in the dtype it was made for."""
  b, h, w, _ = x.shape
  dtype, x, kernel = x.dtype, _moved(x), _moved(kernel)
  kh, kw, _, o = kernel.shape
  sh, sw = strides
  (out_h, ph), (out_w, pw) = (_dilated_out(n, k, s, p)
                              for n, k, s, p in ((h, kh, sh, pads[0]), (w, kw, sw, pads[1])))
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
      row.append(_moved(conv1(x, sub, (padh, padw))))            # [B, ph, pw, O]
    rows.append(jnp.stack(row, 3))                               # [B, ph, pw, sw, O]
  y = jnp.stack(rows, 2)                                         # [B, ph, sh, pw, sw, O]
  return y.reshape(b, ph * sh, pw * sw, o)[:, :out_h, :out_w].astype(dtype)


def matmul_shapes(x_shape, kernel_shape, strides, padding: str,
                  transposed: bool) -> list[tuple[int, int, int]]:
  """(N, K, O) of each matmul of a layer written as matmuls, [N, K] x [K, O]:
  one for a convolution (N output pixels, K = kh kw C), one per nonempty
  output phase of a transposed one (as `lhs_dilated` runs it: N the phase's
  pixels, K its taps times C)."""
  b, h, w, c = x_shape
  kh, kw, _, o = kernel_shape
  strides = _pairs(strides)
  if not transposed:
    pads = lax.padtype_to_pads((h, w), (kh, kw), strides, padding)
    ho, wo = _out_hw(h + sum(pads[0]), w + sum(pads[1]), (kh, kw), strides)
    return [(b * ho * wo, kh * kw * c, o)]
  pads = [_transpose_pads(k, s, padding) for k, s in zip((kh, kw), strides)]
  per_phase = [_dilated_out(n, k, s, p)[1] for n, k, s, p in zip((h, w), (kh, kw), strides, pads)]
  taps = [[_phase(n, k, s, p, a, m)[1] for a in range(s)]
          for n, k, s, p, m in zip((h, w), (kh, kw), strides, pads, per_phase)]
  return [(b * per_phase[0] * per_phase[1], th * tw * c, o)
          for th in taps[0] for tw in taps[1] if th * tw]


def conv_transpose(x, kernel, strides, padding: str, impl: str):
  """Flax nn.ConvTranspose's convolution (x [B, H, W, C], kernel [kh, kw, C, O],
  no kernel flip), each layer in the form `form` picks for impl."""
  _check(padding)
  strides = _pairs(strides)
  (h, w), (c, o) = x.shape[1:3], kernel.shape[2:]
  return conv_transpose_as(form(impl, c, o, h * w, h * w * strides[0] * strides[1]),
                           x, kernel, strides, padding, matmul_of(impl))


def conv_transpose_as(form_: str, x, kernel, strides: tuple[int, int], padding: str,
                      mm=layers.row_major_matmul):
  """lax.conv_transpose(x, kernel, strides, padding) in form_, one of FORMS:
  patches and forward run one stride-1 convolution per output phase and
  interleave them; scatter places each input's taps at its strides (`mm`: the
  matmul of the patches and scatter forms)."""
  if form_ == "xla":
    return lax.conv_transpose(x, kernel, strides, padding, dimension_numbers=_DN)
  pads = tuple(_transpose_pads(k, s, padding) for k, s in zip(kernel.shape[:2], strides))
  if form_ == "scatter":
    return scatter_matmul(x, kernel, (1, 1), pads, dilation=strides, mm=mm)
  if form_ == "forward":
    return lhs_dilated(x, kernel, strides, pads, _forward_conv1(x.dtype))
  return lhs_dilated(x, kernel, strides, pads,
                     lambda v, k, p: patches_matmul(v, k, (1, 1), p, mm, x.dtype))


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
