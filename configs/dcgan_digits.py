"""DCGAN on the embedded 8x8 digits: the default GAN, minutes on 2 CPU cores.

    python -m genflax.main --config configs/dcgan_digits.py --workdir runs/dcgan_digits
    python -m genflax.main --config configs/dcgan_digits.py:smoke --workdir /tmp/dcgan_smoke

G: 32-d noise -> dense 2x2x64 -> transposed convs to 4x4x32 and 8x8x1 (tanh);
D: stride-2 convs 32, 64 -> dense logit. Kept small: XLA:CPU convolutions
are slow (shared/DESIGN.md). Same variants as gan_digits.py (`hinge`,
`wgan`, `r1`, `sn`, `smoke`).
"""
from genflax import configfile

gan_digits = configfile.sibling(__file__, "gan_digits")

VARIANTS = gan_digits.VARIANTS


def get_config(arg: str = ""):
  c = gan_digits.get_config(arg)
  c.model.update(arch="dcgan", latent_dim=32, g_hidden=(), d_hidden=(), g_channels=(64, 32),
                 d_channels=(32, 64))
  if "smoke" in arg.split(","):
    c.model.update(g_channels=(16, 8), d_channels=(8, 16))
  return c
