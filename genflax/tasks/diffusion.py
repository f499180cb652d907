"""Diffusion family: an EDM denoiser or a rectified flow over a small U-Net
(genflax/models/unet.py), ODE samplers.

Shapes: B batch, H W C image, L number of classes (conditional models), N
sampler steps.

Pixels are uint8 levels scaled to x in [-1, 1] (the GAN's range). Two
objectives (`loss.kind`), one network F(x, noise level, label):

  edm   Karras et al. 2022: the denoiser D(x; sigma) = c_skip x + c_out
        F(c_in x, c_noise) with EDM's preconditioning (sigma_data = 0.5),
        trained at ln sigma ~ N(loss.p_mean, loss.p_std^2) (or, with
        loss.sigma_sampling=log_uniform, uniform over the sampler's range) with the weight
        (sigma^2 + sigma_data^2) / (sigma sigma_data)^2;
  flow  rectified flow (flow matching): x_t = (1 - t) n + t x for noise n,
        F(x_t, t) fits the velocity x - n; t uniform or logit-normal.

Both sample by integrating one ODE dx/dtau = f(x, tau) over a grid
(`sample_grid`): EDM from sigma_max down to 0 on its rho = 7 schedule with
f = (x - D(x; sigma)) / sigma, the flow from t = 0 (noise) to 1 with f = F.
`sample.sampler` is euler or heun (second order; EDM's last step, into
sigma = 0, is Euler); `sample.churn` > 0 adds EDM's stochastic churn.

Classifier-free guidance: training drops a label with probability
`model.label_dropout` (a null class L stands for "no label"); sampling
mixes f_uncond + w (f_cond - f_uncond), so w = 0 is the unconditional
model and w = 1 the conditional one (`sample.guidance`).

Likelihood (`log_likelihood`): the same ODE carries a density. Test images are
integrated from the data end to the noise end, where x is Gaussian, with the
divergence of f along the path (Hutchinson's estimate over `eval.nll_probes`
Rademacher probes per image, or exact) by diffrax's adaptive Tsit5. Two bounds
on log P(levels), the quantity the VAE's IWAE bound estimates
(genflax/tasks/vae.py), turn that density into bits/dim of the discrete pixels
(`levels_log_likelihood`, `eval.nll_dequantization`): `uniform` scores a
uniform draw inside each pixel's level bin (of width 2 / (levels - 1)) from
EDM's sigma_min; `gaussian` (Kingma et al. 2021) blurs the levels by
N(0, eval.nll_sigma^2), starts the ODE at that sigma and reads the levels back
with a per-pixel decoder, so the noise levels below it, where a denoiser trained
for samples is least exact, are not integrated. EDM runs in log sigma.

The state keeps an EMA of the parameters (`loss.ema_decay`, shared with the
GAN: genflax.tasks.ema_update); evaluation and samples use it. FID and
friends come from genflax/tasks/image_metrics.py, as the GAN's do.
"""
import dataclasses
import math

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from genflax import checks, data, evaluation, optim, sharding, tasks
from genflax.errors import ConfigError
from genflax.models import conv, layers, unet
from genflax.tasks import image_metrics

KINDS = ("edm", "flow")
SAMPLERS = ("euler", "heun")
DEQUANTIZATIONS = ("uniform", "gaussian")  # levels_log_likelihood's bounds
TIME_SAMPLING = ("uniform", "logit_normal")
SIGMA_SAMPLING = ("lognormal", "log_uniform")  # EDM's training noise levels
SIGMA_DATA = 0.5  # EDM's assumed standard deviation of the data, here on [-1, 1]


# ---- Setup and state

@dataclasses.dataclass(frozen=True)
class Setup:
  config: object
  info: object
  net: unet.UNet
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  mesh: jax.sharding.Mesh
  # Evaluation's compiled parts and reference statistics, made on first use.
  cache: dict = dataclasses.field(default_factory=dict, hash=False, compare=False)


def datasets(config, workdir: str):
  del workdir  # images need nothing saved with the run
  return data.load(config.data.name, config.data.data_dir or None,
                   config.data.get("idx_dir") or None)


