"""The diffusion family's network: a small U-Net over images, conditioned on a
noise level and optionally a class label.

Shapes: B batch, H W C image, D channels, E embedding width (4 x the first
level's D), L number of classes.

Per resolution `blocks` residual blocks (group norm, SiLU, 3x3 convs, the
embedding added in between; the second conv starts at zero, so each block
starts as the identity), stride-2 convs down, nearest-neighbour upsampling +
conv up, the skips concatenated; self-attention at the lowest resolution.
The noise level enters through sinusoidal features and a two-layer MLP, a
label through an embedding of L + 1 rows (row L: "no label", for
classifier-free guidance). With `patch` p > 1 the image enters as p x p
patches (space to depth: [B, H/p, W/p, p*p*C]) and leaves the same way, so
every level runs at 1/p of the image's side: at 28x28, patch 2 puts the first
level at 14x14, where wider layers cost what narrow ones did at full size.
Convolutions go through genflax/models/conv.py
(`conv` picks how they run; the parameters are the same), layers compute in
`dtype` with parameters in `param_dtype` (genflax/models/layers.py), and the
output is float32. The objective, samplers and likelihood that use it are in
genflax/tasks/diffusion.py.
"""
import math

import flax.linen as nn
import jax.numpy as jnp

from genflax.models import conv


def level_embedding(level, width: int):
  """Sinusoidal features of a noise level [B] (EDM's c_noise or the flow's t, both
  O(1)) at frequencies 1 to 1000 -> [B, width]."""
  freqs = jnp.exp(jnp.linspace(0.0, math.log(1000.0), width // 2))
  angles = level[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], -1)


def space_to_depth(x, p: int):
  """[B, H, W, C] -> [B, H/p, W/p, p*p*C]: each p x p patch becomes one pixel."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x, p: int):
  """The inverse of space_to_depth: [B, H/p, W/p, p*p*C] -> [B, H, W, C]."""
  b, h, w, pc = x.shape
  x = x.reshape(b, h, w, p, p, pc // (p * p)).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * p, w * p, pc // (p * p))


class ResBlock(nn.Module):
  features: int
  conv: str = "xla"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, emb):
    """x [B, H, W, D_in], emb [B, E] -> [B, H, W, features]."""
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda: nn.GroupNorm(min(8, x.shape[-1]), **dtypes)
    h = conv.Conv(self.features, (3, 3), impl=self.conv, **dtypes)(nn.silu(norm()(x)))
    h = h + nn.Dense(self.features, **dtypes)(emb)[:, None, None, :]
    h = nn.GroupNorm(min(8, self.features), **dtypes)(h)
    h = conv.Conv(self.features, (3, 3), impl=self.conv, kernel_init=nn.initializers.zeros,
                  **dtypes)(nn.silu(h))  # each block starts as the identity
    if x.shape[-1] != self.features:
      x = conv.Conv(self.features, (1, 1), impl=self.conv, **dtypes)(x)
    return x + h


class Attention(nn.Module):
  """Self-attention over the pixels of the lowest resolution, residual."""
  num_heads: int = 1
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, d = x.shape
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = nn.GroupNorm(min(8, d), **dtypes)(x).reshape(b, h * w, d)
    y = nn.MultiHeadDotProductAttention(self.num_heads, out_kernel_init=nn.initializers.zeros,
                                        **dtypes)(y, y)
    return x + y.reshape(b, h, w, d)


class UNet(nn.Module):
  """A U-Net: per level `blocks` residual blocks, stride-2 convs down,
  nearest-neighbour upsampling + conv up, skips concatenated."""
  channels: tuple[int, ...]  # per resolution, full first; len - 1 halvings
  blocks: int
  attention: bool            # self-attention in the middle (the lowest resolution)
  num_classes: int           # 0: unconditional; else label L means "none"
  conv: str = "xla"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  patch: int = 1             # side of the square patches the image enters and leaves as

  @nn.compact
  def __call__(self, x, level, y=None):
    """x [B, H, W, C], level [B], y [B] int in 0..L or None -> [B, H, W, C] (float32)."""
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block = lambda d: ResBlock(d, self.conv, **dtypes)
    width = 4 * self.channels[0]
    emb = nn.Dense(width, **dtypes)(level_embedding(level, self.channels[0]))
    emb = nn.Dense(width, **dtypes)(nn.silu(emb))
    if y is not None:
      emb = emb + nn.Embed(self.num_classes + 1, width, **dtypes)(y)
    emb = nn.silu(emb)                                                   # [B, E]
    h = conv.Conv(self.channels[0], (3, 3), impl=self.conv, **dtypes)(
        space_to_depth(x, self.patch).astype(self.dtype))
    skips = [h]
    for i, d in enumerate(self.channels):
      for _ in range(self.blocks):
        h = block(d)(h, emb)
        skips.append(h)
      if i < len(self.channels) - 1:
        h = conv.Conv(d, (3, 3), 2, impl=self.conv, **dtypes)(h)        # halves H, W
        skips.append(h)
    h = block(self.channels[-1])(h, emb)
    if self.attention:
      h = Attention(**dtypes)(h)
    h = block(self.channels[-1])(h, emb)
    for i, d in reversed(list(enumerate(self.channels))):
      for _ in range(self.blocks + 1):
        h = block(d)(jnp.concatenate([h, skips.pop()], -1), emb)
      if i > 0:
        h = jnp.repeat(jnp.repeat(h, 2, 1), 2, 2)                        # doubles H, W
        h = conv.Conv(d, (3, 3), impl=self.conv, **dtypes)(h)
    h = nn.silu(nn.GroupNorm(min(8, h.shape[-1]), **dtypes)(h))
    out = conv.Conv(self.patch ** 2 * x.shape[-1], (3, 3), impl=self.conv,
                    kernel_init=nn.initializers.zeros, **dtypes)(h)
    return depth_to_space(out, self.patch).astype(jnp.float32)
