"""FID of a trained diffusion run's EMA samples by sampler and number of steps.

    python experiments/diffusion_digits/fid_by_sampler.py runs/diffusion_digits [steps ...]

Prints a markdown table: sampler, steps, network evaluations per image, FID
against the test split (as many samples as test images; the run's own FID
floor beside it), with the run's guidance. Uses the run's evaluation code
(genflax.tasks.diffusion.generate_images, genflax.tasks.image_metrics).
"""
import sys

import jax

from genflax import trainer
from genflax.tasks import diffusion, image_metrics


def main(workdir: str, steps: list[int]) -> None:
  task, setup, state, step = trainer.load_run(workdir)
  if task is not diffusion:
    raise SystemExit(f"{workdir} holds a {setup.config.task} run, not a diffusion one")
  _, test, _ = diffusion.datasets(setup.config, workdir)
  n = setup.info.num_test
  ref = diffusion.reference(setup, test, n)
  print(f"{workdir}, step {step}: {setup.config.loss.kind}, {n} samples, FID floor "
        f"{ref['fid_floor']:.1f}\n")
  print("| sampler | steps | network evaluations | FID |\n| --- | ---: | ---: | ---: |")
  for sampler in ("euler", "heun"):
    setup.config.sample.sampler = sampler
    for s in steps:
      setup.cache.pop(("generate", s), None)  # compiled for the other sampler
      images = diffusion.generate_images(setup, state["ema"], n, jax.random.PRNGKey(0), s)
      fid = image_metrics.fid(ref["features"](images)[0], ref["real"])
      nfe = s if sampler == "euler" else 2 * s - 1 if setup.config.loss.kind == "edm" else 2 * s
      print(f"| {sampler} | {s} | {nfe} | {fid:.1f} |", flush=True)


if __name__ == "__main__":
  main(sys.argv[1], [int(s) for s in sys.argv[2:]] or [4, 8, 18, 50])