def check(config) -> None:
  """The diffusion family's config values (genflax/checks.py has the shared ones)."""
  m, loss, s = config.model, config.loss, config.sample
  checks.sizes(config, "model.channels", nonempty=True)
  if any(d % 8 for d in m.channels):
    raise ConfigError(f"model.channels={tuple(m.channels)}: group norm takes 8 groups, so "
                      "every width must be a multiple of 8")
  checks.integer(config, "model.blocks", 1)
  checks.integer(config, "model.patch", 1)
  checks.boolean(config, "model.attention")
  checks.boolean(config, "model.conditional")
  checks.number(config, "model.label_dropout", low=0, below=1)
  checks.one_of(config, "model.conv", conv.CONVS)
  checks.one_of(config, "loss.kind", KINDS)
  checks.number(config, "loss.p_mean")
  checks.number(config, "loss.p_std", above=0)
  checks.one_of(config, "loss.sigma_sampling", SIGMA_SAMPLING)
  checks.one_of(config, "loss.time_sampling", TIME_SAMPLING)
  checks.number(config, "loss.ema_decay", low=0, below=1)
  checks.boolean(config, "loss.dequantize")
  checks.one_of(config, "sample.sampler", SAMPLERS)
  checks.integer(config, "sample.steps", 1)
  checks.number(config, "sample.guidance", low=0)
  checks.number(config, "sample.churn", low=0)
  checks.number(config, "sample.sigma_min", above=0)
  checks.number(config, "sample.sigma_max", above=s.sigma_min)
  checks.number(config, "sample.rho", above=0)
  if s.churn and loss.kind != "edm":
    raise ConfigError(f"sample.churn={s.churn}: stochastic churn is EDM's sampler; "
                      "the flow samples deterministically, use 0")
  if s.guidance != 1 and not m.conditional:
    raise ConfigError(f"sample.guidance={s.guidance}: guidance needs a conditional model "
                      "(model.conditional=True); use 1")
  image_metrics.check(config)
  checks.sizes(config, "eval.final_fid_steps")
  checks.boolean(config, "eval.final_nll")
  checks.integer(config, "eval.nll_images", 0)
  checks.number(config, "eval.nll_tolerance", above=0, below=1)
  checks.one_of(config, "eval.nll_dequantization", DEQUANTIZATIONS)
  checks.number(config, "eval.nll_sigma", above=0, below=1)
  checks.integer(config, "eval.nll_probes", 0)


