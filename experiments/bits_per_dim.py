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

A VAE run scores its IWAE bound on the same images (`--bounds iwae:K`, K
importance samples; genflax/tasks/vae.py), so a diffusion run and a VAE
compare image by image:

    python experiments/bits_per_dim.py runs/vae_conv28 --images 120 \
        --bounds iwae:100 --save vae.npz
    python experiments/bits_per_dim.py runs/diff28 --images 120 \
        --bounds gaussian:0.005 --against vae.npz

and two saved files compare without recomputing either
(`python experiments/bits_per_dim.py diff28.npz --against vae.npz`).

Two runs compare on the same images the same way: `--save a.npz` keeps one
run's per-image values, and `--against a.npz` adds, under each of another
run's bounds, its paired difference to the saved run's value for that bound,
or to its only bound where it scored one (the same split, images and seed):

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
from genflax.tasks import diffusion, vae


def parse_bound(text: str) -> tuple[str, float]:
  kind, _, value = text.partition(":")
  if kind == "iwae":
    if not value.isdigit() or int(value) < 1:
      raise argparse.ArgumentTypeError(f"{text!r}: use iwae:K with K >= 1 importance samples")
    return kind, int(value)
  if kind not in diffusion.DEQUANTIZATIONS or (kind == "gaussian") != bool(value):
    raise argparse.ArgumentTypeError(f"{text!r}: use uniform, gaussian:SIGMA or iwae:K")
  try:
    number = float(value) if value else 0.0
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r}: SIGMA must be a number") from None
  if kind == "gaussian" and not 0 < number < 1:
    raise argparse.ArgumentTypeError(f"{text!r}: SIGMA must be in (0, 1)")
  return kind, number


def vae_bits_per_dim(setup, params, test: dict, k: int, rng) -> np.ndarray:
  """The IWAE bound on -log2 P(levels) per dimension [images] of a discretised
  Gaussian VAE, k importance samples, a batch of eval.batch_size at a time."""
  c = setup.config
  chunk = min(k, c.eval.iwae_chunk)
  if c.model.likelihood != "discretized_gaussian" or k % chunk:
    raise SystemExit(f"iwae:{k} needs a discretised Gaussian VAE and K a multiple of its "
                     f"eval.iwae_chunk ({c.eval.iwae_chunk}); this one's likelihood is "
                     f"{c.model.likelihood}")
  bound = jax.jit(lambda x, y, r: -vae.iwae_bound(setup, params, x, y, r, k))
  dims = math.prod(setup.info.image_shape) * math.log(2)
  out, n = [], len(test["image"])
  for start in range(0, n, c.eval.batch_size):
    batch = {key: v[start:start + c.eval.batch_size] for key, v in test.items()}
    x, y = vae.inputs(setup, batch)
    out.append(np.asarray(bound(x, y, jax.random.fold_in(rng, start))) / dims)
  return np.concatenate(out)


def table(workdir: str, bounds, images: int, split: str, probes: int, seed: int = 0):
  """The per-image bits/dim [len(bounds), images] of the run's EMA parameters."""
  task, setup, state, step = trainer.load_run(workdir)
  if task not in (diffusion, vae):
    raise SystemExit(f"{workdir} holds a {setup.config.task} run, not a diffusion or VAE one")
  iwae = [b for b in bounds if b[0] == "iwae"]
  if iwae and task is not vae or task is vae and len(iwae) < len(bounds):
    raise SystemExit(f"{workdir} is a {setup.config.task} run: a VAE takes iwae:K bounds, "
                     "a diffusion run uniform and gaussian:SIGMA")
  c = setup.config
  train, test, _ = task.datasets(c, workdir)
  if split == "train":  # as many as asked, not the first (the files may be sorted)
    rows = np.random.RandomState(seed).permutation(len(train["image"]))[:images or None]
    test = {k: v[rows] for k, v in train.items()}
  if task is vae:  # the first `images` (diffusion.bits_per_dim takes eval.nll_images)
    test = {key: v[:images or None] for key, v in test.items()}
  out = []
  for kind, value in bounds:
    if task is vae:
      out.append(vae_bits_per_dim(setup, state["params"], test, value, jax.random.PRNGKey(seed)))
    else:
      c.eval.nll_images, c.eval.nll_probes = images, probes
      c.eval.nll_dequantization, c.eval.nll_sigma = kind, value
      setup.cache.pop("nll", None)
      out.append(diffusion.bits_per_dim(setup, state["ema"], test, jax.random.PRNGKey(seed)))
    print(markdown_row(kind, value, out[-1], out[0]), flush=True)
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
  if key not in names and len(names) > 1:
    raise SystemExit(f"--against {name} has no {key} bound (it has {', '.join(names)})")
  there = key if key in names else names[0]
  other = saved["bpd"][names.index(there)]
  if other.shape != bpd.shape:
    raise SystemExit(f"--against {name} scored {len(other)} images, this run {len(bpd)}: "
                     "use the same --images, --split and --seed")
  diff = bpd - other
  return (f"| {key} against {there} of {name} | | {other.mean():.4f} +- "
          f"{other.std() / math.sqrt(len(other)):.4f} (there) | {diff.mean():+.4f} +- "
          f"{diff.std() / math.sqrt(len(diff)):.4f} |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("workdir", help="a run's workdir, or an .npz that --save wrote (its "
                      "values as saved, for --against: nothing is recomputed)")
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
  def load(path: str, flag: str) -> dict:
    try:
      return dict(np.load(path))
    except (OSError, ValueError) as e:
      parser.error(f"{flag}{path}: {e}")

  values = load(args.workdir, "") if args.workdir.endswith(".npz") else None
  if values is not None:  # what another invocation saved: its split, seed and images
    args.split, args.seed, args.images = (str(values["split"]), int(values["seed"]),
                                          values["bpd"].shape[1])
  saved = None
  if args.against:
    saved = load(args.against, "--against ")
    scored = (str(saved["split"]), int(saved["seed"]), saved["bpd"].shape[1])
    if scored[:2] != (args.split, args.seed) or args.images not in (0, scored[2]):
      parser.error(f"--against {args.against} scored {scored[2]} {scored[0]} images with seed "
                   f"{scored[1]}: use the same --images, --split and --seed")
  print(f"| bound | sigma | bits/dim ({args.split}, mean +- se) | against the first row "
        "(paired, +- se) |\n| --- | --- | --- | --- |", flush=True)
  if values is not None:
    args.bounds = [(kind, float(value)) for kind, _, value in
                   (str(b).partition(":") for b in values["bounds"])]
    bpd, step = values["bpd"], int(values["step"])
    for (kind, value), row in zip(args.bounds, bpd):
      print(markdown_row(kind, value, row, bpd[0]), flush=True)
  else:
    bpd, step = table(args.workdir, args.bounds, args.images, args.split, args.probes,
                      args.seed)
  if saved is not None:
    for bound, row in zip(args.bounds, bpd):
      print(against_row(bound, row, saved, args.against), flush=True)
  if args.save:
    np.savez(args.save, bpd=bpd, bounds=np.array([f"{k}:{s:g}" for k, s in args.bounds]),
             split=args.split, seed=args.seed, step=step, workdir=args.workdir)


if __name__ == "__main__":
  main()
