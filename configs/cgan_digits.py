"""Class-conditional DCGAN on the embedded 8x8 digits: sample grids show one row per digit.

    python -m genflax.main --config configs/cgan_digits.py --workdir runs/cgan_digits
    python -m genflax.main --config configs/cgan_digits.py:smoke --workdir /tmp/cgan_smoke
    python -m genflax.sample --workdir runs/cgan_digits --label 3 --out threes.png

G gets a learned label embedding beside the noise; D is a projection
discriminator (`model.conditioning=concat` feeds the one-hot label as extra
input channels instead). Variants as gan_digits.py, plus `concat` and `mlp`
(the MLP networks of gan_digits.py).
"""
from genflax import configfile, defaults

dcgan_digits = configfile.sibling(__file__, "dcgan_digits")
gan_digits = configfile.sibling(__file__, "gan_digits")

VARIANTS = (*gan_digits.VARIANTS, "concat", "mlp")


def get_config(arg: str = ""):
  variants = defaults.variants(arg, VARIANTS)
  base = gan_digits if "mlp" in variants else dcgan_digits
  c = base.get_config(",".join(sorted(variants - {"concat", "mlp"})))
  c.model.conditional = True
  if "concat" in variants:
    c.model.conditioning = "concat"
  return c
