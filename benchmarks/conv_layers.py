"""Each convolution form on the image families' layers: `python -m benchmarks.conv_layers`.

Times one layer at a time, forward alone and forward with backward (the
gradients of x and the kernel), in every form of genflax/models/conv.py
(`conv.FORMS`, or `--forms`), and says which one `conv.form` picks for
`--impl`. The layers are the 28x28 DCGAN's and conv VAE's at batch 256 (D's
at 512: real and fake), the 8x8 ones, and a sweep of 3x3 layers 32 -> O at
28x28 where the narrow-output rule's crossover lies (`scatter` on a
convolution only where O <= 2 * conv.NARROW: wider, it takes seconds; on
every transposed one). Milliseconds (median of
`--repeats`), with the float32 matmul peak measured in the same run. With
glibc's malloc as `host_malloc=keep` sets it (the process re-runs itself
with those settings, as `hot_loop` does).

`--matmuls` times instead the matmuls a layer is made of when written as
matmuls (im2col; a transposed convolution one stride-1 convolution per
output phase: `conv.lhs_dilated`), with no gathering, scattering or
transposing around them: for each of forward, input gradient and kernel
gradient, in the pixel-major layout genflax runs (rows = pixels: [N, K] x
[K, O]; the kernel gradient [N, K]^T x [N, O]) and in the channel-major one
([O, K] x [K, N]; the kernel gradient [O, N] x [N, K]^T). N: the layer's
output pixels (per phase), K: kh kw C (the phase's taps times C), O: output
channels. The % of the matmul peak there bounds what any formulation of the
layer on XLA:CPU's matmuls can reach.
"""
import argparse
import os
import sys

from genflax import hostmem

if not hostmem.KEEP_ENV.items() <= os.environ.items():  # before jax starts a thread
  os.execve(sys.executable, [sys.executable, "-m", "benchmarks.conv_layers", *sys.argv[1:]],
            {**os.environ, **hostmem.KEEP_ENV})

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import allreduce, hot_loop  # pylint: disable=g-import-not-at-top,wrong-import-position
from genflax.models import conv  # pylint: disable=g-import-not-at-top,wrong-import-position

# name: (input shape [B, H, W, C], kernel [kh, kw, C, O], stride, transposed)
LAYERS = {
    "dcgan28 D conv 1": ((512, 28, 28, 1), (4, 4, 1, 64), 2, False),
    "dcgan28 D conv 2": ((512, 14, 14, 64), (4, 4, 64, 128), 2, False),
    "dcgan28 G convT 1": ((256, 7, 7, 128), (4, 4, 128, 64), 2, True),
    "dcgan28 G convT 2": ((256, 14, 14, 64), (4, 4, 64, 1), 2, True),
    "vae28 enc conv 1": ((256, 28, 28, 1), (3, 3, 1, 32), 2, False),
    "vae28 enc conv 2": ((256, 14, 14, 32), (3, 3, 32, 64), 2, False),
    "vae28 dec convT 1": ((256, 7, 7, 64), (3, 3, 64, 64), 2, True),
    "vae28 dec convT 2": ((256, 14, 14, 64), (3, 3, 64, 32), 2, True),
    "vae28 dec conv out": ((256, 28, 28, 32), (3, 3, 32, 2), 1, False),
    "vae8 dec convT 1": ((128, 2, 2, 64), (3, 3, 64, 64), 2, True),
    "vae8 dec convT 2": ((128, 4, 4, 64), (3, 3, 64, 32), 2, True),
    "vae8 dec conv out": ((128, 8, 8, 32), (3, 3, 32, 2), 1, False),
    "dcgan8 G convT 1": ((64, 2, 2, 64), (4, 4, 64, 32), 2, True),
    "dcgan8 G convT 2": ((64, 4, 4, 32), (4, 4, 32, 1), 2, True),
    **{f"3x3 32 -> {o} at 28x28": ((256, 28, 28, 32), (3, 3, 32, o), 1, False)
       for o in (4, 8, 16)},
}


def layer_op(form: str, kernel_shape, stride: int, transposed: bool, x_shape):
  """(x, kernel) -> y for one layer ("SAME" padding, as the families' layers)."""
  strides = (stride, stride)
  if transposed:
    return lambda x, k: conv.conv_transpose_as(form, x, k, strides, "SAME")
  pads = tuple(map(tuple, jax.lax.padtype_to_pads(x_shape[1:3], kernel_shape[:2], strides, "SAME")))
  return lambda x, k: conv.conv_as(form, x, k, strides, pads)


