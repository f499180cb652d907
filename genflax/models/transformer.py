"""A decoder-only causal Transformer (GPT-style) with an explicit KV cache.

Shapes: B batch, T tokens in this call, S cache length (the context), D model
width, H heads, K width per head, F MLP width, V vocabulary.

Pre-norm blocks (LayerNorm or RMSNorm), learned or rotary positions, GELU
MLP, optional tied input/output embeddings and dropout; the attention
projections have no biases; attention written out or through
`jax.nn.dot_product_attention`. Layers compute in `dtype` with parameters
stored in `param_dtype` (mixed precision: genflax/models/layers.py); the
softmax, the norms' statistics and the logits are float32, and the KV cache
is in `dtype`. Every parameter and activation
names its logical axes (batch, length, embed, heads, kv, mlp, vocab);
`config.sharding_rules` maps them onto the mesh.

Calling with `cache=None` runs plain causal attention over T tokens. With a
cache ({"k", "v"} per layer, [B*H, S, K] each, from `init_cache`) the T new
tokens sit at positions index..index+T-1: their keys and values are written
into the cache and they attend to everything up to themselves, so a prefill
(T = prompt length, index 0) followed by one-token calls equals running the
whole sequence at once. The cache keeps batch and heads in one leading axis:
XLA:CPU then reads it in the decode loop without copying it (see
`cached_attention`).
"""
import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from genflax.models import layers, onednn

POSITIONS = ("learned", "rotary")
NORMS = ("layernorm", "rmsnorm")
# Rematerialisation of each block's activations in the backward pass: none
# (keep them all), dots (keep the weight matmuls' outputs, recompute the
# rest: attention scores, norms, GELU), full (keep only the block's input).
REMATS = {"none": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
          "full": jax.checkpoint_policies.nothing_saveable}
ATTENTIONS = ("einsum", "dot_product_attention")  # and "auto" in configs: genflax/platform.py


@dataclasses.dataclass(frozen=True)
class Variant:
  num_layers: int
  num_heads: int
  width: int      # D; the MLP is 4 * D wide
  context: int    # S: the longest sequence the model sees


VARIANTS = {
    "nano": Variant(num_layers=4, num_heads=4, width=128, context=64),
    "micro": Variant(num_layers=4, num_heads=4, width=256, context=128),
    "baby": Variant(num_layers=6, num_heads=6, width=384, context=256),
    # GPT-2 small's shape: 124M parameters with its 50,257-token vocabulary.
    "gpt2": Variant(num_layers=12, num_heads=12, width=768, context=1024),
    "tiny": Variant(num_layers=2, num_heads=2, width=32, context=16),  # tests
}
# Sizes written out, for scaling studies: L<layers>-D<width>[-H<heads>][-T<context>],
# heads defaulting to one per 32 widths, context to nano's 64.
_SPEC = re.compile(r"L(\d+)-D(\d+)(?:-H(\d+))?(?:-T(\d+))?")


def get_variant(name: str) -> Variant | None:
  """A row of VARIANTS, or the size a spec like "L4-D128" (or "L6-D384-H6-T256") writes
  out; None if `name` is neither."""
  if name in VARIANTS:
    return VARIANTS[name]
  m = _SPEC.fullmatch(name)
  if not m:
    return None
  layers, width = int(m[1]), int(m[2])
  heads = int(m[3]) if m[3] else max(width // 32, 1)
  if not (layers and width and heads) or width % heads or (width // heads) % 2:
    return None  # rotary positions rotate pairs: an even width per head
  return Variant(layers, heads, width, int(m[4]) if m[4] else 64)


def dense(features: int, names, name: str, use_bias=True, grads="xla", dtype=jnp.float32,
          param_dtype=jnp.float32):
  """nn.Dense whose kernel and bias carry logical axis names; `grads` as in
  `layers.dense_dot_general`."""
  return nn.Dense(
      features, use_bias=use_bias, name=name, dot_general=layers.dense_dot_general(grads),
      dtype=dtype, param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), names),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[-1:]))


def norm(kind: str, name: str, dtype=jnp.float32, param_dtype=jnp.float32):
  """Statistics in float32 whatever `dtype` (Flax's force_float32_reductions)."""
  scale = nn.with_logical_partitioning(nn.initializers.ones, ("embed",))
  if kind == "rmsnorm":
    return nn.RMSNorm(scale_init=scale, name=name, dtype=dtype, param_dtype=param_dtype)
  bias = nn.with_logical_partitioning(nn.initializers.zeros, ("embed",))
  return nn.LayerNorm(scale_init=scale, bias_init=bias, name=name, dtype=dtype,
                      param_dtype=param_dtype)