def build(config, info) -> Setup:
  m = config.model
  h, w, _ = info.image_shape
  patch = m.get("patch", 1)  # runs saved before model.patch have none
  down = patch * 2 ** (len(m.channels) - 1)
  if h % down or w % down:
    raise ConfigError(f"model.channels={tuple(m.channels)} with model.patch={patch}: "
                      f"{len(m.channels) - 1} halvings of {patch}x{patch} patches need H and W "
                      f"divisible by {down}, got {h}x{w}; use fewer levels or a smaller patch")
  if m.conditional and not info.num_classes:
    raise ConfigError(f"model.conditional=True needs labels; dataset {info.name} has none")
  net = unet.UNet(tuple(m.channels), m.blocks, m.attention,
                  info.num_classes if m.conditional else 0,
                  conv.conv_impl(m.get("conv", "auto"), (h // patch, w // patch)),
                  *layers.dtypes(m), patch=patch)
  return Setup(config, info, net, optim.build(config.optim, config.train.num_steps),
               optim.schedule(config.optim, config.train.num_steps),
               sharding.make_mesh(config.mesh))


def init(setup: Setup, rng) -> dict:
  y = jnp.zeros((1,), jnp.int32) if setup.config.model.conditional else None
  params = setup.net.init(rng, jnp.zeros((1, *setup.info.image_shape)), jnp.zeros((1,)),
                          y)["params"]
  return {"params": params, "opt_state": optim.init(setup.tx, params, setup.config.train),
          "ema": jax.tree.map(jnp.copy, params)}


def learning_rates(setup: Setup, step: int) -> dict:
  return {"lr": setup.schedule(step)}


# ---- Maths: preconditioning, losses, the ODE's drift

def edm_preconditioning(sigma):
  """EDM's (c_skip, c_out, c_in, c_noise) for noise levels sigma (any shape)."""
  total = sigma**2 + SIGMA_DATA**2
  return (SIGMA_DATA**2 / total, sigma * SIGMA_DATA / jnp.sqrt(total), 1.0 / jnp.sqrt(total),
          jnp.log(sigma) / 4.0)


def denoise(net_fn, x, sigma, y):
  """EDM's D(x; sigma) for x [B, H, W, C], sigma [B]: c_skip x + c_out F(c_in x, c_noise)."""
  c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma)
  pixel = lambda c: c[:, None, None, None]
  return pixel(c_skip) * x + pixel(c_out) * net_fn(pixel(c_in) * x, c_noise, y)


def drop_labels(setup: Setup, y, rng):
  """Labels [B] -> the null class L with probability model.label_dropout (or None)."""
  m = setup.config.model
  if not m.conditional:
    return None
  drop = jax.random.bernoulli(rng, m.label_dropout, y.shape)
  return jnp.where(drop, setup.info.num_classes, y)


def losses(setup: Setup, params, x, y, rng):
  """Per image [B]: the objective's weighted squared error, mean over pixels."""
  c = setup.config.loss
  b = x.shape[0]
  rng_level, rng_noise = jax.random.split(rng)
  n = jax.random.normal(rng_noise, x.shape)
  net_fn = lambda x, level, y: setup.net.apply({"params": params}, x, level, y)
  per_pixel = lambda e: jnp.mean(e.reshape(b, -1), -1)
  if c.kind == "edm":
    sigma = training_sigmas(setup, rng_level, b)
    weight = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
    d = denoise(net_fn, x + sigma[:, None, None, None] * n, sigma, y)
    return weight * per_pixel((d - x) ** 2)
  u = jax.random.normal(rng_level, (b,))
  t = jax.nn.sigmoid(u) if c.time_sampling == "logit_normal" else jax.random.uniform(rng_level, (b,))
  tt = t[:, None, None, None]
  v = net_fn((1 - tt) * n + tt * x, t, y)
  return per_pixel((v - (x - n)) ** 2)


def training_sigmas(setup: Setup, rng, b: int):
  """EDM's training noise levels [b]: ln sigma ~ N(loss.p_mean, loss.p_std^2) (EDM's
  choice, for samples), or uniform between ln sample.sigma_min and ln sigma_max (for
  likelihood: with EDM's weight, 1 / sigma^2 + 1 / sigma_data^2, the loss is then the
  ELBO's weighting of the noise levels plus a plain denoising term, so the low noise
  that the bits/dim integrate is trained as much as the rest)."""
  c, s = setup.config.loss, setup.config.sample
  if c.get("sigma_sampling", "lognormal") == "log_uniform":
    return jnp.exp(jax.random.uniform(rng, (b,), minval=math.log(s.sigma_min),
                                      maxval=math.log(s.sigma_max)))
  return jnp.exp(c.p_mean + c.p_std * jax.random.normal(rng, (b,)))


def drift(setup: Setup, params, y, guidance: float):
  """The ODE's f(x [B, H, W, C], tau scalar) -> dx/dtau (EDM: tau = sigma > 0; flow: t),
  guided between the null label and y [B] when guidance != 1."""
  net_fn = lambda x, level, y: setup.net.apply({"params": params}, x, level, y)
  edm = setup.config.loss.kind == "edm"

  def f(x, tau, y):
    level = jnp.full((x.shape[0],), tau)
    return (x - denoise(net_fn, x, level, y)) / tau if edm else net_fn(x, level, y)

  def guided(x, tau):
    if y is None or guidance == 1:
      return f(x, tau, y)
    null = jnp.full_like(y, setup.info.num_classes)
    if guidance == 0:
      return f(x, tau, null)
    both = f(jnp.concatenate([x, x]), tau, jnp.concatenate([y, null]))  # one pass for both
    cond, uncond = jnp.split(both, 2)
    return uncond + guidance * (cond - uncond)
  return guided


def sample_grid(kind: str, steps, sample_cfg, length: int | None = None):
  """The N + 1 values of tau a sampler visits: EDM's sigmas (N of them, then 0) or
  the flow's t = 0, 1/N, ..., 1 (float32 [length]). N = steps may be traced when the
  static `length` >= N + 1 is given; the grid holds its last value from N on."""
  i = jnp.arange(steps + 1 if length is None else length)
  if kind == "flow":
    return jnp.minimum(i, steps) / steps
  s = sample_cfg
  lo, hi = s.sigma_min ** (1 / s.rho), s.sigma_max ** (1 / s.rho)
  sigmas = (hi + i / jnp.maximum(steps - 1, 1) * (lo - hi)) ** s.rho
  return jnp.where(i < steps, sigmas, 0.0)


def solve(f, noise, grid, rng, sampler: str, edm: bool, churn: float = 0.0, steps=None):
  """Integrates dx/dtau = f(x, tau) along grid [N + 1] from noise [B, ...] (scaled by
  grid[0] for EDM, whose start is N(0, sigma_max^2)) -> x at grid[N]. steps: N, which
  may be traced, with the grid padded past it (default: the grid's length - 1)."""
  steps = grid.shape[0] - 1 if steps is None else steps
  gamma = jnp.minimum(churn / steps, math.sqrt(2.0) - 1.0)

  def step(i, x):
    tau, nxt = grid[i], grid[i + 1]
    if churn:  # EDM's churn: raise sigma by a factor 1 + gamma with fresh noise first
      hat = tau * (1 + gamma)
      eps = jax.random.normal(jax.random.fold_in(rng, i), x.shape)
      x, tau = x + jnp.sqrt(hat**2 - tau**2) * eps, hat
    d = f(x, tau)
    euler = x + (nxt - tau) * d
    if sampler == "euler":
      return euler
    # Heun: the mean of the slopes at both ends; into sigma = 0 EDM takes Euler's step.
    last = jnp.logical_and(edm, nxt == 0)
    d2 = f(euler, jnp.where(last, 1.0, nxt))
    return jnp.where(last, euler, x + (nxt - tau) * 0.5 * (d + d2))

  return jax.lax.fori_loop(0, steps, step, noise * grid[0] if edm else noise)


def log_likelihood(kind: str, f, x, sample_cfg, rng, tolerance: float,
                   sigma: float | None = None, probes: int = 1):
  """log p_sigma(x) [B] in nats: the density at x [B, ...] of the model's data blurred by
  N(0, sigma^2) noise, from its probability-flow ODE dx/dtau = f(x, tau). sigma None:
  EDM's sample.sigma_min, the flow's t = 1 (no noise); else EDM starts at sigma and the
  flow at t = 1 / (1 + sigma), where x_t / t is the data plus noise of sd sigma.

  Integrates x and -d log p / dtau = div f to the noise end, where the density is
  Gaussian: N(0, sigma_max^2) for EDM, N(0, 1) for the flow. The divergence is
  Hutchinson's estimate averaged over `probes` Rademacher vectors per image, held over
  the path (unbiased; more probes, less spread), or exact with probes=0 (one pullback
  per dimension: for small images). diffrax's Tsit5 with relative and absolute
  tolerance `tolerance` picks the steps.
  """
  b, dims = x.shape[0], math.prod(x.shape[1:])
  if probes:
    eps = jax.random.rademacher(rng, (probes, *x.shape), dtype=x.dtype)
  else:  # every basis vector: the trace exactly
    eps = jnp.eye(dims, dtype=x.dtype)[:, None, :].repeat(b, 1).reshape(dims, *x.shape)
  per_image = lambda v: jnp.sum(v.reshape(b, -1), -1)
  scale = 1.0
  if kind == "edm":  # in s = ln sigma, where EDM's path is smooth: dx/ds = sigma f
    g, start, stop, prior_std = (lambda x, s: jnp.exp(s) * f(x, jnp.exp(s)),
                                 math.log(sample_cfg.sigma_min if sigma is None else sigma),
                                 math.log(sample_cfg.sigma_max), sample_cfg.sigma_max)
  else:
    scale = 1.0 if sigma is None else 1.0 / (1.0 + sigma)
    g, start, stop, prior_std = f, scale, 0.0, 1.0

  def term(tau, state, args):  # eps^T J through a VJP: the layers define only those
    dx, pullback = jax.vjp(lambda x: g(x, tau), state[0])
    trace = jax.vmap(lambda e: per_image(pullback(e)[0] * e))(eps)
    return dx, jnp.sum(trace, 0) if not probes else jnp.mean(trace, 0)

  solution = diffrax.diffeqsolve(
      diffrax.ODETerm(term), diffrax.Tsit5(), start, stop, None, (scale * x, jnp.zeros(b)),
      stepsize_controller=diffrax.PIDController(rtol=tolerance, atol=tolerance),
      max_steps=4096)
  noise, divergence = (v[-1] for v in solution.ys)
  prior = (-0.5 * per_image(noise**2) / prior_std**2
           - dims * (math.log(prior_std) + 0.5 * math.log(2 * math.pi)))
  return prior + divergence + dims * math.log(scale)  # the flow: x_t = t x's Jacobian


def sample(setup: Setup, params, noise, y, rng, steps, guidance: float,
           max_steps: int | None = None):
  """Images [B, H, W, C] in [-1, 1] from noise [B, H, W, C] with the config's sampler at
  `steps`, which may be traced where a static max_steps bounds it (one program for
  every step count up to it)."""
  kind, s = setup.config.loss.kind, setup.config.sample
  grid = sample_grid(kind, steps, s, None if max_steps is None else max_steps + 1)
  x = solve(drift(setup, params, y, guidance), noise, grid, rng, s.sampler, kind == "edm",
            s.churn, steps)
  return jnp.clip(x, -1.0, 1.0)


# ---- Training

def inputs(setup: Setup, batch):
  """uint8 levels -> x in [-1, 1] [B, H, W, C]; labels [B] or None."""
  x = image_metrics.scale(batch["image"], setup.info.num_levels)
  return x, batch["label"] if setup.config.model.conditional else None


def dequantize(x, num_levels: int, rng):
  """x [B, ...] on the levels' grid in [-1, 1] plus uniform noise over each level's bin
  (width 2 / (L - 1)): a continuous point whose density, times the bin's volume,
  bounds the level's probability from below."""
  width = 2.0 / (num_levels - 1)
  return x + (jax.random.uniform(rng, x.shape) - 0.5) * width


def train_step(setup: Setup, state: dict, batch: dict, rng):
  def loss_fn(params, batch, rng):
    x, y = inputs(setup, batch)
    if setup.config.loss.dequantize:  # fold_in: the other draws stay as without it
      x = dequantize(x, setup.info.num_levels, jax.random.fold_in(rng, 3))
    rng_drop, rng_loss = jax.random.split(rng)
    loss = jnp.mean(losses(setup, params, x, drop_labels(setup, y, rng_drop), rng_loss))
    return loss, {"loss": loss}

  new, step_metrics = optim.update(setup.tx, state, loss_fn, batch, rng, setup.config.train,
                                   setup.mesh)
  new["ema"] = tasks.ema_update(state["ema"], new["params"], setup.config.loss.ema_decay)
  return new, step_metrics


def net_macs(setup: Setup) -> int:
  """Multiply-adds of one U-Net pass on one image (convs and dense layers; attention's
  score matmuls included, norms and activations not)."""
  m, (h, w, c) = setup.config.model, setup.info.image_shape
  p = setup.net.patch
  h, w, c = h // p, w // p, c * p * p  # the levels run on p x p patches
  conv3 = lambda hw, cin, cout: hw * 9 * cin * cout
  width = 4 * m.channels[0]
  macs = m.channels[0] // 2 * 2 * width + width * width   # the level embedding's MLP
  hw, d, skips = h * w, m.channels[0], []

  def block(hw, cin, cout):
    return conv3(hw, cin, cout) + conv3(hw, cout, cout) + width * cout + (
        hw * cin * cout if cin != cout else 0)

  macs += conv3(hw, c, d)
  skips.append(d)
  for i, ch in enumerate(m.channels):
    for _ in range(m.blocks):
      macs, d = macs + block(hw, d, ch), ch
      skips.append(d)
    if i < len(m.channels) - 1:
      hw //= 4
      macs += conv3(hw, d, d)
      skips.append(d)
  macs += 2 * block(hw, d, d)
  if m.attention:
    macs += 4 * hw * d * d + 2 * hw * hw * d
  for i, ch in reversed(list(enumerate(m.channels))):
    for _ in range(m.blocks + 1):
      macs, d = macs + block(hw, d + skips.pop(), ch), ch
    if i > 0:
      hw *= 4
      macs += conv3(hw, d, d)
  return macs + conv3(hw, d, c)


def train_flops(setup: Setup) -> float:
  """FLOPs of one training image: one U-Net pass, forward and backward (~3x forward)."""
  return 3 * 2 * net_macs(setup)


# ---- Evaluation and samples

def draw(setup: Setup, guidance: float, max_steps: int):
  """draw(params, rng, labels [n] or None, steps, n) -> images [n, H, W, C] in [-1, 1]
  with the config's sampler at any `steps` up to max_steps, guided by `guidance`,
  compiled once for each n (setup.cache)."""
  key = ("draw", setup.config.sample.sampler, guidance, max_steps)
  if key not in setup.cache:
    def fn(params, rng, y, steps, n):
      z = jax.random.normal(rng, (n, *setup.info.image_shape))
      return sample(setup, params, z, y, jax.random.fold_in(rng, 1), steps, guidance,
                    max_steps)
    setup.cache[key] = jax.jit(fn, static_argnums=4)
  return setup.cache[key]


def generate_images(setup: Setup, params, n: int, rng, steps: int):
  """n images [n, H, W, C] in [-1, 1] (NumPy) with the config's sampler at `steps`,
  balanced over classes if conditional (image_metrics.generate). Every step count of
  the config (sample.steps, eval.final_fid_steps) runs one compiled program."""
  c = setup.config
  labels = image_metrics.balanced_labels(n, setup.info.num_classes if c.model.conditional
                                         else None)
  fn = draw(setup, c.sample.guidance, max(steps, c.sample.steps, *c.eval.final_fid_steps))
  return image_metrics.generate(lambda rng, y, m: fn(params, rng, y, steps, m), n, rng, labels)


def levels_log_likelihood(kind: str, f, x, num_levels: int, sample_cfg, rng, tolerance: float,
                          dequantization: str = "uniform", sigma: float = 0.0,
                          probes: int = 1):
  """A lower bound on log P(levels) [B] in nats of test images x [B, ...] on the levels'
  grid in [-1, 1] (num_levels of them, bins 2 / (num_levels - 1) wide):

    uniform   log p(x + u) + dims log(bin width), u uniform over the bin: the ODE from
              EDM's sigma_min (the flow's t = 1);
    gaussian  log p_sigma(z) - log q(z | x) + log P(x | z) at z = x + sigma eps (Kingma
              et al. 2021): the ODE's density of data blurred by N(0, sigma^2), started at
              sigma (the lowest noise levels, where a denoiser is least exact, are not
              integrated); q = N(x, sigma^2); P(x | z) reads each pixel's level back from
              z, a softmax over the levels of -(z - level)^2 / (2 sigma^2).

  Both hold for any model. The gaussian one is tight where the model's blurred density
  is right and the decoder is the levels' posterior given z (sigma small against a bin,
  or the levels' probabilities even over a few sigma); the uniform one only for a
  density flat inside each bin (a model of the levels' sharp peaks scores far worse).
  """
  dims = math.prod(x.shape[1:])
  per_image = lambda v: jnp.sum(v.reshape(x.shape[0], -1), -1)
  rng_noise, rng_probe = jax.random.split(rng)
  if dequantization == "uniform":
    width = 2.0 / (num_levels - 1)
    return (log_likelihood(kind, f, dequantize(x, num_levels, rng_noise), sample_cfg,
                           rng_probe, tolerance, probes=probes) + dims * math.log(width))
  eps = jax.random.normal(rng_noise, x.shape)
  z = x + sigma * eps
  log_p = log_likelihood(kind, f, z, sample_cfg, rng_probe, tolerance, sigma, probes)
  log_q = per_image(-0.5 * eps**2) - dims * math.log(sigma * math.sqrt(2 * math.pi))
  levels = jnp.linspace(-1.0, 1.0, num_levels).reshape((1,) * z.ndim + (num_levels,))
  logits = -0.5 * ((z[..., None] - levels) / sigma) ** 2
  log_decoder = per_image(-0.5 * eps**2 - jax.nn.logsumexp(logits, -1))  # own level's logit
  return log_p - log_q + log_decoder


def bits_per_dim(setup: Setup, params, test: dict, rng) -> np.ndarray:
  """Per test image [eval.nll_images or all]: -log P(levels) / (dims ln 2), an upper
  bound through levels_log_likelihood with the config's eval.nll_dequantization,
  eval.nll_sigma and eval.nll_probes, in eval.batch_size chunks (the last padded; one
  compilation)."""
  c, info = setup.config, setup.info
  n = c.eval.nll_images or len(test["image"])
  dims = math.prod(info.image_shape)
  if "nll" not in setup.cache:
    def nll(params, images, labels, rng):
      x = image_metrics.scale(images, info.num_levels)
      log_p = levels_log_likelihood(
          c.loss.kind, drift(setup, params, labels, 1.0), x, info.num_levels, c.sample, rng,
          c.eval.nll_tolerance, c.eval.get("nll_dequantization", "uniform"),
          c.eval.get("nll_sigma", 0.0), c.eval.get("nll_probes", 1))
      return -log_p / (dims * math.log(2))
    setup.cache["nll"] = jax.jit(nll)
  chunk, outs = c.eval.batch_size, []
  for start in range(0, n, chunk):
    rows = np.arange(start, start + chunk) % n  # the last chunk wraps round; cut below
    labels = test["label"][rows] if c.model.conditional else None
    outs.append(setup.cache["nll"](params, test["image"][rows], labels,
                                   jax.random.fold_in(rng, start)))
  return np.concatenate(jax.device_get(outs)).astype(np.float64)[:n]


def evaluate(setup: Setup, state: dict, test: dict, rng, final: bool,
             parts: evaluation.Parts | None = None) -> dict:
  """The image metrics of EMA samples at sample.steps (over eval.final_fid_draws sets of
  samples at the end), with FID's floor; at the final evaluation also FID of one set
  at each of eval.final_fid_steps (`fid_steps<N>`) and,
  with eval.final_nll, the test bits/dim through the ODE (`nll_bpd`, with the standard
  error of its mean over images, `nll_bpd_sem`). Each of those is one of `parts`."""
  c, parts = setup.config, parts or evaluation.Parts()
  n = (c.eval.final_fid_samples if final else c.eval.fid_samples) or setup.info.num_test
  train, _, _ = datasets(c, "")
  ref = image_metrics.reference(c, train, test, setup.info, n, setup.cache)
  ema = sharding.host_copy(state["ema"])  # every process scores the whole set itself
  values = dict(parts("draws", lambda: image_metrics.scores_over_draws(
      ref, lambda r: generate_images(setup, ema, n, r, c.sample.steps), rng,
      c.eval.final_fid_draws if final else 1)))

  def fid_at(steps):
    images = generate_images(setup, ema, n, rng, steps)
    return {f"fid_steps{steps}": image_metrics.fid(ref["features"](images)[0], ref["real"])}

  def nll():
    bpd = bits_per_dim(setup, ema, test, jax.random.fold_in(rng, 2))
    return {"nll_bpd": bpd.mean(), "nll_bpd_sem": bpd.std() / math.sqrt(len(bpd))}

  for steps in (c.eval.final_fid_steps if final else ()):
    values.update(parts(f"fid_steps{steps}", lambda: fid_at(steps)))
  if final and c.eval.final_nll:
    values.update(parts("nll", nll))
  return values


def samples(setup: Setup, state: dict, batch: dict, rng) -> dict:
  """EMA samples on fixed noise: a grid [rows, cols, H, W, C] in [0, 1], a row per class
  for conditional models."""
  del batch  # sampling needs no test images
  s, cols = setup.config.sample, 8
  rows = setup.info.num_classes if setup.config.model.conditional else 8
  z = jax.random.normal(rng, (rows * cols, *setup.info.image_shape))
  y = jnp.repeat(jnp.arange(rows), cols) if setup.config.model.conditional else None
  x = sample(setup, state["ema"], z, y, rng, s.steps, s.guidance)
  return {"samples": ((x + 1) / 2).reshape(rows, cols, *setup.info.image_shape)}


def write_samples(setup: Setup, grids: dict, writer, step: int) -> None:
  writer.image_grids(step, grids)


def generate(setup: Setup, state: dict, args) -> None:
  """`genflax.sample`: args.num EMA samples, a PNG grid or an .npz of arrays
  (image_metrics.save_samples); --steps and --guidance override the config's sampler."""
  s, conditional = setup.config.sample, setup.config.model.conditional
  guidance = s.guidance if args.guidance is None else args.guidance
  if guidance != 1 and not conditional:
    raise ConfigError(f"--guidance={guidance}: guidance needs a conditional model")
  steps = args.steps or s.steps
  fn = draw(setup, guidance, steps)
  image_metrics.save_samples(args, setup.info, conditional,
                             lambda rng, y, n: fn(state["ema"], rng, y, steps, n))