def _dot(contract):
  return jax.jit(lambda a, b: jax.lax.dot_general(a, b, (contract, ((), ()))))


# (name, operand shapes from (N, K, O), contracting dims): each does 2 N K O flops.
MATMULS = (
    ("forward, pixel-major", lambda n, k, o: ((n, k), (k, o)), ((1,), (0,))),
    ("forward, channel-major", lambda n, k, o: ((o, k), (k, n)), ((1,), (0,))),
    ("input grad, pixel-major", lambda n, k, o: ((n, o), (o, k)), ((1,), (0,))),
    ("input grad, channel-major", lambda n, k, o: ((k, o), (o, n)), ((1,), (0,))),
    ("kernel grad, pixel-major", lambda n, k, o: ((n, k), (n, o)), ((0,), (0,))),
    ("kernel grad, channel-major", lambda n, k, o: ((o, n), (k, n)), ((1,), (1,))),
)


def matmul_rows(names, repeats: int, peak: float):
  """Per layer: GFLOP of one pass, then each of MATMULS as % of peak (the layer's
  matmuls' flops over their summed median times)."""
  print("% of the matmul peak; the layer's matmuls (N, K, O) alone")
  print("| layer | (N, K, O) | GFLOP | " + " | ".join(m[0] for m in MATMULS) + " |")
  print("| --- | --- | --- |" + " --- |" * len(MATMULS))
  for name in names:
    x_shape, kernel_shape, stride, transposed = LAYERS[name]
    shapes = conv.matmul_shapes(x_shape, kernel_shape, (stride, stride), "SAME", transposed)
    flops = sum(2 * n * k * o for n, k, o in shapes)
    cells = []
    for _, operands, contract in MATMULS:
      ms = 0.0
      for n, k, o in shapes:
        a, b = (jnp.ones(s, jnp.float32) for s in operands(n, k, o))
        ms += allreduce.median_ms(_dot(contract), (a, b), repeats)
      cells.append(f"{100 * flops / (ms * 1e-3) / peak:.0f}")
    print(f"| {name} | {', '.join(map(str, sorted(set(shapes))))} | {flops / 1e9:.2f} | "
          + " | ".join(cells) + " |", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--forms", default=",".join(conv.FORMS[1:]), help="comma-separated conv.FORMS")
  parser.add_argument("--impl", default="forward", help="the impl whose pick is shown")
  parser.add_argument("--layers", default="", help="comma-separated name prefixes (default: all)")
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--matmuls", action="store_true", help="time the layers' matmuls alone")
  args = parser.parse_args()
  forms = args.forms.split(",")
  names = [n for n in LAYERS if n.startswith(tuple(args.layers.split(",")))]
  peak = hot_loop.matmul_peak()
  if args.matmuls:
    print(f"matmul peak {peak / 1e9:.0f} GFLOP/s")
    matmul_rows(names, args.repeats, peak)
    return
  print(f"matmul peak {peak / 1e9:.0f} GFLOP/s; "
        f"ms forward / forward+backward; * = conv.form({args.impl!r}, ...)")
  print("| layer | " + " | ".join(forms) + " |")
  print("| --- |" + " --- |" * len(forms))
  for name in names:
    x_shape, kernel_shape, stride, transposed = LAYERS[name]
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], x_shape)
    kernel = jax.random.normal(keys[1], kernel_shape) * 0.1
    y_shape = jax.eval_shape(layer_op("xla", kernel_shape, stride, transposed, x_shape), x, kernel).shape
    r = jax.random.normal(keys[2], y_shape)
    (h, w, c), o = x_shape[1:], kernel_shape[3]
    choice = conv.form(args.impl, c, o, h * w, y_shape[1] * y_shape[2])
    cells = []
    for form in forms:
      if form == "scatter" and kernel_shape[3] > 2 * conv.NARROW and not transposed:
        cells.append("-")  # seconds: O channels per tap padded into place
        continue
      op = layer_op(form, kernel_shape, stride, transposed, x_shape)
      grads = jax.grad(lambda x, k, op=op: jnp.sum(op(x, k) * r), (0, 1))
      fwd = allreduce.median_ms(jax.jit(op), (x, kernel), args.repeats)
      both = allreduce.median_ms(jax.jit(grads), (x, kernel), args.repeats)
      cells.append(f"{fwd:.1f} / {both:.1f}" + (" *" if form == choice else ""))
    print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  main()
