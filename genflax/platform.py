"""The `auto` config values, resolved for the machine a run is on.

Some choices that make a step fast on one backend waste another: on CPU
devices genflax averages gradients as one flat buffer and forms weight
gradients as row-major matmuls (XLA:CPU's collectives cost tens of
microseconds per buffer, and its fast matmul takes no transposed operand),
and writes attention out as einsums; on GPUs and TPUs XLA's own all-reduces,
its own dot layouts and the fused `jax.nn.dot_product_attention` (cuDNN on
GPUs) are the fast paths. Each such key takes `auto`, and `choices` picks
its value from the backend, the mesh and the model's size: a pure function,
so what a config becomes on 8 GPUs or a TPU slice is testable on a laptop.
Values given explicitly are kept (and checked against the mesh).

The measurements behind each rule are in benchmarks/README.md.
"""
import math

import jax
import ml_collections

from genflax import optim

# Above this many parameters, gathering them back after the split update
# (train.grad_allreduce=reduce_scatter) costs more on CPU devices than the
# split saves: the nano LM (0.8M) is 5% faster with it, baby (10.8M) 6% slower.
REDUCE_SCATTER_MAX_PARAMS = 4_000_000


def grad_allreduce(backend: str, mesh_shape: dict, num_params: int,
                   allowed=optim.GRAD_ALLREDUCES) -> str:
  """train.grad_allreduce=auto: XLA's per-parameter all-reduces except between
  CPU devices holding whole replicas, where one flat buffer (split, for small
  models) is faster. `allowed`: what the family's step supports."""
  shards = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
  replicated = mesh_shape.get("fsdp", 1) == 1 and mesh_shape.get("tensor", 1) == 1
  if backend != "cpu" or not replicated or shards == 1:
    choice = "per_param"
  elif optim.FLAT_PAD % shards == 0 and num_params <= REDUCE_SCATTER_MAX_PARAMS:
    choice = "reduce_scatter"
  else:
    choice = "flat"
  return choice if choice in allowed else "per_param"


def dense_grads(backend: str, bf16_matmul: bool = False) -> str:
  """model.dense_grads=auto (genflax/models/layers.py): on CPU, oneDNN where the run
  computes in bfloat16 and the CPU has bfloat16 units that oneDNN can drive
  (`bf16_matmul`), else row-major gradients."""
  if backend != "cpu":
    return "xla"
  return "onednn" if bf16_matmul else "row_major"


def decode_dtype(backend: str, dtype: str) -> str:
  """model.decode_dtype=auto: what the LM's KV-cache decode computes in. On CPU
  float32 whatever the training's dtype: XLA:CPU has no bfloat16 kernel for the
  decode's one-row matmuls and converts the weights to float32 at every token
  (a bfloat16 nano LM decoded several times slower than in float32,
  benchmarks/README.md); elsewhere the model's own dtype."""
  return "float32" if backend == "cpu" else dtype


# model.dtype=auto: for each (machine, family), the fewest parameters from which
# the family's train step measured faster in bfloat16 than in float32 on that kind
# of machine, alternated in one sitting (benchmarks/README.md, "model.dtype=auto").
# "cpu_amx": a CPU with AMX tiles, bfloat16 dense layers on oneDNN
# (model.dense_grads=onednn), and convolutions on oneDNN (model.conv=onednn). Where
# no row shows bfloat16 ahead (another CPU, a GPU, the conv VAE, level in both)
# auto is float32.
BF16_FROM_PARAMS = {
    # The baby LM (10.8M) stepped in 3,824-3,851 ms in bfloat16 against 6,264-6,577
    # in float32; the nano LM (0.8M) was level (31.0-33.1 against 28.3-31.5 ms).
    ("cpu_amx", "lm"): 10_000_000,
    # The 28x28 DCGAN (13.2M) in 109.9-112.4 ms against 163.5-167.4 (batch 64).
    ("cpu_amx", "gan"): 13_000_000,
    # The Fashion-MNIST U-Net (0.92M) in 461.9-485.5 ms against 532-553 (batch 128).
    ("cpu_amx", "diffusion"): 900_000,
}


def compute_dtype(backend: str, family: str, num_params: int, bf16_units: str = "") -> str:
  """model.dtype=auto: "bfloat16" where `family`'s step measured faster in it on this
  kind of machine at this size (BF16_FROM_PARAMS), else "float32". bf16_units: the
  CPU's bfloat16 units that oneDNN drives here ("amx", "avx512_bf16" or "")."""
  machine = f"cpu_{bf16_units}" if backend == "cpu" and bf16_units else backend
  least = BF16_FROM_PARAMS.get((machine, family))
  return "bfloat16" if least is not None and num_params >= least else "float32"


