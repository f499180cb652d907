"""A trained diffusion run's EMA samples scored by sampler, steps and guidance.

    python experiments/fid_by_sampler.py runs/cdiff28 --steps 8 18 --guidance 0 1 2 \
        --num 10000 --draws 3

Prints a markdown table, a row per sampler, step count and guidance scale:
the U-Net passes per image, then the image metrics (genflax/tasks/image_metrics.py)
as mean +- sd over `--draws` independent sets of `--num` samples (labels balanced
over the classes for a conditional run; guidance 0 draws from its null label,
i.e. unconditionally). `--num 0` draws as many as the test split holds. The real
side and its floors are those of the run's own evaluation.
"""
import argparse

import jax

from genflax import trainer
from genflax.tasks import diffusion, image_metrics


def passes(kind: str, sampler: str, steps: int, guidance: float) -> int:
  """U-Net passes per image: Heun's second evaluation skips EDM's last step (to
  sigma 0); guidance other than 0 or 1 runs the conditional and null labels both."""
  n = steps if sampler == "euler" else 2 * steps - 1 if kind == "edm" else 2 * steps
  return n * (1 if guidance in (0, 1) else 2)


def table(workdir: str, samplers, steps, guidances, num: int, draws: int, seed: int = 0):
  """The rows as dicts (sampler, steps, passes, guidance and the scores)."""
  task, setup, state, step = trainer.load_run(workdir)
  if task is not diffusion:
    raise SystemExit(f"{workdir} holds a {setup.config.task} run, not a diffusion one")
  c, info = setup.config, setup.info
  if any(g != 1 for g in guidances) and not c.model.conditional:
    raise SystemExit(f"--guidance {guidances}: {workdir} is unconditional; use 1")
  n = num or info.num_test
  train, test, _ = diffusion.datasets(c, workdir)
  ref = image_metrics.reference(c, train, test, info, n, setup.cache)
  labels = image_metrics.balanced_labels(n, info.num_classes if c.model.conditional else None)
  rows = []
  for sampler in samplers:
    c.sample.sampler = sampler
    for guidance in guidances:
      fn = diffusion.draw(setup, guidance, max(steps))
      for s in steps:
        generate = lambda rng: image_metrics.generate(
            lambda r, y, m: fn(state["ema"], r, y, s, m), n, rng, labels)
        values = image_metrics.scores_over_draws(ref, generate, jax.random.PRNGKey(seed), draws)
        rows.append({"sampler": sampler, "steps": s, "guidance": guidance,
                     "passes": passes(c.loss.kind, sampler, s, guidance), **values})
        print(markdown_row(rows[-1], draws), flush=True)
  return rows, step, ref


COLUMNS = ("fid", "kid", "is", "precision", "recall", "class_share_max")


def markdown_row(row: dict, draws: int) -> str:
  cells = [row["sampler"], str(row["steps"]), str(row["passes"]), f"{row['guidance']:g}"]
  for k in COLUMNS:
    sd = f" +- {row[k + '_sd']:.2f}" if draws > 1 else ""
    cells.append(f"{row[k]:.2f}{sd}")
  return "| " + " | ".join(cells) + " |"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("workdir")
  parser.add_argument("--samplers", nargs="+", default=["heun"], choices=diffusion.SAMPLERS)
  parser.add_argument("--steps", nargs="+", type=int, default=[4, 8, 18, 50])
  parser.add_argument("--guidance", nargs="+", type=float, default=[1.0])
  parser.add_argument("--num", type=int, default=0, help="samples per draw (0: the test split's size)")
  parser.add_argument("--draws", type=int, default=1)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  if min(args.steps) < 1 or args.num < 0 or args.draws < 1 or min(args.guidance) < 0:
    parser.error("--steps and --draws must be >= 1, --num and --guidance >= 0")
  print("| sampler | steps | U-Net passes | guidance | "
        + " | ".join(f"{k} (mean +- sd)" if args.draws > 1 else k for k in COLUMNS)
        + " |\n|" + " --- |" * (4 + len(COLUMNS)), flush=True)
  _, step, ref = table(args.workdir, args.samplers, args.steps, args.guidance, args.num,
                       args.draws, args.seed)
  print(f"\n{args.workdir} at step {step}; {args.draws} draw(s) of {args.num or 'test-size'} "
        f"samples; FID floor {ref['fid_floor']:.2f}, KID floor {ref['kid_floor']:.2f}, "
        f"IS of real data {ref['is_real']:.2f}")


if __name__ == "__main__":
  main()
