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


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--forms", default=",".join(conv.FORMS[1:]), help="comma-separated conv.FORMS")
  parser.add_argument("--impl", default="forward", help="the impl whose pick is shown")
  parser.add_argument("--layers", default="", help="comma-separated name prefixes (default: all)")
  parser.add_argument("--repeats", type=int, default=15)
  args = parser.parse_args()
  forms = args.forms.split(",")
  print(f"matmul peak {hot_loop.matmul_peak() / 1e9:.0f} GFLOP/s; "
        f"ms forward / forward+backward; * = conv.form({args.impl!r}, ...)")
  print("| layer | " + " | ".join(forms) + " |")
  print("| --- |" + " --- |" * len(forms))
  for name, (x_shape, kernel_shape, stride, transposed) in LAYERS.items():
    if not name.startswith(tuple(args.layers.split(","))):
      continue
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
