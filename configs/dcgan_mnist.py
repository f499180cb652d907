"""DCGAN on 28x28 MNIST-format images (MNIST, KMNIST, Fashion-MNIST) read from their IDX files.

    python -m genflax.main --config configs/dcgan_mnist.py --config.data.idx_dir=~/data/mnist \
        --workdir runs/dcgan_mnist
    python -m genflax.main --config configs/dcgan_mnist.py --config.data.name=fashion_mnist \
        --workdir runs/dcgan_fashion

Runs on the MNIST-format files in the directory `data.idx_dir` names (no
default): the four files as MNIST's site names them (train-images-idx3-ubyte,
train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte),
each plain or .gz, prepared once into the data dir as dataset `idx`
(genflax/data/idx.py). `data.name=fashion_mnist` needs no directory where
Debian's `dataset-fashion-mnist` is installed. G: noise -> dense 1,024 ->
7x7x128 -> transposed convs to 14x14x64 and 28x28x1, batch norm after every
layer but the last; D: stride-2 convs 64, 128 -> dense 1,024 -> logit
(InfoGAN's networks).
Variants as gan_digits.py (`conditional` adds labels as in cgan_digits.py).
Tests run the smoke variant on the first 2,500 of Debian's Fashion-MNIST
images, written as MNIST-format files, and skip where they are not installed.
"""
from genflax import configfile, defaults

dcgan_digits = configfile.sibling(__file__, "dcgan_digits")

VARIANTS = (*dcgan_digits.VARIANTS, "conditional")


def get_config(arg: str = ""):
  variants = defaults.variants(arg, VARIANTS)
  c = dcgan_digits.get_config(",".join(sorted(variants - {"conditional"})))
  c.data.name = "idx"  # with data.idx_dir, which the command line names
  # InfoGAN's networks for 28x28 (Chen et al. 2016; Lucic et al. 2018 score GANs on
  # Fashion-MNIST with them): a dense layer of 1,024 between the noise and G's first
  # feature map, batch norm in G, and one of 1,024 before D's logit. Without G's
  # hidden layer and batch norm the unconditional DCGAN stalls at FID 105-125 on
  # Fashion-MNIST, its samples blobs of tops (experiments/fashion_mnist/collapse).
  c.model.update(latent_dim=100, g_hidden=(1024,), d_hidden=(1024,), g_norm="batch",
                 g_channels=(128, 64), d_channels=(64, 128),
                 conditional="conditional" in variants)
  c.train.update(num_steps=10000, log_every_steps=500, eval_every_steps=2500,
                 ckpt_every_steps=2500)
  c.eval.update(fid_samples=2000, final_fid_samples=5000)  # of 10,000 test images
  if "smoke" in variants:
    defaults.smoke(c)  # again: the schedule above replaced its few steps
    c.model.update(g_hidden=(16,), d_hidden=(16,), g_channels=(16, 8), d_channels=(8, 16))
    c.eval.update(fid_samples=200, final_fid_samples=200,
                  feature_steps=20)  # a feature network of its own, trained in seconds
  return c
