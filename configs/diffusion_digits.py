"""Diffusion on the embedded 8x8 digits (no download): an EDM denoiser over a small U-Net.

    python -m genflax.main --config configs/diffusion_digits.py --workdir runs/diffusion_digits
    python -m genflax.main --config configs/diffusion_digits.py:flow --workdir runs/flow_digits
    python -m genflax.main --config configs/diffusion_digits.py:conditional --workdir runs/cdiff
    python -m genflax.sample --workdir runs/cdiff --steps 18 --guidance 2 --label 3 --num 64 \
        --out threes.png

U-Net: widths 32 at 8x8 and 64 at 4x4, two residual blocks a level,
self-attention at 4x4 (genflax/tasks/diffusion.py). Sampling: Heun on EDM's
schedule, 18 steps (35 network evaluations). Variants (comma-separated):
`flow` (rectified flow, logit-normal t; Heun on 18 even steps),
`conditional` (labels, dropped 10% of the time for classifier-free
guidance), `smoke` (seconds, for tests). FID uses the GAN's feature
network (genflax/tasks/image_metrics.py), so the scores compare with
experiments/gan_digits.
"""
import ml_collections

from genflax import defaults

VARIANTS = ("flow", "conditional", "smoke")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  variants = defaults.variants(arg, VARIANTS)
  c = defaults.base("diffusion", "digits", batch_size=128)
  c.model = ml_collections.ConfigDict(dict(
      channels=(32, 64),           # U-Net widths per resolution, full size first
      blocks=2,                    # residual blocks per resolution
      attention=True,              # self-attention at the lowest resolution
      patch=1,                     # the levels run on patch x patch patches (space to depth)
      conditional="conditional" in variants,
      label_dropout=0.1,           # conditional: share of labels dropped (for guidance)
      conv="auto",                 # auto | xla | matmul | forward | onednn (genflax/models/conv.py;
      #                              auto: genflax/platform.py)
      dtype="float32",             # compute: float32 | bfloat16 | auto (params, losses stay float32;
      #                              auto: the faster here, genflax/platform.py)
      param_dtype="float32",       # parameters, optimizer state and the EMA
  ))
  c.loss = ml_collections.ConfigDict(dict(
      kind="flow" if "flow" in variants else "edm",  # edm | flow
      sigma_sampling="lognormal",  # edm: lognormal | log_uniform (over sample.sigma_min..max)
      p_mean=-1.2, p_std=1.2,      # edm: ln sigma ~ N(p_mean, p_std^2) (EDM's values)
      time_sampling="logit_normal",  # flow: uniform | logit_normal t
      ema_decay=0.999,             # EMA of the parameters, used for eval and samples
      dequantize=False,            # train on uniformly dequantised levels (as bits/dim scores)
  ))
  c.sample = ml_collections.ConfigDict(dict(
      sampler="heun",              # euler | heun
      steps=18,                    # EDM's 18 Heun steps: 35 network evaluations
      guidance=1.0,                # classifier-free: 0 unconditional, 1 conditional, > 1 guided
      churn=0.0,                   # edm: EDM's S_churn; 0 = deterministic
      sigma_min=0.002, sigma_max=80.0, rho=7.0,  # edm: the noise schedule (EDM's values)
  ))
  c.optim = defaults.optim(lr=1e-3, schedule="cosine", warmup_steps=200)
  c.train.update(num_steps=3000, log_every_steps=250, eval_every_steps=1500,
                 ckpt_every_steps=500)
  c.eval.update(
      fid_samples=0,               # generated images per eval; 0 = the test split's size
      final_fid_samples=0,         # at the end of training; 0 = the test split's size
      final_fid_draws=1,           # independent sets of samples at the end: mean and sd
      final_fid_steps=(4, 8, 18, 50),  # also FID at these sampler steps at the end
      feature_steps=0,             # the feature network's steps; 0 = the default (image_metrics)
      final_nll=True,              # test bits/dim through the probability-flow ODE at the end
      nll_images=0,                # test images it averages over; 0 = the test split's size
      nll_tolerance=1e-5,          # the ODE solver's relative and absolute tolerance
      nll_dequantization="uniform",  # uniform | gaussian: the bound from levels to density
      nll_sigma=0.05,              # gaussian: its sd in [-1, 1] (a bin is 2 / (levels - 1))
      nll_probes=1,                # Hutchinson probes per image; 0 = the exact divergence
  )
  if "smoke" in variants:
    defaults.smoke(c)
    c.model.update(channels=(8, 16), blocks=1)
    c.sample.steps = 3
    c.eval.update(fid_samples=64, final_fid_samples=120, final_fid_steps=(2,), nll_images=8,
                  nll_tolerance=1e-3)
  return c
