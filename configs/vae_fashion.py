"""VAEs on Fashion-MNIST (28x28, 60,000 train / 10,000 test), offline: IWAE bound in bits/dim.

    python -m genflax.main --config configs/vae_fashion.py --workdir runs/vae_fashion
    python -m genflax.main --config configs/vae_fashion.py:conv --workdir runs/conv_vae_fashion

Reads the original IDX files that Debian's `dataset-fashion-mnist` installs
(`apt-get install dataset-fashion-mnist`), or those in `--config.data.idx_dir`.
A discretised-Gaussian likelihood over the 256 grey levels, so the test
bound is in bits/dim comparable with other models of the same data
(experiments/fashion_mnist). The default is the MLP VAE (784-512-256-32);
`conv` uses stride-2 convs 32, 64 to 7x7 and back; `conditional` gives both
networks the labels. Variants combine with commas: `:conv,conditional`.
"""
from genflax import configfile, defaults

vae_digits = configfile.sibling(__file__, "vae_digits")

VARIANTS = (*vae_digits.VARIANTS, "conditional")


def get_config(arg: str = ""):
  variants = defaults.variants(arg, VARIANTS)
  c = vae_digits.get_config(",".join(sorted(variants - {"conditional"})))
  c.data.name = "fashion_mnist"
  c.model.conditional = "conditional" in variants
  if "smoke" in variants:
    c.eval.feature_steps = 20  # a feature network of its own, trained in seconds
    return c
  c.model.update(hidden=(512, 256), latent_dim=32)
  c.train.update(num_steps=10000, log_every_steps=500, eval_every_steps=2500,
                 ckpt_every_steps=2500)
  c.eval.update(iwae_k=16, final_iwae_k=1000, iwae_chunk=50, fid_samples=2000,
                final_fid_samples=0)  # FID of 10,000 samples at the end, as the GANs
  if "conv" in variants:
    # Its decoder costs ~10x the MLP's per image on CPU: a k=1000 bound over the
    # 10,000 test images would take most of an hour here, k=100 minutes.
    c.data.batch_size = 64
    c.train.update(num_steps=5000, eval_every_steps=2500, ckpt_every_steps=1000)
    c.eval.final_iwae_k = 100
  return c
