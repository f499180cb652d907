"""Samples from a trained run: `python -m genflax.sample --workdir runs/x --num 64 --out grid.png`.

Loads the run's config and its latest checkpoint, then hands the flags to
the family's `generate` (images for VAE, GAN and diffusion, `--label` for
conditional models, `--steps` and `--guidance` for diffusion's sampler;
text from `--prompt` or a file of `--prompts` for language models).

Images go to a PNG grid, or with `--out samples.npz` to arrays any other
tool can score: `images` uint8 [N, H, W, C] in the dataset's levels and,
for a conditional model, `labels` [N]:

    python -m genflax.sample --workdir runs/x --num 10000 --out samples.npz

A language model continues given prompts and scores the continuations
against given true ones with BLEU and ROUGE-L, as its final evaluation
scores held-out text (genflax/tasks/text_metrics.py): one text per line of
each file, `\\n` in a line for a newline:

    python -m genflax.sample --workdir runs/lm --prompts prompts.txt --references truths.txt --temperature 0
"""
import argparse
import re
import sys

from absl import flags

from genflax import checks, files, trainer
from genflax.errors import UserError
from genflax.tasks import text_metrics

flags.DEFINE_string("workdir", None, "A run's workdir (holds config.json and checkpoints/).")
flags.DEFINE_integer("num", 64, "How many samples.")
flags.DEFINE_string("out", "samples.png", "Output file: images as a PNG grid, or as arrays "
                    "(images, labels) if it ends in .npz (language models print their text).")
flags.DEFINE_integer("label", None, "Class to condition on (conditional models); default: a row per class.")
flags.DEFINE_multi_string("prompt", ["\n"], "Prompt(s) for language models; repeat to batch.")
flags.DEFINE_string("prompts", None, "Language models: a UTF-8 file of prompts, one per line "
                    "(\\n in a line for a newline), instead of --prompt.")
flags.DEFINE_string("references", None, "Language models: a file of the prompts' true "
                    "continuations, as --prompts; each continuation is then as long as its "
                    "reference (in tokens) and all are scored against them (BLEU, ROUGE-L).")
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
    args = read_args(FLAGS)
    task, setup, state, step = trainer.load_run(FLAGS.workdir)
    if setup.config.task != "lm":  # images go to --out (a language model prints its text)
      if FLAGS.prompts or FLAGS.references:
        raise UserError(f"--prompts and --references are for language models; {FLAGS.workdir} "
                        f"is a {setup.config.task} run")
      files.check_output(FLAGS.out)
    print(f"{setup.config.task} from {FLAGS.workdir}, step {step}")
    task.generate(setup, state, args)
  except (UserError, flags.Error) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


def read_args(flag_values):
  """The flags as a namespace, with `prompt` read from --prompts and `references`
  from --references where given, each checked before any work."""
  args = argparse.Namespace(**flag_values.flag_values_dict())
  if args.prompts:
    if flag_values["prompt"].present:
      raise UserError("--prompt and --prompts both given: use one")
    args.prompt = read_texts(args.prompts, "--prompts")
  if args.references:
    args.references = read_texts(args.references, "--references")
    if len(args.references) != len(args.prompt):
      raise UserError(f"--references holds {len(args.references)} texts for "
                      f"{len(args.prompt)} prompts: give one per prompt, in the same order")
    if flag_values["max_new_tokens"].present:
      raise UserError("--max_new_tokens and --references both given: with references, each "
                      "continuation is as many tokens as its reference")
    why = text_metrics.missing()
    if why:
      raise UserError(f"--references: {why}")
  return args


def read_texts(path: str, flag: str) -> list[str]:
  """One text per line of a UTF-8 file; `\\n` in a line is a newline, `\\\\` a backslash."""
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().split("\n")
  except OSError as e:
    raise UserError(f"{flag}={path}: {e.strerror}") from None
  except UnicodeDecodeError:
    raise UserError(f"{flag}={path} is not UTF-8 text") from None
  if lines[-1] == "":  # the file's last newline ends a line, it does not start one
    lines.pop()
  if not lines:
    raise UserError(f"{flag}={path} is empty: write one text per line")
  blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
  if blank:
    raise UserError(f"{flag}={path}: line {blank[0]} is blank; write one text per line "
                    "(\\n in a line for a newline)")
  return [re.sub(r"\\([n\\])", lambda m: "\n" if m.group(1) == "n" else "\\", line)
          for line in lines]


if __name__ == "__main__":
  sys.exit(main(sys.argv))
