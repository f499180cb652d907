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

Two runs compare on the same images the same way: `--save a.npz` keeps one
run's per-image values, and `--against a.npz` adds, under each of another
run's bounds, its paired difference to the saved run's value for that bound
(the same split, images and seed):

    python experiments/bits_per_dim.py runs/cdiff28 --images 120 \
        --bounds gaussian:0.005 --save cdiff28.npz
    python experiments/bits_per_dim.py runs/cdiff28_lu --images 120 \
        --bounds gaussian:0.005 --against cdiff28.npz
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


def against_row(bound, bpd: np.ndarray, saved, name: str) -> str:
  """The markdown row of bpd's paired difference to the saved run's values for
  `bound` (a dict of np.load's arrays from --save)."""
  key = f"{bound[0]}:{bound[1]:g}"
  names = [str(b) for b in saved["bounds"]]
  if key not in names:
    raise SystemExit(f"--against {name} has no {key} bound (it has {', '.join(names)})")
  other = saved["bpd"][names.index(key)]
  if other.shape != bpd.shape:
    raise SystemExit(f"--against {name} scored {len(other)} images, this run {len(bpd)}: "
                     "use the same --images, --split and --seed")
  diff = bpd - other
  return (f"| {key} against {name} | | {other.mean():.4f} +- "
          f"{other.std() / math.sqrt(len(other)):.4f} (there) | {diff.mean():+.4f} +- "
          f"{diff.std() / math.sqrt(len(diff)):.4f} |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("workdir")
  parser.add_argument("--bounds", nargs="+", type=parse_bound, default=[("uniform", 0.0)])
  parser.add_argument("--images", type=int, default=0, help="0: the whole split")
  parser.add_argument("--split", choices=("test", "train"), default="test")
  parser.add_argument("--probes", type=int, default=1,
                      help="Hutchinson probes per image; 0: the exact divergence")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--save", help="an .npz for the per-image values (for --against)")
  parser.add_argument("--against", help="an .npz another run's --save wrote: paired "
                      "differences to it, bound by bound")
  args = parser.parse_args()
  if args.images < 0 or args.probes < 0:
    parser.error("--images and --probes must be >= 0")
  saved = None
  if args.against:
    try:
      saved = dict(np.load(args.against))
    except (OSError, ValueError) as e:
      parser.error(f"--against {args.against}: {e}")
    scored = (str(saved["split"]), int(saved["seed"]), saved["bpd"].shape[1])
    if scored[:2] != (args.split, args.seed) or args.images not in (0, scored[2]):
      parser.error(f"--against {args.against} scored {scored[2]} {scored[0]} images with seed "
                   f"{scored[1]}: use the same --images, --split and --seed")
  print(f"| bound | sigma | bits/dim ({args.split}, mean +- se) | against the first row "
        "(paired, +- se) |\n| --- | --- | --- | --- |", flush=True)
  bpd, step = table(args.workdir, args.bounds, args.images, args.split, args.probes, args.seed)
  if saved is not None:
    for bound, row in zip(args.bounds, bpd):
      print(against_row(bound, row, saved, args.against), flush=True)
  if args.save:
    np.savez(args.save, bpd=bpd, bounds=np.array([f"{k}:{s:g}" for k, s in args.bounds]),
             split=args.split, seed=args.seed, step=step, workdir=args.workdir)


if __name__ == "__main__":
  main()
