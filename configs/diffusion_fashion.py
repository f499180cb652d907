"""Diffusion on Fashion-MNIST (28x28, 60,000 train / 10,000 test), offline.

    python -m genflax.main --config configs/diffusion_fashion.py --workdir runs/diffusion_fashion
    python -m genflax.main --config configs/diffusion_fashion.py:conditional --workdir runs/cdiff28
    python -m genflax.sample --workdir runs/cdiff28 --steps 18 --guidance 2 --label 7 --out sneakers.png

Reads the IDX files of Debian's `dataset-fashion-mnist` (or those in
`--config.data.idx_dir`), as configs/dcgan_fashion.py does. The U-Net of
diffusion_digits.py one level deeper: widths 32 at 28x28, 64 at 14x14, 128
at 7x7 with self-attention there. Sized for an accelerator: on 2 CPU cores a
step of 128 images took 8.1 s (18% MFU; benchmarks/README.md), so 20,000
steps would take about two days. FID uses the Fashion-MNIST feature network
(genflax/tasks/image_metrics.py), 2,000 samples at each eval and 10,000 at
the end, so the scores compare with experiments/fashion_mnist; bits/dim
compare with the VAEs' there. Variants: those of diffusion_digits.py.
"""
from genflax import configfile

diffusion_digits = configfile.sibling(__file__, "diffusion_digits")

VARIANTS = diffusion_digits.VARIANTS


def get_config(arg: str = ""):
  c = diffusion_digits.get_config(arg)
  c.data.name = "fashion_mnist"
  if "smoke" in arg.split(","):
    c.model.channels = (8, 8, 16)
    c.eval.update(final_fid_steps=(), final_nll=False, feature_steps=20)  # digits smoke has both
  else:
    c.model.channels = (32, 64, 128)
    c.train.update(num_steps=20000, log_every_steps=500, eval_every_steps=5000,
                   ckpt_every_steps=1000)
    c.eval.update(fid_samples=2000, final_fid_samples=0, final_fid_steps=(8, 18, 50),
                  nll_images=1000)
  return c
