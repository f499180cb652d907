"""Samples from a trained run: `python -m genflax.sample --workdir runs/x --num 64 --out grid.png`.

Loads the run's config and its latest checkpoint, then hands the flags to
the family's `generate` (images for VAE, GAN and diffusion, `--label` for
conditional models, `--steps` and `--guidance` for diffusion's sampler;
text from `--prompt` for language models).

Images go to a PNG grid, or with `--out samples.npz` to arrays any other
tool can score: `images` uint8 [N, H, W, C] in the dataset's levels and,
for a conditional model, `labels` [N]:

    python -m genflax.sample --workdir runs/x --num 10000 --out samples.npz
"""
import sys

from absl import flags

from genflax import checks, files, trainer
from genflax.errors import UserError

flags.DEFINE_string("workdir", None, "A run's workdir (holds config.json and checkpoints/).")
flags.DEFINE_integer("num", 64, "How many samples.")
flags.DEFINE_string("out", "samples.png", "Output file: images as a PNG grid, or as arrays "
                    "(images, labels) if it ends in .npz (language models print their text).")
flags.DEFINE_integer("label", None, "Class to condition on (conditional models); default: a row per class.")
flags.DEFINE_multi_string("prompt", ["\n"], "Prompt(s) for language models; repeat to batch.")
flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate after each prompt.")
flags.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 means greedy.")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: all).")
flags.DEFINE_float("top_p", 1.0, "Keep the smallest set of tokens with this much probability.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("steps", None, "Diffusion: sampler steps (default: the run's sample.steps).")
flags.DEFINE_float("guidance", None, "Diffusion: classifier-free guidance scale, 0 unconditional, "
                   "1 conditional (default: the run's sample.guidance).")
FLAGS = flags.FLAGS


def main(argv) -> int:
  try:
    FLAGS(argv)
    if not FLAGS.workdir:
      raise UserError("--workdir is missing: name a trained run's workdir")
    if FLAGS.num < 1 or FLAGS.max_new_tokens < 0:
      raise UserError(f"--num={FLAGS.num} must be >= 1 and --max_new_tokens="
                      f"{FLAGS.max_new_tokens} >= 0")
    checks.sampling(FLAGS, "--")
    if (FLAGS.steps is not None and FLAGS.steps < 1) or (FLAGS.guidance or 0) < 0:
      raise UserError(f"--steps={FLAGS.steps} must be >= 1 and --guidance={FLAGS.guidance} >= 0")
    task, setup, state, step = trainer.load_run(FLAGS.workdir)
    if setup.config.task != "lm":  # images go to --out (a language model prints its text)
      files.check_output(FLAGS.out)
    print(f"{setup.config.task} from {FLAGS.workdir}, step {step}")
    task.generate(setup, state, FLAGS)
  except (UserError, flags.Error) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
