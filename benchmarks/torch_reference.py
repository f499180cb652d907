"""The same image model's train step in PyTorch: `python -m benchmarks.torch_reference`.

    pip install torch --index-url https://download.pytorch.org/whl/cpu  # not a genflax dependency
    python -m benchmarks.torch_reference --config configs/vae_fashion.py:conv data.batch_size=256
    python -m benchmarks.torch_reference --config configs/dcgan_fashion.py data.batch_size=256
    python -m benchmarks.torch_reference --config configs/dcgan_fashion.py --dtype bfloat16 ...

Builds the network a genflax config describes (the conv VAE with its
discretised-Gaussian ELBO; the DCGAN with one D step on real and fake in one
batch, then one G step, non-saturating loss, EMA of G), as PyTorch users
write it (eager, NCHW, torch.nn layers, Adam), and times its train step on
random inputs of the config's batch size. FLOPs per step are genflax's
analytic count for the config (`task.train_flops`), so the MFU here and in
`benchmarks.hot_loop` divide the same work; the peak is the best 1024^2 /
2048^2 float32 matmul of PyTorch's and of JAX's, measured before and after
the steps (PyTorch's was the slower one on our AVX-512 machine, with
larger swings between runs). Only the shapes follow the config: padding is
PyTorch's symmetric one (the same output sizes and FLOPs as Flax's SAME).
tests/test_benchmarks.py checks that the networks have genflax's parameters,
size for size.
"""
import argparse
import json
import statistics
import time

import torch
from torch import nn
import torch.nn.functional as F

from benchmarks import hot_loop
from genflax import errors, trainer
from genflax.data import catalogue

# The image shape, classes and levels of the datasets the image configs read.
INFOS = {name: catalogue.DatasetInfo(name, shape, 10, levels, train, test)
         for name, shape, levels, train, test in (
             ("fashion_mnist", (28, 28, 1), 256, 60000, 10000),
             ("idx", (28, 28, 1), 256, 60000, 10000),
             ("digits", (8, 8, 1), 17, 1437, 360))}


def gelu(x):
  return F.gelu(x, approximate="tanh")  # flax's nn.gelu


