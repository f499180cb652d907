"""bfloat16 matmuls on the CPU's bfloat16 units, through oneDNN.

XLA:CPU runs a bfloat16 dot no faster than a float32 one: it does not use
the AVX512-BF16 or AMX instructions that Intel and AMD server CPUs carry.
oneDNN does, and PyTorch ships it: `matmul` here is an XLA FFI custom call
(`jax.ffi`) whose handler (csrc/onednn_matmul.cc) runs PyTorch's `at::mm` on
XLA's own buffers, bfloat16 in and out with float32 accumulation, as XLA's
bfloat16 dot. Its gradient is two more such calls (dy w^T and x^T dy, the
transposes read in place). `nn.Dense` layers take it through
`model.dense_grads=onednn` (genflax/models/layers.py); `auto` picks it where
it pays (genflax/platform.py). `im2col` and `col2im`, handlers of the same
library, gather a bfloat16 convolution's patches and scatter their gradient
back (`model.conv=onednn`, genflax/models/conv.py).

The handler is compiled on first use (g++, about 30 s) against the installed
PyTorch and jaxlib, into `$GENFLAX_CACHE` (default ~/.cache/genflax), keyed
by the source and both versions, under a file lock so that processes
sharing the cache build it once. `unavailable()` says, in one line, why it
cannot run here (no PyTorch: `pip install 'genflax[onednn]'`; no compiler;
a failed build), and callers fall back to XLA's dot.
"""
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile

import filelock
import jax
import jax.numpy as jnp
import numpy as np

TARGET = "genflax_onednn_matmul"
IM2COL, COL2IM = "genflax_onednn_im2col", "genflax_onednn_col2im"
FLAGS = "-O3"  # vectorises col2im's float32 accumulation (-O2 leaves it scalar)
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "onednn_matmul.cc")


def cpu_bf16_units() -> str:
  """This CPU's bfloat16 units: "amx" (AMX-BF16 tiles), "avx512_bf16", or "" for
  neither (Linux's /proc/cpuinfo flags)."""
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
  except OSError:
    return ""
  return "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else ""


def cpu_has_bf16_units() -> bool:
  """Whether this CPU has AVX512-BF16 or AMX-BF16."""
  return bool(cpu_bf16_units())


def cache_dir() -> str:
  return os.path.join(os.environ.get("GENFLAX_CACHE") or os.path.expanduser("~/.cache/genflax"),
                      "onednn")


@functools.cache
def unavailable() -> str | None:
  """None once the handler is built, loaded and registered with XLA:CPU; else why
  not, in one line."""
  try:
    import torch  # noqa: F401 -- loads libtorch_cpu, which the handler links
  except ImportError:
    return "PyTorch is not installed: pip install 'genflax[onednn]'"
  try:
    path = _build(torch)
    lib = ctypes.CDLL(path)
    for target, handler in ((TARGET, lib.GenflaxOnednnMatmul), (IM2COL, lib.GenflaxOnednnIm2col),
                            (COL2IM, lib.GenflaxOnednnCol2im)):
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
  except (OSError, RuntimeError, subprocess.SubprocessError) as e:
    return str(e).splitlines()[0] if str(e) else type(e).__name__
  return None


def _build(torch) -> str:
  """The handler's shared library, compiled once per source, PyTorch and jaxlib."""
  with open(SOURCE, "rb") as f:
    source = f.read()
  versions = f"{torch.__version__} {jax.__version__} {FLAGS}"
  key = hashlib.sha256(source + versions.encode()).hexdigest()
  folder = os.path.join(cache_dir(), key[:16])
  path = os.path.join(folder, "libgenflax_onednn.so")
  if os.path.exists(path):
    return path
  compiler = shutil.which(os.environ.get("CXX", "g++"))
  if compiler is None:
    raise RuntimeError("no C++ compiler (g++, or $CXX) to build the oneDNN matmul")
  os.makedirs(folder, exist_ok=True)
  with filelock.FileLock(os.path.join(folder, ".lock")):
    if os.path.exists(path):  # another process built it meanwhile
      return path
    torch_dir = os.path.dirname(torch.__file__)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    command = [compiler, *FLAGS.split(), "-shared", "-fPIC", "-std=c++17", "-w", SOURCE,
               "-o", tmp,
               f"-I{jax.ffi.include_dir()}", f"-I{torch_dir}/include",
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               f"-L{torch_dir}/lib", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{torch_dir}/lib"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
      os.remove(tmp)
      last = (done.stderr.strip().splitlines() or ["no output"])[-1]
      raise RuntimeError(f"building the oneDNN matmul failed ({compiler}): {last}")
    os.replace(tmp, path)  # whole or absent, whoever reads it
  return path


def _require(what: str) -> None:
  """Registers the handlers on first use; raises, saying why, where they cannot be."""
  why = unavailable()
  if why is not None:
    raise RuntimeError(f"the oneDNN {what} cannot run here: {why}")


def _call(a, b, m: int, n: int, transpose_a: bool = False, transpose_b: bool = False):
  """[m, n] = op(a) @ op(b) in bfloat16, through the handler (registered on first use)."""
  _require("matmul")
  return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, n), jnp.bfloat16))(
      a, b, transpose_a=transpose_a, transpose_b=transpose_b)


