"""Class-conditional VAE on the embedded 8x8 digits: samples one row per digit.

    python -m genflax.main --config configs/cvae_digits.py --workdir runs/cvae_digits
    python -m genflax.main --config configs/cvae_digits.py:smoke --workdir /tmp/cvae_smoke

The label goes (one-hot) into both the encoder and the decoder, so the
latent code needs to carry only style; the bounds are of log p(x | label).
"""
from genflax import configfile

vae_digits = configfile.sibling(__file__, "vae_digits")

VARIANTS = vae_digits.VARIANTS


def get_config(arg: str = ""):
  c = vae_digits.get_config(arg)
  c.model.conditional = True
  return c
