"""GAN family: MLP GAN, DCGAN and class-conditional GAN, with a stability toolbox.

Shapes: B batch, H W C image, Z noise size, L number of classes, F width of
D's last hidden layer.

One `train_step` makes `loss.n_critic` D updates, then one G update, each
with its own optimizer and learning rate (TTUR), then moves the EMA copy of
G that evaluation and samples use. Losses (`loss.kind`): non-saturating
("ns"), "hinge", Wasserstein ("wgan", with `loss.gp_weight` for WGAN-GP).
R1 (`loss.r1_gamma`) penalises D's gradient on real images every
`loss.r1_every` steps, scaled up by the interval (lazy R1, StyleGAN2).

Spectral normalisation (`model.spectral_norm`) uses flax's `nn.SpectralNorm`,
whose power-iteration vectors live in a mutable collection. The state
carries that collection as `state["sn"]`: it is as much training state as
Adam's moments, so keeping it saved makes a resumed run repeat an
uninterrupted one bitwise, and the maths stays flax's tested code. Only D
steps advance the power iteration; G steps and penalties read it.

Pixels are uint8 levels scaled to [-1, 1], the range of G's tanh.
Conditional models feed G's fakes the labels of the real batch, so fake
labels follow the data's class frequencies.
"""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from genflax import checks, data, evaluation, optim, sharding, tasks
from genflax.errors import ConfigError
from genflax.models import conv, layers
from genflax.tasks import image_metrics

ARCHS = ("mlp", "dcgan")
# The step sums its D and G gradients with XLA's per-parameter all-reduces.
GRAD_ALLREDUCES = ("per_param",)
LOSSES = ("ns", "hinge", "wgan")
CONDITIONINGS = ("projection", "concat")
G_NORMS = ("none", "batch")


# ---- Modules