# x @ w and its two transposed forms, each with a VJP in the three: so a gradient
# of a gradient (a GAN's R1 penalty) stays on oneDNN, and no operand is transposed
# in memory (the handler reads either operand transposed in place).

@jax.custom_vjp
def matmul(x, w):
  """x [..., K] @ w [K, N] -> [..., N], all bfloat16, on oneDNN (unavailable() is None)."""
  rows = x.size // x.shape[-1]
  return _call(x, w, rows, w.shape[1]).reshape(*x.shape[:-1], w.shape[1])


@jax.custom_vjp
def matmul_nt(a, b):
  """a [M, K] @ b[N, K]^T -> [M, N] in bfloat16 on oneDNN."""
  return _call(a, b, a.shape[0], b.shape[0], transpose_b=True)


@jax.custom_vjp
def matmul_tn(a, b):
  """a [M, K]^T @ b [M, N] -> [K, N] in bfloat16 on oneDNN."""
  return _call(a, b, a.shape[1], b.shape[1], transpose_a=True)


def _bwd(residuals, dy):  # x @ w
  x, w = residuals
  k, n = w.shape
  rows = x.size // k
  dy = dy.astype(jnp.bfloat16).reshape(rows, n)
  return matmul_nt(dy, w).reshape(x.shape), matmul_tn(x.reshape(rows, k), dy)


def _nt_bwd(residuals, dy):  # a @ b^T
  a, b = residuals
  dy = dy.astype(jnp.bfloat16)
  return matmul(dy, b), matmul_tn(dy, a)


def _tn_bwd(residuals, dy):  # a^T @ b
  a, b = residuals
  dy = dy.astype(jnp.bfloat16)
  return matmul_nt(b, dy), matmul(a, dy)


matmul.defvjp(lambda x, w: (matmul(x, w), (x, w)), _bwd)
matmul_nt.defvjp(lambda a, b: (matmul_nt(a, b), (a, b)), _nt_bwd)
matmul_tn.defvjp(lambda a, b: (matmul_tn(a, b), (a, b)), _tn_bwd)


# A convolution's patches (im2col) and their adjoint, in bfloat16, by the same
# library: XLA:CPU gathers patches element by element in float32 (a 3x3 layer's
# gather took 20 times its oneDNN matmul, benchmarks/README.md). Each is the
# other's VJP, so gradients of any order stay here.

def _taps_call(target: str, operand, shape, kernel_hw, strides, pads):
  _require("patches")
  (kh, kw), (sh, sw), ((ph, _), (pw, _)) = kernel_hw, strides, pads
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.bfloat16))(
      operand, kh=np.int64(kh), kw=np.int64(kw), sh=np.int64(sh), sw=np.int64(sw),
      pad_h=np.int64(ph), pad_w=np.int64(pw))


def _patches_shape(x_shape, kernel_hw, strides, pads):
  b, h, w, c = x_shape
  ho, wo = ((n + lo + hi - k) // s + 1
            for n, k, s, (lo, hi) in zip((h, w), kernel_hw, strides, pads))
  return b, ho, wo, kernel_hw[0] * kernel_hw[1] * c


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def im2col(x, kernel_hw, strides, pads):
  """The patches [B, Ho, Wo, kh kw C] (tap-major, as the kernel [kh, kw, C, O]
  reshapes) of x [B, H, W, C] (bfloat16) for a convolution of kernel_hw,
  strides and pads ((top, bottom), (left, right); negative crops)."""
  return _taps_call(IM2COL, x, _patches_shape(x.shape, kernel_hw, strides, pads),
                    kernel_hw, strides, pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def col2im(cols, x_shape, kernel_hw, strides, pads):
  """im2col's adjoint: each patch value added (in float32) to the pixel of an
  x_shape [B, H, W, C] image it came from, in bfloat16."""
  return _taps_call(COL2IM, cols, tuple(x_shape), kernel_hw, strides, pads)


im2col.defvjp(lambda x, *a: (im2col(x, *a), x.shape),
              lambda kernel_hw, strides, pads, shape, dcols: (
                  col2im(dcols.astype(jnp.bfloat16), shape, kernel_hw, strides, pads),))
col2im.defvjp(lambda cols, *a: (col2im(cols, *a), None),
              lambda x_shape, kernel_hw, strides, pads, _, dx: (
                  im2col(dx.astype(jnp.bfloat16), kernel_hw, strides, pads),))