def attention(q, k, v, mask, impl: str = "einsum"):
  """Softmax attention: q [B, T, H, K], k and v [B, S, H, K], mask bool [T, S]
  (True where query t may see key s) -> [B, T, H, K].

  "einsum" writes the maths out (scores, mask, softmax, weighted sum); on
  XLA:CPU it ran the nano and baby train steps 5-9% faster than
  "dot_product_attention", `jax.nn.dot_product_attention`, which is the one
  that can dispatch to fused GPU kernels.
  """
  if impl == "dot_product_attention":  # its softmax is float32 (XLA) or fused (cuDNN)
    return jax.nn.dot_product_attention(q, k, v, mask=mask[None, None])
  scores = jnp.einsum("bthk,bshk->bhts", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
  return jnp.einsum("bhts,bshk->bthk", masked_softmax(scores, mask).astype(v.dtype), v)


def masked_softmax(scores, mask):
  """softmax over the last axis where `mask`, in float32 whatever the scores' dtype."""
  scores = scores.astype(jnp.float32)
  return jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(scores.dtype).min), axis=-1)


def cached_attention(q, k, v, mask):
  """Softmax attention over a heads-first cache: q [N, T, K], k and v [N, S, K]
  with N = B*H, mask [T, S] -> [N, T, K].

  Why this layout: with the cache as [B, S, H, K] XLA:CPU copied it into
  [H, K, S] for both dots at every new token, and with [B, H, S, K] (a unit
  batch axis) it copied the whole cache at the top of the decode loop; with
  one leading N axis it does neither, and nano's cached greedy decoding
  made 15-36% more tokens/s (benchmarks/README.md).
  """
  scores = jnp.einsum("ntk,nsk->nts", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
  return jnp.einsum("nts,nsk->ntk", masked_softmax(scores, mask).astype(v.dtype), v)


def rotary(x, positions):
  """Rotates pairs of x [B, T, H, K] by angles position / 10000^(2i/K)."""
  k = x.shape[-1]
  freqs = 1.0 / 10000 ** (jnp.arange(0, k, 2) / k)           # [K/2]
  angles = positions[:, None] * freqs[None, :]                # [T, K/2]
  sin, cos = (f(angles)[None, :, None].astype(x.dtype) for f in (jnp.sin, jnp.cos))
  x1, x2 = x[..., 0::2], x[..., 1::2]
  out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)  # [B, T, H, K/2, 2]
  return out.reshape(x.shape)


def project(spec: str, x, w, dense_grads: str = "xla"):
  """jnp.einsum(spec, x, w) for the attention's projections, which contract x's
  trailing axes with w's leading ones ("btd,dhk->bthk", "bthk,hkd->btd"); with
  dense_grads="onednn" and both in bfloat16, one oneDNN matmul of the flattened
  axes instead (genflax/models/onednn.py), as the dense layers'."""
  if not (dense_grads == "onednn" and x.dtype == w.dtype == jnp.bfloat16):
    return jnp.einsum(spec, x, w)
  (xs, ws), out = spec.split("->")[0].split(","), spec.split("->")[1]
  n = sum(c in ws and c not in out for c in xs)  # contracted axes
  lead, inner = x.shape[:x.ndim - n], math.prod(w.shape[:n])
  y = onednn.matmul(x.reshape(*lead, inner), w.reshape(inner, -1))
  return y.reshape(*lead, *w.shape[n:])


