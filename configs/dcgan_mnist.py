"""DCGAN on 28x28 MNIST (or Fashion-MNIST), once the dataset is prepared in the data dir.

    python -m genflax.main --config configs/dcgan_mnist.py --workdir runs/dcgan_mnist
    python -m genflax.main --config configs/dcgan_mnist.py --config.data.name=fashion_mnist \
        --workdir runs/dcgan_fashion

genflax never downloads: prepare the dataset first (`tfds build mnist
--file_format=array_record` on a machine with internet and TensorFlow, see
genflax/data/catalogue.py). G: noise -> 7x7x128 -> transposed convs to
14x14x64 and 28x28x1; D: stride-2 convs 64, 128. Variants as gan_digits.py
(`conditional` adds labels as in cgan_digits.py). The smoke variant needs the
data too; tests skip it where the dataset is not prepared.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import dcgan_digits  # pylint: disable=g-import-not-at-top


from genflax import defaults  # pylint: disable=g-import-not-at-top,wrong-import-order

VARIANTS = (*dcgan_digits.VARIANTS, "conditional")


def get_config(arg: str = ""):
  variants = defaults.variants(arg, VARIANTS)
  c = dcgan_digits.get_config(",".join(sorted(variants - {"conditional"})))
  c.data.name = "mnist"
  c.model.update(latent_dim=100, g_channels=(128, 64), d_channels=(64, 128),
                 conditional="conditional" in variants)
  c.train.update(num_steps=10000, log_every_steps=500, eval_every_steps=2500,
                 ckpt_every_steps=2500)
  c.eval.update(fid_samples=2000, final_fid_samples=5000)  # of 10,000 test images
  if "smoke" in variants:
    c.model.update(g_channels=(16, 8), d_channels=(8, 16))
    c.eval.update(fid_samples=200, final_fid_samples=200)
  return c