def attention(backend: str) -> str:
  """model.attention=auto (genflax/models/transformer.py)."""
  return "einsum" if backend == "cpu" else "dot_product_attention"


# On CPU, images at least this large (height and width) take model.conv=forward:
# at 28x28 its steps are faster than matmul's (DCGAN 1.06x, conv VAE 1.26x),
# at 8x8 slower (DCGAN 2.1x, cGAN 1.3x): benchmarks/README.md.
FORWARD_CONV_MIN_SIZE = 16


# A bfloat16 run's convolutions as oneDNN matmuls (model.conv=onednn) where oneDNN
# drives the CPU's bfloat16 units, for the families whose bfloat16 steps that made
# faster than XLA's bfloat16 convolutions (`forward`), with the patches gathered by
# oneDNN's library: the 28x28 DCGAN 255 -> 110-112 ms, the Fashion-MNIST U-Net
# 982-1063 -> 626-714 ms, the conv VAE 77-80 -> 65-69 ms (benchmarks/README.md).
ONEDNN_CONV_FAMILIES = ("gan", "diffusion", "vae")


def conv(backend: str, image_hw: tuple[int, int] = (0, 0), bf16_onednn: bool = False) -> str:
  """model.conv=auto (genflax/models/conv.py) for images of image_hw (H, W);
  bf16_onednn: a bfloat16 run of a family in ONEDNN_CONV_FAMILIES where oneDNN
  drives the CPU's bfloat16 units, whose convolutions' matmuls go there."""
  if backend != "cpu":
    return "xla"
  if bf16_onednn:
    return "onednn"
  return "forward" if min(image_hw) >= FORWARD_CONV_MIN_SIZE else "matmul"


def choices(config, backend: str, mesh_shape: dict, num_params: int,
            allowed_allreduces=optim.GRAD_ALLREDUCES, image_hw=(0, 0),
            bf16_units: str = "") -> dict:
  """{key: value} for each `auto` key of `config` on this machine. bf16_units: the
  CPU's bfloat16 units on which oneDNN's bfloat16 matmul runs here ("amx",
  "avx512_bf16"; "" for none: bf16_units_here)."""
  dtype = config.get("model", {}).get("dtype", "float32")
  if dtype == "auto":
    dtype = compute_dtype(backend, config.get("task", ""), num_params, bf16_units)
  bf16 = bool(bf16_units) and dtype == "bfloat16"
  rules = {
      "model.dtype": lambda: dtype,
      "train.grad_allreduce": lambda: grad_allreduce(backend, mesh_shape, num_params,
                                                     allowed_allreduces),
      "model.dense_grads": lambda: dense_grads(backend, bf16),
      "model.attention": lambda: attention(backend),
      "model.decode_dtype": lambda: decode_dtype(backend, dtype),
      "model.conv": lambda: conv(backend, image_hw,
                                 bf16 and config.get("task") in ONEDNN_CONV_FAMILIES),
  }
  out = {}
  for key, rule in rules.items():
    section, name = key.split(".")
    if config.get(section, {}).get(name) == "auto":
      out[key] = rule()
  return out


def bf16_units_here(config) -> str:
  """The CPU's bfloat16 units ("amx" or "avx512_bf16") where a bfloat16 run's dense
  layers could go to oneDNN here: a CPU backend, those units, and the oneDNN matmul
  built (genflax/models/onednn.py); "" otherwise. Only looked for where the config
  leaves a choice that depends on it to auto (model.dtype, model.dense_grads,
  model.conv)."""
  model = config.get("model", {})
  if (jax.default_backend() != "cpu" or model.get("dtype") not in ("bfloat16", "auto")
      or "auto" not in (model.get("dtype"), model.get("dense_grads"), model.get("conv"))):
    return ""
  from genflax.models import onednn  # pylint: disable=g-import-not-at-top
  units = onednn.cpu_bf16_units()
  return units if units and onednn.unavailable() is None else ""


def resolve(config, values: dict) -> ml_collections.ConfigDict:
  """A copy of `config` with `values` (from `choices`) in place of its autos."""
  out = ml_collections.ConfigDict(config.to_dict())
  for key, value in values.items():
    section, name = key.split(".")
    out[section][name] = value
  return out


def describe(values: dict) -> str:
  return ", ".join(f"{k}={v}" for k, v in values.items())


def count(abstract_params) -> int:
  """How many numbers a (possibly abstract) parameter tree holds."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params))