class ConvVAE(nn.Module):
  """genflax.tasks.vae's conv encoder and decoder (3x3 stride-2 convs, GELU)."""

  def __init__(self, m, image_shape):
    super().__init__()
    h, w, c = image_shape
    self.size = (h // 2 ** len(m.channels), w // 2 ** len(m.channels))
    chans = [c, *m.channels]
    self.enc_convs = nn.ModuleList(nn.Conv2d(a, b, 3, 2, 1) for a, b in zip(chans, chans[1:]))
    flat = m.channels[-1] * self.size[0] * self.size[1]
    dims = [flat, *m.hidden]
    self.enc_dense = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
    self.mu, self.logvar = nn.Linear(m.hidden[-1], m.latent_dim), nn.Linear(m.hidden[-1], m.latent_dim)
    dims = [m.latent_dim, *reversed(m.hidden), flat]
    self.dec_dense = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
    chans = [m.channels[-1], *reversed(m.channels)]
    self.dec_convs = nn.ModuleList(nn.ConvTranspose2d(a, b, 3, 2, 1, output_padding=1)
                                   for a, b in zip(chans, chans[1:]))
    self.out = nn.Conv2d(m.channels[0], 2 * c, 3, 1, 1)  # mean and log-scale per pixel

  def forward(self, x):
    h = x
    for layer in self.enc_convs:
      h = gelu(layer(h))
    h = h.flatten(1)
    for layer in self.enc_dense:
      h = gelu(layer(h))
    mu, logvar = self.mu(h), self.logvar(h)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    for layer in self.dec_dense:
      z = gelu(layer(z))
    h = z.reshape(x.shape[0], -1, *self.size)
    for layer in self.dec_convs:
      h = gelu(layer(h))
    mean, log_scale = self.out(h).chunk(2, dim=1)
    return mu, logvar, mean, log_scale


def discretized_gaussian_log_prob(x, mean, log_scale, num_levels: int):
  """genflax.tasks.vae.discretized_gaussian_log_prob."""
  half_bin = 0.5 / (num_levels - 1)
  inv_scale = torch.exp(-log_scale.clamp(-7.0, 7.0))
  upper, lower = (x + half_bin - mean) * inv_scale, (x - half_bin - mean) * inv_scale
  first, last = x < half_bin, x > 1 - half_bin
  flip = ~first & (last | (lower > 0))
  hi, lo = torch.where(flip, -lower, upper), torch.where(flip, -upper, lower)
  log_hi = torch.special.log_ndtr(hi)
  mid = log_hi + torch.log1p(-torch.exp(torch.clamp_max(torch.special.log_ndtr(lo) - log_hi, -1e-6)))
  return torch.where(first | last, log_hi, mid)


def vae_step(config, info, layout):
  """([the networks], a train step -> (its loss,)) of the conv VAE `config` describes."""
  model = ConvVAE(config.model, info.image_shape).to(memory_format=layout)
  opt = torch.optim.Adam(model.parameters(), lr=config.optim.lr)
  b, (h, w, c) = config.data.batch_size, info.image_shape
  x = torch.randint(0, info.num_levels, (b, c, h, w)).float() / (info.num_levels - 1)
  x = x.contiguous(memory_format=layout)

  def step():
    mu, logvar, mean, log_scale = model(x)
    rec = -discretized_gaussian_log_prob(x, mean, log_scale, info.num_levels).sum((1, 2, 3))
    kl = 0.5 * (torch.exp(logvar) + mu**2 - 1.0 - logvar).sum(-1)
    loss = (rec + kl).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return (loss.detach(),)
  return [model], step


class Generator(nn.Module):
  """genflax.tasks.gan's DCGAN generator: dense layers (`g_hidden`), a dense layer
  to the smallest feature map, 4x4 stride-2 transposed convs, ReLU, tanh; with
  `g_norm=batch`, batch norm (the batch's statistics) after every layer but the
  last, which then has no bias."""

  def __init__(self, m, image_shape):
    super().__init__()
    h, w, c = image_shape
    norm = m.get("g_norm", "none") == "batch"
    self.size = (h // 2 ** len(m.g_channels), w // 2 ** len(m.g_channels))
    widths = [m.latent_dim, *m.g_hidden, m.g_channels[0] * self.size[0] * self.size[1]]
    self.dense = nn.ModuleList(nn.Linear(a, b, bias=not norm) for a, b in zip(widths, widths[1:]))
    chans = [*m.g_channels, c]
    self.convs = nn.ModuleList(nn.ConvTranspose2d(a, b, 4, 2, 1, bias=not norm or b == c)
                               for a, b in zip(chans, chans[1:]))
    # Per feature after the dense layers (before the reshape), per channel after the convs.
    self.norms = nn.ModuleList([nn.BatchNorm1d(n, track_running_stats=False) for n in widths[1:]] +
                               [nn.BatchNorm2d(n, track_running_stats=False)
                                for n in chans[1:-1]]) if norm else None

  def forward(self, z):
    layers = [*self.dense, *self.convs[:-1]]
    norms = self.norms or [nn.Identity()] * len(layers)
    h = z
    for i, (layer, norm) in enumerate(zip(layers, norms)):
      h = F.relu(norm(layer(h)))
      if i == len(self.dense) - 1:
        h = h.reshape(z.shape[0], -1, *self.size)  # the same sizes; the order is immaterial here
    return torch.tanh(self.convs[-1](h))


class Discriminator(nn.Module):
  """genflax.tasks.gan's DCGAN discriminator: 4x4 stride-2 convs, then dense layers
  (`d_hidden`) and the logit, leaky ReLU 0.2."""

  def __init__(self, m, image_shape):
    super().__init__()
    h, w, c = image_shape
    chans = [c, *m.d_channels]
    self.convs = nn.ModuleList(nn.Conv2d(a, b, 4, 2, 1) for a, b in zip(chans, chans[1:]))
    flat = m.d_channels[-1] * (h // 2 ** len(m.d_channels)) * (w // 2 ** len(m.d_channels))
    widths = [flat, *m.d_hidden]
    self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
    self.out = nn.Linear(widths[-1], 1)

  def forward(self, x):
    h = x
    for layer in self.convs:
      h = F.leaky_relu(layer(h), 0.2)
    h = h.flatten(1)
    for layer in self.hidden:
      h = F.leaky_relu(layer(h), 0.2)
    return self.out(h)[:, 0]


def gan_step(config, info, layout):
  """([G, D], a train step -> (D's loss, G's loss)) of the DCGAN `config` describes."""
  m = config.model
  if m.arch != "dcgan" or m.conditional or m.get("d_minibatch_std") or config.loss.n_critic != 1:
    raise SystemExit("torch_reference: only the unconditional DCGAN with one critic step and "
                     "no minibatch std")
  g = Generator(m, info.image_shape).to(memory_format=layout)
  d = Discriminator(m, info.image_shape).to(memory_format=layout)
  ema = [p.detach().clone() for p in g.parameters()]
  adam = lambda cfg, params: torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.b1, cfg.b2))
  opt_g, opt_d = adam(config.optim_g, g.parameters()), adam(config.optim_d, d.parameters())
  b, (h, w, c) = config.data.batch_size, info.image_shape
  x = (torch.rand(b, c, h, w) * 2 - 1).contiguous(memory_format=layout)
  decay = config.loss.ema_decay

  def step():
    with torch.no_grad():
      fake = g(torch.randn(b, m.latent_dim))
    real_logits, fake_logits = d(torch.cat([x, fake])).chunk(2)
    d_loss = (F.softplus(-real_logits) + F.softplus(fake_logits)).mean()
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    g_loss = F.softplus(-d(g(torch.randn(b, m.latent_dim)))).mean()  # non-saturating
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_g.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, list(g.parameters()), 1 - decay)
    return d_loss.detach(), g_loss.detach()
  return [g, d], step


