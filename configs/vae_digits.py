"""VAE on the embedded 8x8 digits (no download): the default genflax job.

    python -m genflax.main --config configs/vae_digits.py --workdir runs/vae_digits
    python -m genflax.main --config configs/vae_digits.py:smoke --workdir /tmp/vae_smoke

Variants (the `:arg`): `conv` for the convolutional encoder/decoder, `smoke`
for a seconds-long run with tiny networks (tests). Combine with commas:
`:conv,smoke`.

Sweeps (`python -m genflax.sweep --config configs/vae_digits.py --sweep NAME
--workdir DIR`): `latent_beta`, the test IWAE bound against latent size and
beta over two seeds (experiments/sweep_vae_digits); `lr`, a TPE search of
the learning rate and widths.
"""
import ml_collections

from genflax import defaults


VARIANTS = ("conv", "smoke")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  variants = defaults.variants(arg, VARIANTS)
  c = defaults.base("vae", "digits", batch_size=128)
  c.model = ml_collections.ConfigDict(dict(
      arch="conv" if "conv" in variants else "mlp",
      hidden=(256, 256),           # dense widths (encoder order; the decoder mirrors)
      channels=(32, 64),           # stride-2 convs, arch=conv only
      latent_dim=16,
      likelihood="discretized_gaussian",  # bernoulli | gaussian | discretized_gaussian
      obs_sigma=0.1,               # likelihood=gaussian only
      beta=1.0,                    # weight of the KL term (beta-VAE)
      conditional=False,           # labels into encoder and decoder
      dense_grads="auto",          # auto | xla | row_major | onednn (auto: row_major on CPU; genflax/models/layers.py)
      conv="auto",                 # auto | xla | matmul | forward | onednn (genflax/models/conv.py;
      #                              auto: genflax/platform.py)
      dtype="float32",             # compute: float32 | bfloat16 | auto (params, likelihoods stay
      #                              float32; auto: the faster here, genflax/platform.py)
      param_dtype="float32",       # parameters and optimizer state
  ))
  # 1,437 training images: the test bound is best near 1-2k steps and worsens
  # after (train -ELBO keeps falling), so the default stops there.
  c.train.update(num_steps=2000, log_every_steps=100, eval_every_steps=500,
                 ckpt_every_steps=500)
  c.eval.update(
      iwae_k=64, final_iwae_k=1000, iwae_chunk=100,
      fid_samples=0,               # prior samples scored per eval (FID...); 0 = the test split's size
      final_fid_samples=0,         # at the end of training; 0 = the test split's size
      final_fid_draws=1,           # independent sets of samples at the end: mean and sd
      feature_steps=0,             # the feature network's steps; 0 = the default (image_metrics)
  )
  if "smoke" in variants:
    defaults.smoke(c)
    c.model.update(hidden=(32,), channels=(8, 8), latent_dim=4)
    c.eval.update(iwae_k=4, final_iwae_k=8, fid_samples=64, final_fid_samples=120)
  return c


SWEEPS = {
    "latent_beta": dict(
        params={"model.latent_dim": [2, 4, 8, 16, 32], "model.beta": [0.5, 1.0, 2.0],
                "seed": [0, 1]},
        metric="iwae_nll"),
    "lr": dict(
        params={"optim.lr": "loguniform(1e-4, 1e-2)", "model.hidden": [(128,), (256, 256), (512,)]},
        metric="iwae_nll", sampler="tpe", trials=20),
}


def get_sweep(name: str) -> dict:
  return SWEEPS[name]