class Attention(nn.Module):
  num_heads: int
  rotary: bool
  dropout: float
  impl: str = "einsum"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  dense_grads: str = "xla"  # "onednn": the projections as the dense layers (`project`)

  @nn.compact
  def __call__(self, x, positions, cache, index, train):
    """x [B, T, D], positions [T] -> ([B, T, D], updated cache or None)."""
    b, t, d = x.shape
    h = self.num_heads
    init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "heads", "kv"))
    w = [self.param(name, init, (d, h, d // h), self.param_dtype).astype(self.dtype)
         for name in ("query", "key", "value")]
    x = x.astype(self.dtype)
    q, k, v = (project("btd,dhk->bthk", x, wi, self.dense_grads) for wi in w)  # [B, T, H, K]
    if self.rotary:
      q, k = rotary(q, positions), rotary(k, positions)
    names = ("batch", "length", "heads", "kv")
    q, k, v = (nn.with_logical_constraint(a, names) for a in (q, k, v))
    if cache is None:
      out = attention(q, k, v, mask=jnp.tril(jnp.ones((t, t), bool)), impl=self.impl)
    else:
      heads_first = lambda a: a.transpose(0, 2, 1, 3).reshape(b * h, t, -1)  # [B*H, T, K]
      k = jax.lax.dynamic_update_slice(cache["k"], heads_first(k), (0, index, 0))  # [B*H, S, K]
      v = jax.lax.dynamic_update_slice(cache["v"], heads_first(v), (0, index, 0))
      cache = {"k": k, "v": v}
      # Query at position index + i sees keys up to it; later slots are empty.
      mask = jnp.arange(k.shape[1])[None, :] <= positions[:, None]  # [T, S]
      if self.impl == "dot_product_attention":  # takes [B, S, H, K]
        seq_first = lambda a: a.reshape(b, h, -1, a.shape[-1]).transpose(0, 2, 1, 3)
        out = attention(q, seq_first(k), seq_first(v), mask, self.impl)
      else:
        out = cached_attention(heads_first(q), k, v, mask)
        out = out.reshape(b, h, t, -1).transpose(0, 2, 1, 3)      # [B, T, H, K]
    out = nn.with_logical_constraint(out, names)
    w_out = self.param("out", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("heads", "kv", "embed")), (h, d // h, d),
        self.param_dtype).astype(self.dtype)
    out = project("bthk,hkd->btd", out, w_out, self.dense_grads)  # [B, T, D]
    return nn.Dropout(self.dropout, deterministic=not train)(out), cache


class Block(nn.Module):
  num_heads: int
  rotary: bool
  norm: str
  dropout: float
  attention: str = "einsum"
  dense_grads: str = "xla"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  train: bool = False

  @nn.compact
  def __call__(self, x, positions, cache, index):
    """x [B, T, D] -> (x [B, T, D], this layer's cache or None)."""
    train = self.train
    d = x.shape[-1]
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h, cache = Attention(self.num_heads, self.rotary, self.dropout, self.attention, **dtypes,
                         dense_grads=self.dense_grads, name="attn")(norm(self.norm, "norm1", **dtypes)(x), positions, cache,
                                      index, train)
    x = nn.with_logical_constraint(x + h, ("batch", "length", "embed"))
    mlp_in = dense(4 * d, ("embed", "mlp"), "mlp_in", grads=self.dense_grads, **dtypes)
    mlp_out = dense(d, ("mlp", "embed"), "mlp_out", grads=self.dense_grads, **dtypes)
    h = mlp_in(norm(self.norm, "norm2", **dtypes)(x))      # [B, T, F]
    h = nn.with_logical_constraint(nn.gelu(h), ("batch", "length", "mlp"))
    h = nn.Dropout(self.dropout, deterministic=not train)(mlp_out(h))
    return nn.with_logical_constraint(x + h, ("batch", "length", "embed")), cache


class Transformer(nn.Module):
  vocab_size: int
  variant: Variant
  positions: str = "learned"
  norm: str = "layernorm"
  tie_embeddings: bool = True
  dropout: float = 0.0
  attention: str = "einsum"   # see `attention`
  dense_grads: str = "xla"    # see `layers.dense_dot_general`
  dtype: jnp.dtype = jnp.float32        # compute
  param_dtype: jnp.dtype = jnp.float32  # parameters
  # One block compiled once and scanned over depth (parameters stacked on a
  # leading "layers" axis, the cache too), instead of a Python loop whose
  # compile time grows with depth; the same maths.
  scan_layers: bool = False
  remat: str = "none"         # see REMATS
  @nn.compact
  def __call__(self, tokens, cache=None, index=0, train=False):
    """tokens int [B, T] at positions index.. -> (logits [B, T, V], cache)."""
    v = self.variant
    t = tokens.shape[1]
    positions = index + jnp.arange(t)                       # [T]
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    embed = nn.Embed(self.vocab_size, v.width, name="embed", **dtypes, embedding_init=(
        nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))))
    x = embed(tokens)                                       # [B, T, D]
    if self.positions == "learned":
      table = self.param("pos_embed", nn.with_logical_partitioning(
          nn.initializers.normal(0.02), ("length", "embed")), (v.context, v.width),
          self.param_dtype)
      x = x + jax.lax.dynamic_slice_in_dim(table, index, t)[None].astype(self.dtype)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    block = Block
    if REMATS[self.remat] is not None:
      block = nn.remat(Block, policy=REMATS[self.remat], prevent_cse=not self.scan_layers)
    args = (v.num_heads, self.positions == "rotary", self.norm, self.dropout, self.attention,
            self.dense_grads, self.dtype, self.param_dtype, train)
    if self.scan_layers:
      scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True,
                                                                        "dropout": True},
                        in_axes=(nn.broadcast, 0, nn.broadcast), length=v.num_layers,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      x, new_cache = scanned(*args, name="blocks")(x, positions, cache, index)
    else:
      new_cache = []
      for i in range(v.num_layers):
        x, layer_cache = block(*args, name=f"block{i}")(
            x, positions, None if cache is None else cache[i], index)
        new_cache.append(layer_cache)
    x = norm(self.norm, "norm_out", **dtypes)(x)
    if self.tie_embeddings:
      logits = embed.attend(x)                              # [B, T, V]
    else:
      logits = dense(self.vocab_size, ("embed", "vocab"), "head", use_bias=False,
                     grads=self.dense_grads, **dtypes)(x)
    # float32 for the log-softmax of the loss and for sampling.
    logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))
    return logits, (new_cache if cache is not None else None)


def init_cache(variant: Variant, batch_size: int, dtype=jnp.float32, stacked: bool = False):
  """An empty KV cache: per layer {"k", "v"} [B*H, S, K] zeros (`cached_attention`),
  or with `stacked` (a model with scan_layers) one {"k", "v"} [L, B*H, S, K]."""
  shape = (batch_size * variant.num_heads, variant.context, variant.width // variant.num_heads)
  if stacked:
    shape = (variant.num_layers, *shape)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
  return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
          for _ in range(variant.num_layers)]
