"""Classic MLP GAN on the embedded 8x8 digits (no download).

    python -m genflax.main --config configs/gan_digits.py --workdir runs/gan_digits
    python -m genflax.main --config configs/gan_digits.py:smoke --workdir /tmp/gan_smoke

100-d noise -> MLP -> tanh image; an MLP discriminator; non-saturating loss.
Variants (the `:arg`, comma-separated): `hinge`, `wgan` (WGAN-GP: gradient
penalty 10, 5 critic steps), `r1` (R1 penalty, lazy every 4 steps), `sn`
(spectral normalisation in D), `smoke` (seconds, for tests).
Evaluation (FID, KID, IS, precision/recall) uses a classifier trained once
per dataset and kept in the data dir: see genflax/tasks/image_metrics.py.

Sweeps (`python -m genflax.sweep --config configs/gan_digits.py --sweep NAME
--workdir DIR`): `loss_reg`, FID by loss (ns / hinge / WGAN-GP) and
regulariser (none / R1 / spectral norm) over three seeds
(experiments/sweep_gan_digits).
"""
import ml_collections

from genflax import defaults


VARIANTS = ("hinge", "wgan", "r1", "sn", "smoke")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  variants = defaults.variants(arg, VARIANTS)
  c = defaults.base("gan", "digits", batch_size=64)
  del c.optim  # G and D have their own
  c.model = ml_collections.ConfigDict(dict(
      arch="mlp",                  # mlp | dcgan
      latent_dim=100,
      g_hidden=(256, 256),         # dense widths, G (noise side first)
      d_hidden=(256, 256),         # dense widths, D (image side first)
      g_channels=(),               # dcgan only: width at the smallest size, then per upsampling
      d_channels=(),               # dcgan only: one stride-2 conv per entry
      conditional=False,           # label embedding into G and D
      conditioning="projection",   # how D sees the label: projection | concat
      spectral_norm="sn" in variants,
      g_norm="none",               # none | batch: G's batch norm (the batch's own statistics)
      d_minibatch_std=False,       # D sees its batch's feature std (ProGAN's minibatch std)
      conv="auto",                 # auto | xla | matmul | forward | onednn (genflax/models/conv.py;
      #                              auto: genflax/platform.py)
      dtype="float32",             # compute: float32 | bfloat16 | auto (params, losses stay float32;
      #                              auto: the faster here, genflax/platform.py)
      param_dtype="float32",       # parameters, optimizer state and the EMA generator
  ))
  c.loss = ml_collections.ConfigDict(dict(
      kind="ns",                   # ns (non-saturating) | hinge | wgan
      n_critic=1,                  # D steps per G step, all on the step's real batch
      gp_weight=0.0,               # WGAN-GP gradient penalty
      r1_gamma=0.0,                # R1 penalty weight (gamma / 2 * E|grad D(real)|^2)
      r1_every=1,                  # lazy R1: applied (scaled by this) every k steps
      ema_decay=0.99,              # EMA of G's parameters, used for eval and samples
  ))
  # Adam b1=0.5 as in DCGAN. Separate rates allow TTUR (Heusel et al. 2017), but
  # D at 4x G's rate (1e-4 / 4e-4) did worse on digits: the MLP's FID rose from
  # 61 at step 1000 to 271 at 3000, DCGAN collapsed (experiments/gan_digits).
  c.optim_g = defaults.optim(lr=2e-4, b1=0.5, b2=0.999, schedule="constant", warmup_steps=0)
  c.optim_d = defaults.optim(lr=2e-4, b1=0.5, b2=0.999, schedule="constant", warmup_steps=0)
  c.train.update(num_steps=3000, log_every_steps=250, eval_every_steps=1000,
                 ckpt_every_steps=1000)
  c.eval.update(
      fid_samples=0,               # generated images per eval; 0 = the test split's size
      final_fid_samples=0,         # at the end of training; 0 = the test split's size
      final_fid_draws=1,           # independent sets of samples at the end: mean and sd
      # Training steps of the feature network FID uses (trained once per dataset
      # and kept in the data dir); 0 = the default, max(400, 3 epochs), which
      # every score in experiments/ used (genflax/tasks/image_metrics.py).
      feature_steps=0,
  )
  if "hinge" in variants:
    c.loss.kind = "hinge"
  if "wgan" in variants:
    c.loss.update(kind="wgan", gp_weight=10.0, n_critic=5)
    c.optim_g.update(lr=1e-4, b1=0.0, b2=0.9)  # the WGAN-GP paper's Adam
    c.optim_d.update(lr=1e-4, b1=0.0, b2=0.9)
  if "r1" in variants:
    c.loss.update(r1_gamma=1.0, r1_every=4)
  if "smoke" in variants:
    defaults.smoke(c)
    c.model.update(latent_dim=8, g_hidden=(16,), d_hidden=(16,))
    c.loss.update(r1_gamma=c.loss.r1_gamma or 1.0, r1_every=2)  # exercise the lazy branch
    c.eval.update(fid_samples=64, final_fid_samples=120)
  return c


SWEEPS = {
    # Variant axes: "" keeps the default (the non-saturating loss, no regulariser).
    "loss_reg": dict(params={":loss": ["", "hinge", "wgan"], ":reg": ["", "r1", "sn"],
                             "seed": [0, 1, 2]},
                     metric="fid"),
}


def get_sweep(name: str) -> dict:
  return SWEEPS[name]
