"""DCGAN and conditional DCGAN on Fashion-MNIST (28x28, 60,000 train / 10,000 test), offline.

    python -m genflax.main --config configs/dcgan_fashion.py --workdir runs/dcgan_fashion
    python -m genflax.main --config configs/dcgan_fashion.py:conditional --workdir runs/cgan_fashion
    python -m genflax.main --config configs/dcgan_fashion.py:wide --workdir runs/dcgan_wide
    python -m genflax.sample --workdir runs/cgan_fashion --label 7 --out sneakers.png

Reads the original IDX files that Debian's `dataset-fashion-mnist` installs
(`apt-get install dataset-fashion-mnist`), or those in `--config.data.idx_dir`.
The networks are dcgan_mnist.py's, InfoGAN's (G: 100-d noise -> dense 1,024
-> 7x7x128 -> transposed convs to 14x14x64 and 28x28x1, batch norm; D:
stride-2 convs 64, 128 -> dense 1,024); `conditional` adds the labels (G: a
label embedding; D: projection). 5,000 steps of 64 (5.3 epochs) take about
15 minutes on 2 CPU cores; 10,000 reached FID 43.1 unconditionally
(experiments/fashion_mnist/collapse). `wide`: G twice as wide (7x7x256 ->
14x14x128; 20.1M parameters in G and D) and ProGAN's minibatch standard
deviation in D, 10,000 steps (about 46 minutes on 2 cores): FID 9.5
unconditionally, every class 6.6-13.2% of the samples (the wider G alone:
33.7). (The default networks stay the benchmarks' DCGAN.)
FID is measured in the feature space of a classifier trained once on
Fashion-MNIST (genflax/tasks/image_metrics.py): 2,000 samples at each eval,
the whole test split's size (10,000) at the end.
Variants: those of dcgan_mnist.py (`conditional`, `hinge`, `wgan`, `r1`,
`sn`, `smoke`) and `wide`. The sweeps `collapse` and `latent_mlp` measured what kept the
unconditional DCGAN's earlier networks (no hidden dense layers) from
covering the classes (experiments/fashion_mnist/collapse):

    python -m genflax.sweep --config configs/dcgan_fashion.py --sweep collapse \
        --workdir runs/collapse --workers 2 --config.train.num_steps=1500 \
        --config.train.eval_every_steps=500 --config.train.ckpt_every_steps=500 \
        --config.eval.fid_samples=2000 --config.eval.final_fid_samples=2000 \
        --config.loss.r1_every=4 --config.model.g_hidden="()" --config.model.d_hidden="()"
    python -m genflax.sweep --config configs/dcgan_fashion.py --sweep latent_mlp \
        --workdir runs/latent_mlp --workers 2 --config.train.num_steps=1500 \
        --config.train.eval_every_steps=500 --config.train.ckpt_every_steps=500 \
        --config.eval.fid_samples=2000 --config.eval.final_fid_samples=2000 \
        --config.model.d_hidden="()"
"""
from genflax import configfile, defaults

dcgan_mnist = configfile.sibling(__file__, "dcgan_mnist")

VARIANTS = (*dcgan_mnist.VARIANTS, "wide")


def get_config(arg: str = ""):
  variants = defaults.variants(arg, VARIANTS)
  c = dcgan_mnist.get_config(",".join(sorted(variants - {"wide"})))
  c.data.name = "fashion_mnist"
  if "smoke" not in variants:
    c.train.update(num_steps=5000, log_every_steps=250, eval_every_steps=2500,
                   ckpt_every_steps=1000)
    c.eval.update(fid_samples=2000, final_fid_samples=0)
    if "wide" in variants:  # experiments/fashion_mnist/collapse: 43.1 -> 9.5
      c.model.update(g_channels=(256, 128), d_minibatch_std=True)
      c.train.update(num_steps=10000, ckpt_every_steps=500)
      c.eval.final_fid_draws = 3
  return c


SWEEPS = {
    # Why the unconditional DCGAN collapsed onto tops and shirts, measured
    # (experiments/fashion_mnist/collapse): G's batch norm, D's minibatch std and
    # R1 at gamma 10, each on and off, in short runs (the overrides the
    # experiment's command gives: 1,500 steps, FID of 2,000 samples, the
    # networks without hidden dense layers).
    "collapse": dict(params={"model.g_norm": ["none", "batch"],
                             "model.d_minibatch_std": [False, True],
                             "loss.r1_gamma": [0.0, 10.0]},
                     metric="fid"),
    # What the collapse study found missing (experiments/fashion_mnist/collapse): a
    # hidden dense layer between the noise and G's first feature map (InfoGAN's
    # G), and G's batch norm, each on and off, over two seeds.
    "latent_mlp": dict(params={"model.g_hidden": [(), (1024,)],
                               "model.g_norm": ["none", "batch"],
                               "seed": [0, 1]},
                       metric="fid"),
}


def get_sweep(name: str) -> dict:
  return SWEEPS[name]
