"""A trained diffusion run's bits/dim through its probability-flow ODE, by bound.

    python experiments/bits_per_dim.py runs/cdiff28 --bounds uniform gaussian:0.005 \
        --images 1000 --split test

Prints a markdown table, a row per bound (genflax/tasks/diffusion.py,
levels_log_likelihood): `uniform`, or `gaussian:SIGMA` with the Gaussian's sd in
[-1, 1] pixel units. Each row gives the mean bits/dim over the first `--images`
images of the split (the train split: a fixed random choice of them) with the
standard error of that mean, and its difference to the first row's on the same
images with the standard error of the paired differences, which is far smaller:
the rows share their images, so it says which differences are larger than the
noise. Every bound draws its dequantisation noise and its probes from the same
seeds.
"""
import argparse
import math

import jax
import numpy as np

from genflax import trainer
from genflax.tasks import diffusion


def parse_bound(text: str) -> tuple[str, float]:
  kind, _, sigma = text.partition(":")
  if kind not in diffusion.DEQUANTIZATIONS or (kind == "gaussian") != bool(sigma):
    raise argparse.ArgumentTypeError(f"{text!r}: use uniform or gaussian:SIGMA")
  value = float(sigma) if sigma else 0.0
  if kind == "gaussian" and not 0 < value < 1:
    raise argparse.ArgumentTypeError(f"{text!r}: SIGMA must be in (0, 1)")
  return kind, value


def table(workdir: str, bounds, images: int, split: str, probes: int, seed: int = 0):
  """The per-image bits/dim [len(bounds), images] of the run's EMA parameters."""
  task, setup, state, step = trainer.load_run(workdir)
  if task is not diffusion:
    raise SystemExit(f"{workdir} holds a {setup.config.task} run, not a diffusion one")
  c = setup.config
  train, test, _ = diffusion.datasets(c, workdir)
  if split == "train":  # as many as asked, not the first (the files may be sorted)
    rows = np.random.RandomState(seed).permutation(len(train["image"]))[:images or None]
    test = {k: v[rows] for k, v in train.items()}
  c.eval.nll_images, c.eval.nll_probes = images, probes
  out = []
  for kind, sigma in bounds:
    c.eval.nll_dequantization, c.eval.nll_sigma = kind, sigma
    setup.cache.pop("nll", None)
    out.append(diffusion.bits_per_dim(setup, state["ema"], test, jax.random.PRNGKey(seed)))
    print(markdown_row(kind, sigma, out[-1], out[0]), flush=True)
  return np.stack(out), step


def markdown_row(kind: str, sigma: float, bpd: np.ndarray, first: np.ndarray) -> str:
  sem = lambda v: v.std() / math.sqrt(len(v))
  diff = bpd - first
  return (f"| {kind} | {sigma:g} | {bpd.mean():.4f} +- {sem(bpd):.4f} | "
          f"{diff.mean():+.4f} +- {sem(diff):.4f} |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("workdir")
  parser.add_argument("--bounds", nargs="+", type=parse_bound, default=[("uniform", 0.0)])
  parser.add_argument("--images", type=int, default=0, help="0: the whole split")
  parser.add_argument("--split", choices=("test", "train"), default="test")
  parser.add_argument("--probes", type=int, default=1,
                      help="Hutchinson probes per image; 0: the exact divergence")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  if args.images < 0 or args.probes < 0:
    parser.error("--images and --probes must be >= 0")
  print(f"| bound | sigma | bits/dim ({args.split}, mean +- se) | against the first row "
        "(paired, +- se) |\n| --- | --- | --- | --- |", flush=True)
  table(args.workdir, args.bounds, args.images, args.split, args.probes, args.seed)


if __name__ == "__main__":
  main()
