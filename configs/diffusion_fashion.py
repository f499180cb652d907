"""Diffusion on Fashion-MNIST (28x28, 60,000 train / 10,000 test), offline, sized for CPUs.

    python -m genflax.main --config configs/diffusion_fashion.py:conditional --workdir runs/cdiff28
    python -m genflax.sample --workdir runs/cdiff28 --steps 18 --guidance 2 --label 7 --out sneakers.png
    python -m genflax.main --config configs/diffusion_fashion.py --workdir runs/diff28

Reads the IDX files of Debian's `dataset-fashion-mnist` (or those in
`--config.data.idx_dir`), as configs/dcgan_fashion.py does. The U-Net of
diffusion_digits.py on 2x2 patches (`model.patch`): the image enters as
14x14x4, the levels are 32 wide at 14x14 and 64 at 7x7 (self-attention
there), 921,028 parameters with labels. A step of 128 images is 50.8 GFLOP;
6,000 of them are about an hour on 2 CPU cores (benchmarks/README.md).
`conditional` drops 10% of the labels, so one run samples class by class,
guided (`--guidance 2`), or unconditionally (`--guidance 0`).

FID uses the Fashion-MNIST feature network (genflax/tasks/image_metrics.py),
2,000 samples at each eval and 3 draws of 10,000 at the end, so the scores
compare with experiments/fashion_mnist; the test bits/dim (1,000 test
images through the ODE, Gaussian dequantisation at sigma 0.005) compare
with the VAEs' there.

Variants: those of diffusion_digits.py, and `accelerator`: the full-size
U-Net (widths 32 at 28x28, 64 at 14x14, 128 at 7x7, no patches) for 20,000
steps, which at 8.1 s a step on 2 CPU cores would take two days.
"""
from genflax import configfile, defaults

diffusion_digits = configfile.sibling(__file__, "diffusion_digits")

VARIANTS = (*diffusion_digits.VARIANTS, "accelerator")


def get_config(arg: str = ""):
  variants = defaults.variants(arg, VARIANTS)
  c = diffusion_digits.get_config(",".join(sorted(variants - {"accelerator"})))
  c.data.name = "fashion_mnist"
  # Bits/dim through the Gaussian bound at sigma 0.005 (0.64 of a level's bin): 0.16
  # below the uniform one on the same test images (experiments/fashion_mnist).
  c.eval.update(nll_dequantization="gaussian", nll_sigma=0.005)
  if "smoke" in variants:
    c.model.update(channels=(8, 8, 16), patch=1)
    c.eval.update(final_fid_steps=(), final_nll=False, feature_steps=20)  # digits smoke has both
  elif "accelerator" in variants:
    c.model.update(channels=(32, 64, 128), patch=1)
    c.train.update(num_steps=20000, log_every_steps=500, eval_every_steps=5000,
                   ckpt_every_steps=1000)
    c.eval.update(fid_samples=2000, final_fid_samples=0, final_fid_steps=(8, 18, 50),
                  nll_images=1000)
  else:
    c.model.update(channels=(32, 64), patch=2)
    c.train.update(num_steps=6000, log_every_steps=250, eval_every_steps=2000,
                   ckpt_every_steps=1000)
    c.eval.update(fid_samples=2000, final_fid_samples=10000, final_fid_draws=3,
                  final_fid_steps=(), nll_images=1000)
  return c
