"""VAE family: MLP or conv encoder/decoder, ELBO training, IWAE evaluation.

Its prior samples (the decoder's mean image of z ~ N(0, I), balanced over
classes when conditional) are scored with the image metrics every image
family shares (genflax/tasks/image_metrics.py: FID, KID, IS,
precision/recall, class coverage) on labelled datasets, so a VAE compares
with the GANs and diffusion models on one table.

Shapes: B batch, H W C image, Z latent size, K importance samples,
L number of classes (conditional VAE only).

Pixels come as uint8 levels 0..n-1 and are scaled to x in [0, 1]. The
likelihoods give log p(x|z) in nats per image:
  bernoulli              x treated as a probability (the usual grey-level VAE);
  gaussian               fixed sigma (`model.obs_sigma`), a density;
  discretized_gaussian   learned per-pixel mean and scale, the probability of
                         x's bin among the n levels: a true discrete likelihood,
                         so its NLL and bits/dim compare across models.
"""
import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.scipy.special import log_ndtr

from genflax import checks, data, evaluation, optim, sharding
from genflax.errors import ConfigError
from genflax.models import conv, layers
from genflax.tasks import image_metrics

LIKELIHOODS = ("bernoulli", "gaussian", "discretized_gaussian")
ARCHS = ("mlp", "conv")


# ---- Modules

class Encoder(nn.Module):
  arch: str
  hidden: tuple[int, ...]
  channels: tuple[int, ...]
  latent_dim: int
  dense_grads: str = "xla"   # see genflax.models.layers
  dtype: jnp.dtype = jnp.float32        # compute (mixed precision: genflax/models/layers.py)
  param_dtype: jnp.dtype = jnp.float32
  conv: str = "xla"          # xla | matmul (genflax/models/conv.py)

  @nn.compact
  def __call__(self, x, y=None):
    """x [B, H, W, C] in [0, 1], y [B, L] one-hot or None -> mu, logvar [B, Z] (float32)."""
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = x.astype(self.dtype)
    if self.arch == "conv":
      for ch in self.channels:
        h = nn.gelu(conv.Conv(ch, (3, 3), 2, impl=self.conv, **dtypes)(h))  # halves H and W
    h = h.reshape(h.shape[0], -1)
    if y is not None:
      h = jnp.concatenate([h, y.astype(self.dtype)], -1)
    dense = functools.partial(nn.Dense, dot_general=layers.dense_dot_general(self.dense_grads),
                              **dtypes)
    for width in self.hidden:
      h = nn.gelu(dense(width)(h))
    return (dense(self.latent_dim)(h).astype(jnp.float32),
            dense(self.latent_dim)(h).astype(jnp.float32))