def matmul_peak(sizes=(1024, 2048), repeats: int = 5) -> float:
  """Best float32 FLOP/s of PyTorch's n x n matmuls."""
  best = 0.0
  for n in sizes:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    for _ in range(repeats):
      start = time.perf_counter()
      a @ b
      best = max(best, 2 * n**3 / (time.perf_counter() - start))
  return best


def autocast(forward):
  """A network's forward under PyTorch's mixed precision on CPU (torch.autocast in
  bfloat16: float32 parameters, bfloat16 convolutions and matmuls), its outputs
  back in float32 for the losses, as genflax's model.dtype=bfloat16 does."""
  def run(*args):
    with torch.autocast("cpu", dtype=torch.bfloat16):
      out = forward(*args)
    return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()
  return run


def build(config, channels_last: bool = False, dtype: str = "float32"):
  """([the networks], a train step -> a tuple of its losses) of the image model `config`
  describes, computing in dtype (bfloat16: under torch.autocast)."""
  info = INFOS[config.data.name]
  layout = torch.channels_last if channels_last else torch.contiguous_format
  torch.manual_seed(config.seed)
  networks, step = {"vae": vae_step, "gan": gan_step}[config.task](config, info, layout)
  if dtype == "bfloat16":
    for net in networks:
      net.forward = autocast(net.forward)
  return networks, step


def run(config, steps: int, warmup: int, channels_last: bool = False, compile_: bool = False,
        peak_sizes=(1024, 2048), dtype: str = "float32") -> dict:
  """Times `steps` train steps after `warmup`; the peak, PyTorch's and JAX's best
  matmul, is measured before and after them and the highest kept."""
  task = trainer.load_task(config.task)
  flops = task.train_flops(task.build(config, INFOS[config.data.name])) * config.data.batch_size
  _, step = build(config, channels_last, dtype)
  if compile_:
    step = torch.compile(step)
  peaks = [matmul_peak(peak_sizes), hot_loop.matmul_peak(peak_sizes)]
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()  # eager PyTorch on CPU returns once the work is done
    times.append(time.perf_counter() - start)
  peaks += [matmul_peak(peak_sizes), hot_loop.matmul_peak(peak_sizes)]
  median, peak = statistics.median(times), max(peaks)
  return {
      "framework": f"torch {torch.__version__}", "threads": torch.get_num_threads(),
      "channels_last": channels_last, "compile": compile_, "dtype": dtype,
      "batch": config.data.batch_size,
      "step_ms": 1e3 * median,
      "step_ms_p10_p90": [1e3 * hot_loop.percentile(times, q) for q in (10, 90)],
      "gflop_per_step": flops / 1e9, "peak_matmul_gflops_per_s": peak / 1e9,
      "torch_matmul_gflops_per_s": max(peaks[0], peaks[2]) / 1e9, "mfu": flops / median / peak}


@errors.one_line
def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, help="an image config: FILE[:ARG]")
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--channels_last", action="store_true",
                      help="NHWC tensors (torch.channels_last) instead of NCHW")
  parser.add_argument("--compile", action="store_true",
                      help="the step through torch.compile (inductor; needs a C++ compiler)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="bfloat16: the forward passes under torch.autocast")
  parser.add_argument("overrides", nargs="*", help="config overrides: key=value")
  args = parser.parse_args()
  config = hot_loop.load_config(args.config, args.overrides)
  results = run(config, args.steps, args.warmup, args.channels_last, args.compile,
                dtype=args.dtype)
  print(json.dumps({"config": args.config, "overrides": args.overrides, **results}))


if __name__ == "__main__":
  main()