class Generator(nn.Module):
  arch: str
  hidden: tuple[int, ...]
  channels: tuple[int, ...]  # dcgan: width at the smallest size, then per upsampling
  image_shape: tuple[int, int, int]
  num_classes: int           # 0: unconditional
  dtype: jnp.dtype = jnp.float32        # compute (mixed precision: genflax/models/layers.py)
  param_dtype: jnp.dtype = jnp.float32
  conv: str = "xla"                     # xla | matmul | ... (genflax/models/conv.py)
  norm: str = "none"                    # none | batch: after every layer but the last

  @nn.compact
  def __call__(self, z, y=None):
    """z [B, Z], y [B] int labels or None -> images [B, H, W, C] in [-1, 1] (float32)."""
    b = z.shape[0]
    h_img, w_img, c_img = self.image_shape
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = self.norm == "batch"
    # Batch norm's own shift replaces the layer's bias, which it would cancel (leaving
    # Adam a gradient of rounding noise to follow).
    hidden = dict(use_bias=not norm, **dtypes)
    act = lambda h: nn.relu(layers.BatchNorm(**dtypes)(h) if norm else h)
    dense = functools.partial(nn.Dense, dot_general=conv.dense_dot_general(self.conv))
    h = z.astype(self.dtype)
    if y is not None:
      h = jnp.concatenate([h, nn.Embed(self.num_classes, z.shape[-1], **dtypes)(y)], -1)  # [B, 2Z]
    for width in self.hidden:
      h = act(dense(width, **hidden)(h))
    if self.arch == "dcgan":
      s = 2 ** len(self.channels)  # one stride-2 transposed conv per entry
      h = act(dense(h_img // s * w_img // s * self.channels[0], **hidden)(h))
      h = h.reshape(b, h_img // s, w_img // s, self.channels[0])
      for ch in self.channels[1:]:
        h = act(conv.ConvTranspose(ch, (4, 4), 2, impl=self.conv, **hidden)(h))  # doubles H, W
      h = conv.ConvTranspose(c_img, (4, 4), 2, impl=self.conv, **dtypes)(h)          # [B, H, W, C]
    else:
      h = dense(h_img * w_img * c_img, **dtypes)(h).reshape(b, h_img, w_img, c_img)
    return jnp.tanh(h.astype(jnp.float32))


class Discriminator(nn.Module):
  arch: str
  hidden: tuple[int, ...]
  channels: tuple[int, ...]  # dcgan: one stride-2 conv per entry
  num_classes: int           # 0: unconditional
  conditioning: str          # projection | concat
  spectral_norm: bool
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  conv: str = "xla"
  minibatch_std: bool = False  # the batch's feature std as one more channel, before the dense layers

  @nn.compact
  def __call__(self, x, y=None, update_stats: bool = False):
    """x [B, H, W, C] in [-1, 1], y [B] int labels or None -> logits [B] (float32)."""
    def layer(module, h):
      if self.spectral_norm:  # the power iteration in float32 (nn.SpectralNorm's dtype)
        return nn.SpectralNorm(module, dtype=jnp.float32)(h, update_stats=update_stats)
      return module(h)

    b, h_img, w_img, _ = x.shape
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dense = functools.partial(nn.Dense, dot_general=conv.dense_dot_general(self.conv))
    h = x.astype(self.dtype)
    if y is not None and self.conditioning == "concat":  # labels as constant channels
      planes = jax.nn.one_hot(y, self.num_classes, dtype=self.dtype)[:, None, None, :]
      h = jnp.concatenate([h, jnp.broadcast_to(planes, (b, h_img, w_img, self.num_classes))], -1)
    if self.arch == "dcgan":
      for ch in self.channels:
        h = nn.leaky_relu(layer(conv.Conv(ch, (4, 4), 2, impl=self.conv, **dtypes), h), 0.2)  # halves H, W
    if self.minibatch_std:
      h = layers.minibatch_std(h)
    h = h.reshape(b, -1)
    for width in self.hidden:
      h = nn.leaky_relu(layer(dense(width, **dtypes), h), 0.2)                     # [B, F]
    out = layer(dense(1, **dtypes), h)[:, 0].astype(jnp.float32)
    if y is not None and self.conditioning == "projection":  # Miyato & Koyama 2018
      embed = nn.Embed(self.num_classes, h.shape[-1], **dtypes)(y)
      out = out + jnp.sum((embed * h).astype(jnp.float32), -1)
    return out


# ---- Setup and state

@dataclasses.dataclass(frozen=True)
class Setup:
  config: object
  info: object
  g: Generator
  d: Discriminator
  tx_g: optax.GradientTransformation
  tx_d: optax.GradientTransformation
  lr_g: optax.Schedule
  lr_d: optax.Schedule  # in D updates: n_critic per train step
  # Evaluation's compiled parts and reference statistics, made on first use.
  cache: dict = dataclasses.field(default_factory=dict, hash=False, compare=False)


def datasets(config, workdir: str):
  del workdir  # images need nothing saved with the run
  # .get: a workdir's config.json from before data.idx_dir existed lacks it (genflax.sample)
  return data.load(config.data.name, config.data.data_dir or None,
                   config.data.get("idx_dir") or None)


def check(config) -> None:
  """The GAN's config values (genflax/checks.py has the shared ones)."""
  checks.one_of(config, "model.arch", ARCHS)
  checks.integer(config, "model.latent_dim", 1)
  for key in ("g_hidden", "d_hidden"):
    checks.sizes(config, f"model.{key}")
  for key in ("g_channels", "d_channels"):
    checks.sizes(config, f"model.{key}", nonempty=config.model.arch == "dcgan")
  checks.boolean(config, "model.conditional")
  checks.one_of(config, "model.conditioning", CONDITIONINGS)
  checks.boolean(config, "model.spectral_norm")
  checks.one_of(config, "model.conv", conv.CONVS)
  checks.one_of(config, "model.g_norm", G_NORMS)
  checks.boolean(config, "model.d_minibatch_std")
  checks.one_of(config, "loss.kind", LOSSES)
  checks.integer(config, "loss.n_critic", 1)
  checks.number(config, "loss.gp_weight", low=0)
  checks.number(config, "loss.r1_gamma", low=0)
  checks.integer(config, "loss.r1_every", 1)
  checks.number(config, "loss.ema_decay", low=0, below=1)
  image_metrics.check(config)
  if config.train.microbatches != 1:
    raise ConfigError(f"train.microbatches={config.train.microbatches}: the GAN step alternates "
                      "D and G updates on the whole batch; gradient accumulation is not "
                      "supported, use 1")
  if config.train.grad_allreduce not in ("auto", *GRAD_ALLREDUCES):
    raise ConfigError(f"train.grad_allreduce={config.train.grad_allreduce!r}: the GAN step "
                      "sums its D and G gradients with XLA's per-parameter all-reduces; "
                      "use per_param")


def build(config, info) -> Setup:
  m, loss = config.model, config.loss
  h, w, _ = info.image_shape
  for name, chans in (("model.g_channels", m.g_channels), ("model.d_channels", m.d_channels)):
    if m.arch == "dcgan" and (h % 2 ** len(chans) or w % 2 ** len(chans)):
      raise ConfigError(f"{name}={tuple(chans)}: {len(chans)} stride-2 layers need H and W "
                        f"divisible by {2 ** len(chans)}, got {h}x{w}")
  if m.conditional and not info.num_classes:
    raise ConfigError(f"model.conditional=True needs labels; dataset {info.name} has none")
  classes = info.num_classes if m.conditional else 0
  dtypes, impl = layers.dtypes(m), conv.conv_impl(m.get("conv", "auto"), info.image_shape[:2])
  # .get: a workdir's config.json from before g_norm and d_minibatch_std existed (genflax.sample)
  g = Generator(m.arch, tuple(m.g_hidden), tuple(m.g_channels), info.image_shape, classes,
                *dtypes, conv=impl, norm=m.get("g_norm", "none"))
  d = Discriminator(m.arch, tuple(m.d_hidden), tuple(m.d_channels), classes,
                    m.conditioning, m.spectral_norm, *dtypes, conv=impl,
                    minibatch_std=m.get("d_minibatch_std", False))
  steps, d_steps = config.train.num_steps, config.train.num_steps * loss.n_critic
  return Setup(config, info, g, d,
               optim.build(config.optim_g, steps), optim.build(config.optim_d, d_steps),
               optim.schedule(config.optim_g, steps), optim.schedule(config.optim_d, d_steps))


def init(setup: Setup, rng) -> dict:
  rng_g, rng_d = jax.random.split(rng)
  y = jnp.zeros((1,), jnp.int32) if setup.config.model.conditional else None
  g = setup.g.init(rng_g, jnp.zeros((1, setup.config.model.latent_dim)), y)["params"]
  d_vars = setup.d.init(rng_d, jnp.zeros((1, *setup.info.image_shape)), y)
  state = {"params": {"g": g, "d": d_vars["params"]},
           "opt_state": {"g": setup.tx_g.init(g), "d": setup.tx_d.init(d_vars["params"])},
           "ema_g": jax.tree.map(jnp.copy, g),
           "step": jnp.zeros((), jnp.int32)}  # G updates so far: the lazy R1 clock
  if setup.config.model.spectral_norm:
    state["sn"] = d_vars["batch_stats"]
  return state


def learning_rates(setup: Setup, step: int) -> dict:
  return {"lr_g": setup.lr_g(step), "lr_d": setup.lr_d(step * setup.config.loss.n_critic)}


# ---- Losses and penalties

def d_loss(kind: str, real, fake):
  """D's loss from logits on real and fake images, [B] each -> [B]."""
  if kind == "ns":
    return jax.nn.softplus(-real) + jax.nn.softplus(fake)
  if kind == "hinge":
    return jax.nn.relu(1.0 - real) + jax.nn.relu(1.0 + fake)
  return fake - real


def g_loss(kind: str, fake):
  """G's loss from D's logits on its images [B] -> [B]."""
  return jax.nn.softplus(-fake) if kind == "ns" else -fake


def input_grad_norms(d_fn, x):
  """|| dD(x_i)/dx_i ||_2 per image [B]: D scores images independently, so the
  gradient of the summed logits gives every image's own gradient."""
  grads = jax.grad(lambda x: jnp.sum(d_fn(x)))(x)
  return jnp.sqrt(jnp.sum(grads.reshape(grads.shape[0], -1) ** 2, -1) + 1e-12)


def gradient_penalty(d_fn, real, fake, rng):
  """WGAN-GP: E (||grad D(x_hat)|| - 1)^2 on random points between real and fake."""
  eps = jax.random.uniform(rng, (real.shape[0], 1, 1, 1))
  x_hat = eps * real + (1.0 - eps) * fake
  return jnp.mean((input_grad_norms(d_fn, x_hat) - 1.0) ** 2)


def r1_penalty(d_fn, real):
  """R1: E ||grad D(x)||^2 on real images (times gamma / 2 in the loss)."""
  return jnp.mean(input_grad_norms(d_fn, real) ** 2)


def apply_d(setup: Setup, params, sn, x, y, update: bool = False):
  """D's logits [B] and its spectral-norm state after the call (advanced if `update`)."""
  if sn is None:
    return setup.d.apply({"params": params}, x, y), None
  variables = {"params": params, "batch_stats": sn}
  if not update:
    return setup.d.apply(variables, x, y), sn
  out, new = setup.d.apply(variables, x, y, update_stats=True, mutable=["batch_stats"])
  return out, new["batch_stats"]


def noise(setup: Setup, rng, n: int):
  return jax.random.normal(rng, (n, setup.config.model.latent_dim))  # [n, Z]


# ---- Training

def inputs(setup: Setup, batch):
  """uint8 levels -> x in [-1, 1] [B, H, W, C]; labels [B] or None."""
  x = image_metrics.scale(batch["image"], setup.info.num_levels)
  return x, batch["label"] if setup.config.model.conditional else None


def d_update(setup: Setup, state: dict, carry, x, y, rng):
  """One D step on a real batch and fresh fakes: carry (params, opt_state, sn)."""
  loss_cfg = setup.config.loss
  params, opt_state, sn = carry
  rng_z, rng_gp = jax.random.split(rng)
  fake = setup.g.apply({"params": state["params"]["g"]}, noise(setup, rng_z, x.shape[0]), y)
  both_y = None if y is None else jnp.concatenate([y, y])

  def loss_fn(p):
    # Real and fake through D in one call: one power-iteration step per D step.
    logits, new_sn = apply_d(setup, p, sn, jnp.concatenate([x, fake]), both_y, update=True)
    real_logits, fake_logits = jnp.split(logits, 2)
    loss = jnp.mean(d_loss(loss_cfg.kind, real_logits, fake_logits))
    terms = {"d_loss": loss, "d_real": jnp.mean(real_logits), "d_fake": jnp.mean(fake_logits)}
    d_fn = lambda images: apply_d(setup, p, sn, images, y)[0]
    if loss_cfg.gp_weight:
      terms["gp"] = gradient_penalty(d_fn, x, fake, rng_gp)
      loss += loss_cfg.gp_weight * terms["gp"]
    if loss_cfg.r1_gamma:
      lazy = state["step"] % loss_cfg.r1_every == 0
      terms["r1"] = jax.lax.cond(lazy, lambda: r1_penalty(d_fn, x), lambda: jnp.zeros(()))
      loss += 0.5 * loss_cfg.r1_gamma * loss_cfg.r1_every * terms["r1"]
    return loss, (terms, new_sn)

  grads, (terms, sn) = jax.grad(loss_fn, has_aux=True)(params)
  updates, opt_state = setup.tx_d.update(grads, opt_state, params)
  terms["d_grad_norm"] = optax.tree.norm(grads)
  return (optax.apply_updates(params, updates), opt_state, sn), terms


def train_step(setup: Setup, state: dict, batch: dict, rng):
  loss_cfg = setup.config.loss
  x, y = inputs(setup, batch)
  rng_d, rng_g = jax.random.split(rng)

  # D: n_critic steps on the same real batch, each with new fakes.
  carry = (state["params"]["d"], state["opt_state"]["d"], state.get("sn"))
  carry, d_terms = jax.lax.scan(lambda c, r: d_update(setup, state, c, x, y, r), carry,
                                jax.random.split(rng_d, loss_cfg.n_critic))
  d_params, d_opt, sn = carry

  # G: one step against the updated D.
  z = noise(setup, rng_g, x.shape[0])

  def loss_fn(p):
    logits, _ = apply_d(setup, d_params, sn, setup.g.apply({"params": p}, z, y), y)
    return jnp.mean(g_loss(loss_cfg.kind, logits))

  g_params = state["params"]["g"]
  g_value, grads = jax.value_and_grad(loss_fn)(g_params)
  updates, g_opt = setup.tx_g.update(grads, state["opt_state"]["g"], g_params)
  g_params = optax.apply_updates(g_params, updates)
  ema = tasks.ema_update(state["ema_g"], g_params, loss_cfg.ema_decay)

  new = {"params": {"g": g_params, "d": d_params}, "opt_state": {"g": g_opt, "d": d_opt},
         "ema_g": ema, "step": state["step"] + 1}
  if sn is not None:
    new["sn"] = sn
  step_metrics = {k: v[-1] for k, v in d_terms.items()}  # the last critic step's
  step_metrics.update(g_loss=g_value, g_grad_norm=optax.tree.norm(grads))
  return new, step_metrics


def forward_macs(setup: Setup) -> tuple[int, int]:
  """Multiply-adds of one image through G and through D (dense and conv layers)."""
  m, (h, w, c) = setup.config.model, setup.info.image_shape
  classes = setup.info.num_classes if m.conditional else 0
  dense = lambda dims: sum(a * b for a, b in zip(dims[:-1], dims[1:]))
  z = m.latent_dim * (2 if classes else 1)
  if m.arch == "dcgan":
    s = 2 ** len(m.g_channels)
    g = dense([z, *m.g_hidden, h // s * w // s * m.g_channels[0]])
    size, cin = h // s * w // s, m.g_channels[0]
    for ch in [*m.g_channels[1:], c]:  # 4x4 transposed convs: each input pixel to a patch
      g, size, cin = g + size * 16 * cin * ch, size * 4, ch
    d, size, cin = 0, h * w, c + (classes if m.conditioning == "concat" else 0)
    for ch in m.d_channels:            # 4x4 stride-2 convs
      size //= 4
      d, cin = d + size * 16 * cin * ch, ch
    d += dense([size * (cin + m.get("d_minibatch_std", False)), *m.d_hidden, 1])
  else:
    g = dense([z, *m.g_hidden, h * w * c])
    cin = c + (classes if m.conditioning == "concat" else 0) + m.get("d_minibatch_std", False)
    d = dense([h * w * cin, *m.d_hidden, 1])
  return g, d


def train_flops(setup: Setup) -> float:
  """FLOPs per real image of one train step (backward ~ 2x forward).

  Each of the n_critic D steps makes fakes (G forward) and trains D on real
  and fake (3x D forward on two images); the G step trains through D and G
  (3x both). Gradient penalties (R1, GP) are not counted. Conv taps over
  SAME padding are counted, which XLA's count leaves out: on 8x8 images
  that is most of the gap between the two (benchmarks/README.md).
  """
  g, d = forward_macs(setup)
  return 2 * (setup.config.loss.n_critic * (g + 6 * d) + 3 * (g + d))


# ---- Evaluation and samples

def draw(setup: Setup):
  """draw(g_params, rng, labels [n] or None, n) -> images [n, H, W, C] in [-1, 1],
  compiled once per n (setup.cache)."""
  if "draw" not in setup.cache:
    setup.cache["draw"] = jax.jit(lambda g_params, rng, y, n: setup.g.apply(
        {"params": g_params}, noise(setup, rng, n), y), static_argnums=3)
  return setup.cache["draw"]


def generate_images(setup: Setup, g_params, n: int, rng):
  """n images [n, H, W, C] in [-1, 1] (NumPy), balanced over classes if conditional
  (image_metrics.generate)."""
  labels = image_metrics.balanced_labels(
      n, setup.info.num_classes if setup.config.model.conditional else None)
  # To the host: the feature network's parameters live on one device, G's may
  # be replicated over the training mesh.
  return image_metrics.generate(lambda rng, y, m: draw(setup)(g_params, rng, y, m), n, rng,
                                labels)


def evaluate(setup: Setup, state: dict, test: dict, rng, final: bool,
             parts: evaluation.Parts | None = None) -> dict:
  """The image metrics of the EMA generator against the test split (over
  eval.final_fid_draws sets of samples at the end, one of `parts`), with FID's floor
  (train vs test images) and its value at initialisation."""
  c, parts = setup.config, parts or evaluation.Parts()
  n = (c.eval.final_fid_samples if final else c.eval.fid_samples) or setup.info.num_test
  ref = reference(setup, test, n)
  # On the host first: every process scores the whole set on its own devices.
  g = sharding.host_copy(state["ema_g"])
  values = parts("draws", lambda: image_metrics.scores_over_draws(
      ref, lambda r: generate_images(setup, g, n, r), rng, c.eval.final_fid_draws if final else 1))
  return {**values, "fid_init": ref["fid_init"]}


def reference(setup: Setup, test: dict, n: int) -> dict:
  """image_metrics.reference for n images, and the FID of an untrained G of the
  run's own seed (`fid_init`), computed once per n."""
  key = ("reference", n)
  if key not in setup.cache:
    c = setup.config
    train, _, _ = datasets(c, "")
    ref = image_metrics.reference(c, train, test, setup.info, n, setup.cache)
    # The run's own start, compiled as the trainer compiles it (bit for bit).
    untrained = tasks.run_once(lambda rng: init(setup, rng)["ema_g"], tasks.run_keys(c.seed)[0])
    at_init = generate_images(setup, untrained, n, jax.random.PRNGKey(c.seed + 1))
    setup.cache[key] = {**ref, "fid_init": image_metrics.fid(ref["features"](at_init)[0],
                                                             ref["real"])}
  return setup.cache[key]


def samples(setup: Setup, state: dict, batch: dict, rng) -> dict:
  """EMA and raw G on one fixed noise batch: grids [rows, cols, H, W, C] in [0, 1],
  one row per class for conditional models."""
  del batch  # a GAN needs no test images to sample
  cols = 8
  rows = setup.info.num_classes if setup.config.model.conditional else 8
  z = noise(setup, rng, rows * cols)
  y = jnp.repeat(jnp.arange(rows), cols) if setup.config.model.conditional else None
  grid = lambda p: ((setup.g.apply({"params": p}, z, y) + 1.0) / 2.0).reshape(
      rows, cols, *setup.info.image_shape)
  return {"samples": grid(state["ema_g"]), "samples_raw_g": grid(state["params"]["g"])}


def write_samples(setup: Setup, grids: dict, writer, step: int) -> None:
  writer.image_grids(step, grids)


def generate(setup: Setup, state: dict, args) -> None:
  """`genflax.sample`: args.num EMA-generator samples, a PNG grid or an .npz of arrays
  (image_metrics.save_samples)."""
  image_metrics.save_samples(args, setup.info, setup.config.model.conditional,
                             lambda rng, y, n: draw(setup)(state["ema_g"], rng, y, n))