class Decoder(nn.Module):
  arch: str
  hidden: tuple[int, ...]
  channels: tuple[int, ...]
  image_shape: tuple[int, int, int]
  num_outputs: int  # per pixel: 1 (logit or mean) or 2 (mean, log-scale)
  dense_grads: str = "xla"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  conv: str = "xla"

  @nn.compact
  def __call__(self, z, y=None):
    """z [B, Z], y [B, L] or None -> [B, H, W, C, num_outputs] (float32, for the likelihood)."""
    b = z.shape[0]
    h_img, w_img, c_img = self.image_shape
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = (z if y is None else jnp.concatenate([z, y], -1)).astype(self.dtype)
    dense = functools.partial(nn.Dense, dot_general=layers.dense_dot_general(self.dense_grads),
                              **dtypes)
    for width in reversed(self.hidden):
      h = nn.gelu(dense(width)(h))
    if self.arch == "conv":
      scale = 2 ** len(self.channels)
      h = nn.gelu(dense(h_img // scale * w_img // scale * self.channels[-1])(h))
      h = h.reshape(b, h_img // scale, w_img // scale, self.channels[-1])
      for ch in reversed(self.channels):
        h = nn.gelu(conv.ConvTranspose(ch, (3, 3), 2, impl=self.conv, **dtypes)(h))  # doubles H, W
      h = conv.Conv(c_img * self.num_outputs, (3, 3), impl=self.conv, **dtypes)(h)  # [B, H, W, C * outputs]
    else:
      h = dense(h_img * w_img * c_img * self.num_outputs)(h)
    return h.reshape(b, h_img, w_img, c_img, self.num_outputs).astype(jnp.float32)


class VAE(nn.Module):
  encoder: Encoder
  decoder: Decoder

  def __call__(self, x, y, rng):
    """For init: one pass x -> z -> decoder outputs."""
    mu, logvar = self.encoder(x, y)
    return self.decoder(reparameterize(rng, mu, logvar), y)

  def encode(self, x, y=None):
    return self.encoder(x, y)

  def decode(self, z, y=None):
    return self.decoder(z, y)


# ---- Setup and state

@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class Setup:
  config: object
  info: object
  model: VAE
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  mesh: jax.sharding.Mesh
  # Evaluation's compiled parts and reference statistics, made on first use.
  cache: dict = dataclasses.field(default_factory=dict, hash=False, compare=False)


def datasets(config, workdir: str):
  del workdir  # images need nothing saved with the run
  # .get: a workdir's config.json from before data.idx_dir existed lacks it (genflax.sample)
  return data.load(config.data.name, config.data.data_dir or None,
                   config.data.get("idx_dir") or None)


def check(config) -> None:
  """The VAE's config values (genflax/checks.py has the shared ones)."""
  checks.one_of(config, "model.arch", ARCHS)
  checks.one_of(config, "model.likelihood", LIKELIHOODS)
  checks.sizes(config, "model.hidden")
  checks.sizes(config, "model.channels", nonempty=config.model.arch == "conv")
  checks.integer(config, "model.latent_dim", 1)
  checks.number(config, "model.obs_sigma", above=0)
  checks.number(config, "model.beta", low=0)
  checks.boolean(config, "model.conditional")
  checks.one_of(config, "model.dense_grads", layers.DENSE_GRADS)
  layers.dense_grads(config.model.dense_grads)  # onednn: whether it runs here
  checks.one_of(config, "model.conv", conv.CONVS)
  for key in ("iwae_k", "final_iwae_k", "iwae_chunk"):
    checks.integer(config, f"eval.{key}", 1)
  image_metrics.check(config)
  for key in ("iwae_k", "final_iwae_k"):
    k = config.eval[key]
    if k % min(k, config.eval.iwae_chunk):
      raise ConfigError(f"eval.iwae_chunk={config.eval.iwae_chunk} must divide eval.{key}={k} "
                        "(the importance samples go through the decoder in chunks of it)")


def build(config, info) -> Setup:
  m = config.model
  rows = info.num_classes if m.conditional else 8
  if not 2 * rows <= config.eval.num_samples <= info.num_test:
    raise ConfigError(f"eval.num_samples={config.eval.num_samples}: the interpolations pair "
                      f"{rows} test images with {rows} others; use {2 * rows} to "
                      f"{info.num_test}")
  h, w, _ = info.image_shape
  if m.arch == "conv" and (h % 2 ** len(m.channels) or w % 2 ** len(m.channels)):
    raise ConfigError(f"model.channels={tuple(m.channels)}: {len(m.channels)} stride-2 "
                      f"convs need H and W divisible by {2 ** len(m.channels)}, got {h}x{w}")
  if m.conditional and not info.num_classes:
    raise ConfigError(f"model.conditional=True needs labels; dataset {info.name} has none")
  outputs = 2 if m.likelihood == "discretized_gaussian" else 1
  grads, dtypes = layers.dense_grads(m.dense_grads), layers.dtypes(m)
  impl = conv.conv_impl(m.get("conv", "auto"), info.image_shape[:2])
  model = VAE(Encoder(m.arch, tuple(m.hidden), tuple(m.channels), m.latent_dim, grads, *dtypes,
                      conv=impl),
              Decoder(m.arch, tuple(m.hidden), tuple(m.channels), info.image_shape, outputs,
                      grads, *dtypes, conv=impl))
  return Setup(config, info, model, optim.build(config.optim, config.train.num_steps),
               optim.schedule(config.optim, config.train.num_steps), sharding.make_mesh(config.mesh))


def init(setup: Setup, rng) -> dict:
  x = jnp.zeros((1, *setup.info.image_shape))
  params = setup.model.init(rng, x, one_hot(setup, jnp.zeros((1,), jnp.int32)), rng)["params"]
  return {"params": params,
          "opt_state": optim.init(setup.tx, params, setup.config.train)}


def learning_rates(setup: Setup, step: int) -> dict:
  return {"lr": setup.schedule(step)}


# ---- Maths

def reparameterize(rng, mu, logvar):
  return mu + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mu.shape)


def kl_to_prior(mu, logvar):
  """KL(N(mu, exp(logvar)) || N(0, I)) summed over Z: [B, Z] -> [B]."""
  return 0.5 * jnp.sum(jnp.exp(logvar) + mu**2 - 1.0 - logvar, -1)


def gaussian_log_prob(z, mu, logvar):
  """log N(z; mu, exp(logvar)) summed over the last axis."""
  return -0.5 * jnp.sum(logvar + (z - mu) ** 2 / jnp.exp(logvar) + math.log(2 * math.pi), -1)


def log_likelihood(setup: Setup, out, x):
  """log p(x|z) in nats: decoder outputs [..., H, W, C, o] and x [..., H, W, C] -> [...]."""
  kind = setup.config.model.likelihood
  if kind == "bernoulli":
    lp = -optax.sigmoid_binary_cross_entropy(out[..., 0], x)
  elif kind == "gaussian":
    sigma = setup.config.model.obs_sigma
    lp = -0.5 * (((x - out[..., 0]) / sigma) ** 2 + math.log(2 * math.pi * sigma**2))
  else:
    lp = discretized_gaussian_log_prob(x, out[..., 0], out[..., 1], setup.info.num_levels)
  return jnp.sum(lp, axis=(-3, -2, -1))


def discretized_gaussian_log_prob(x, mean, log_scale, num_levels: int):
  """log P(x's bin) under N(mean, scale) cut into `num_levels` bins on [0, 1]."""
  half_bin = 0.5 / (num_levels - 1)
  inv_scale = jnp.exp(-jnp.clip(log_scale, -7.0, 7.0))
  upper = (x + half_bin - mean) * inv_scale
  lower = (x - half_bin - mean) * inv_scale
  first, last = x < half_bin, x > 1 - half_bin  # these bins take all below / above them
  # log(Phi(u) - Phi(l)) on the side of the bin far from the tail: a bin above
  # the mean, or the last one, as log(Phi(-l) - Phi(-u)). Choosing the side
  # before the log_ndtr calls takes two per pixel, where computing both sides
  # and choosing after takes four (benchmarks/README.md, "The VAE's likelihood").
  flip = ~first & (last | (lower > 0))
  hi, lo = jnp.where(flip, -lower, upper), jnp.where(flip, -upper, lower)
  log_hi = log_ndtr(hi)
  mid = log_hi + jnp.log1p(-jnp.exp(jnp.minimum(log_ndtr(lo) - log_hi, -1e-6)))
  return jnp.where(first | last, log_hi, mid)


def mean_image(setup: Setup, out):
  """Decoder outputs -> the mean picture in [0, 1]: [..., H, W, C]."""
  if setup.config.model.likelihood == "bernoulli":
    return jax.nn.sigmoid(out[..., 0])
  return jnp.clip(out[..., 0], 0.0, 1.0)


def inputs(setup: Setup, batch):
  """uint8 levels -> x in [0, 1] [B, H, W, C]; labels -> one-hot [B, L] or None."""
  x = batch["image"].astype(jnp.float32) / (setup.info.num_levels - 1)
  return x, one_hot(setup, batch.get("label"))


def one_hot(setup: Setup, labels):
  if not setup.config.model.conditional or labels is None:
    return None
  return jax.nn.one_hot(labels, setup.info.num_classes)


# ---- Training and evaluation

def train_flops(setup: Setup) -> float:
  """Matmul/conv FLOPs of one training example: forward x 3 (backward ~ 2x forward)."""
  m, info = setup.config.model, setup.info
  h, w, c = info.image_shape
  labels = info.num_classes if m.conditional else 0
  outputs = setup.model.decoder.num_outputs
  macs, width, size = 0, h * w * c, (h, w)
  if m.arch == "conv":
    cin = c
    for ch in m.channels:          # encoder: 3x3 stride-2 convs
      size = (size[0] // 2, size[1] // 2)
      macs += size[0] * size[1] * 9 * cin * ch
      cin = ch
    width = size[0] * size[1] * cin
  for dims in ([width + labels, *m.hidden], [m.latent_dim + labels, *reversed(m.hidden)]):
    macs += sum(a * b for a, b in zip(dims[:-1], dims[1:]))
  macs += 2 * m.hidden[-1] * m.latent_dim  # mu and logvar heads
  if m.arch == "conv":
    macs += m.hidden[0] * width            # dense to the smallest feature map
    cin = m.channels[-1]
    for ch in reversed(m.channels):        # decoder: stride-2 transposed convs,
      macs += size[0] * size[1] * 9 * cin * ch  # each input pixel to a 3x3 patch
      size, cin = (size[0] * 2, size[1] * 2), ch
    macs += h * w * 9 * cin * c * outputs
  else:
    macs += m.hidden[0] * h * w * c * outputs
  return 3 * 2 * macs


def elbo_terms(setup: Setup, params, x, y, rng):
  """Per image: reconstruction NLL and KL, [B] each, one z sample."""
  mu, logvar = setup.model.apply({"params": params}, x, y, method=VAE.encode)
  z = reparameterize(rng, mu, logvar)
  out = setup.model.apply({"params": params}, z, y, method=VAE.decode)
  return -log_likelihood(setup, out, x), kl_to_prior(mu, logvar)


def train_step(setup: Setup, state: dict, batch: dict, rng):
  def loss_fn(params, batch, rng):
    x, y = inputs(setup, batch)
    rec, kl = elbo_terms(setup, params, x, y, rng)
    loss = jnp.mean(rec + setup.config.model.beta * kl)
    return loss, {"loss": loss, "rec": jnp.mean(rec), "kl": jnp.mean(kl),
                  "neg_elbo": jnp.mean(rec + kl)}

  return optim.update(setup.tx, state, loss_fn, batch, rng, setup.config.train, setup.mesh)


def iwae_bound(setup: Setup, params, x, y, rng, k: int):
  """log p(x) >= logsumexp_k log[p(x|z_k) p(z_k) / q(z_k|x)] - log k, per image [B].

  The k samples go through the decoder in chunks so that k = 1000 fits in memory.
  """
  mu, logvar = setup.model.apply({"params": params}, x, y, method=VAE.encode)
  chunk = min(k, setup.config.eval.iwae_chunk)  # divides k (checked with the config)

  def log_weights(rng):  # -> [chunk, B]
    eps = jax.random.normal(rng, (chunk, *mu.shape))
    z = mu[None] + jnp.exp(0.5 * logvar)[None] * eps                  # [chunk, B, Z]
    yk = None if y is None else jnp.tile(y, (chunk, 1))               # [chunk * B, L]
    out = setup.model.apply({"params": params}, z.reshape(-1, z.shape[-1]), yk,
                            method=VAE.decode).reshape(chunk, *x.shape, -1)
    return (log_likelihood(setup, out, jnp.broadcast_to(x, out.shape[:-1]))
            + gaussian_log_prob(z, 0.0, 0.0)
            - gaussian_log_prob(z, mu[None], logvar[None]))

  log_w = jax.lax.map(log_weights, jax.random.split(rng, k // chunk))  # [k/chunk, chunk, B]
  return jax.nn.logsumexp(log_w.reshape(k, -1), axis=0) - math.log(k)


def eval_step(setup: Setup, state: dict, batch: dict, rng, final: bool) -> dict:
  """Per test image: -ELBO and the IWAE NLL bound in nats, and in bits per
  dimension where they are probabilities of the discrete pixels (the
  discretised Gaussian; a Gaussian density or a Bernoulli of grey levels has
  no such reading).

  The bound takes eval.iwae_k importance samples, and eval.final_iwae_k at
  the final evaluation (so its names carry no k: one curve over the run).
  """
  x, y = inputs(setup, batch)
  rng_elbo, rng_iwae = jax.random.split(rng)
  rec, kl = elbo_terms(setup, state["params"], x, y, rng_elbo)
  k = setup.config.eval.final_iwae_k if final else setup.config.eval.iwae_k
  nll = -iwae_bound(setup, state["params"], x, y, rng_iwae, k)
  values = {"neg_elbo": rec + kl, "rec": rec, "kl": kl, "iwae_nll": nll}
  if setup.config.model.likelihood == "discretized_gaussian":
    dims = math.prod(setup.info.image_shape) * math.log(2)
    values.update(neg_elbo_bpd=(rec + kl) / dims, iwae_bpd=nll / dims)
  return values


_eval_step = jax.jit(eval_step, static_argnums=(0, 4))


def evaluate(setup: Setup, state: dict, test: dict, rng, final: bool,
             parts: evaluation.Parts | None = None) -> dict:
  """eval_step's means over the test split and, on a labelled dataset, the image
  metrics of eval.fid_samples prior samples (eval.final_fid_samples at the end, over
  eval.final_fid_draws sets; 0: as many as the test split has). Each is one of
  `parts`."""
  c, parts = setup.config, parts or evaluation.Parts()
  step = lambda s, b, r, f: _eval_step(setup, s, b, r, f)
  values = dict(parts("means", lambda: evaluation.split_means(
      step, state, test, c.eval.batch_size, sharding.batch_sharding(setup.mesh), rng, final)))
  if setup.info.num_classes:
    n = (c.eval.final_fid_samples if final else c.eval.fid_samples) or setup.info.num_test
    train, _, _ = datasets(c, "")
    ref = image_metrics.reference(c, train, test, setup.info, n, setup.cache)
    params = sharding.host_copy(state["params"])
    values.update(parts("draws", lambda: image_metrics.scores_over_draws(
        ref, lambda r: generate_images(setup, params, n, r), jax.random.fold_in(rng, 3),
        c.eval.final_fid_draws if final else 1)))
  return values


def draw(setup: Setup):
  """draw(params, rng, labels [n] or None, n) -> prior samples [n, H, W, C] in [-1, 1]
  (the decoder's mean image), compiled once per n (setup.cache)."""
  if "draw" not in setup.cache:
    def fn(params, rng, labels, n):
      z = jax.random.normal(rng, (n, setup.config.model.latent_dim))
      out = setup.model.apply({"params": params}, z, one_hot(setup, labels), method=VAE.decode)
      return mean_image(setup, out) * 2.0 - 1.0
    setup.cache["draw"] = jax.jit(fn, static_argnums=3)
  return setup.cache["draw"]


def generate_images(setup: Setup, params, n: int, rng):
  """n prior samples [n, H, W, C] in [-1, 1] (NumPy), balanced over classes if
  conditional (image_metrics.generate)."""
  labels = image_metrics.balanced_labels(
      n, setup.info.num_classes if setup.config.model.conditional else None)
  return image_metrics.generate(lambda rng, y, m: draw(setup)(params, rng, y, m), n, rng,
                                labels)


def samples(setup: Setup, state: dict, batch: dict, rng) -> dict:
  """Grids [rows, cols, H, W, C]: reconstructions beside inputs, prior samples, interpolations."""
  params = state["params"]
  x, y = inputs(setup, batch)
  n, cols = x.shape[0], 8
  mu, _ = setup.model.apply({"params": params}, x, y, method=VAE.encode)
  decode = lambda z, y: mean_image(setup, setup.model.apply(
      {"params": params}, z, y, method=VAE.decode))
  recon = decode(mu, y)
  pairs = jnp.stack([x, recon], 1)[: n - n % (cols // 2)]  # input, reconstruction, ...
  grids = {"reconstructions": pairs.reshape(-1, cols, *x.shape[1:])}
  rows = setup.info.num_classes if setup.config.model.conditional else 8
  z = jax.random.normal(rng, (rows * cols, mu.shape[-1]))
  labels = one_hot(setup, jnp.repeat(jnp.arange(rows), cols))  # a row per class
  grids["samples"] = decode(z, labels).reshape(rows, cols, *x.shape[1:])
  t = jnp.linspace(0.0, 1.0, cols)[None, :, None]  # [1, cols, 1]
  a, b = mu[0:rows], mu[rows:2 * rows]               # pairs of test images
  z_path = (1 - t) * a[:, None] + t * b[:, None]     # [rows, cols, Z]
  y_path = None if y is None else jnp.repeat(y[:rows], cols, 0)
  grids["interpolations"] = decode(z_path.reshape(rows * cols, -1), y_path).reshape(
      rows, cols, *x.shape[1:])
  return grids


def write_samples(setup: Setup, grids: dict, writer, step: int) -> None:
  writer.image_grids(step, grids)


def generate(setup: Setup, state: dict, args) -> None:
  """`genflax.sample`: args.num prior samples (the decoder's mean images), a PNG grid or
  an .npz of arrays (image_metrics.save_samples)."""
  image_metrics.save_samples(args, setup.info, setup.config.model.conditional,
                             lambda rng, y, n: draw(setup)(state["params"], rng, y, n))
