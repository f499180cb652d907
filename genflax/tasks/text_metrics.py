"""How close generated text comes to the true text: BLEU and ROUGE-L.

The LM scores its continuations of held-out prompts here, at the final
evaluation and in `genflax.sample --references`, through one function,
`scores`, so both report the same numbers for the same texts:

- BLEU: sacrebleu's corpus BLEU (0-100; its 13a tokenisation, so a newline
  counts as a space), the continuations' n-grams pooled over all prompts;
- ROUGE-L: rouge-score's F-measure of the longest common subsequence of
  words (lower-cased, punctuation dropped), averaged over the prompts (0-1).

Beside the model's, the same two scores of a baseline that copies instead
of predicting: each prompt's last complete line, repeated to the length of
the true continuation (`*_baseline`). A model has to beat it to show it
learned more than to echo what it was given.

Both libraries come with the `lm` extra (`pip install 'genflax[lm]'`);
without them `missing()` says so, and the scores are skipped.
"""
import importlib.util

LIBRARIES = {"sacrebleu": "sacrebleu", "rouge-score": "rouge_score"}  # package: module


def missing() -> str | None:
  """None when both libraries are installed, else the line that says how to install them."""
  absent = [name for name, module in LIBRARIES.items() if importlib.util.find_spec(module) is None]
  if not absent:
    return None
  return (f"BLEU and ROUGE-L need {' and '.join(absent)}, not installed here: "
          "pip install 'genflax[lm]'")


def repeat_last_line(prompt: str, length: int) -> str:
  """The baseline's continuation: the prompt's last complete non-blank line and its
  newline, repeated to `length` characters (the whole prompt when it has no such line)."""
  lines = [line for line in prompt.split("\n")[:-1] if line.strip()]
  unit = lines[-1] + "\n" if lines else prompt or "\n"
  return (unit * (length // len(unit) + 1))[:length]


def bleu_and_rouge_l(continuations: list[str], references: list[str]) -> dict:
  """{bleu, rouge_l} of continuations against their references, pair by pair."""
  import sacrebleu  # Imported here: the lm extra, needed only for these scores.
  from rouge_score import rouge_scorer

  # Exact copies score exp(sum of logs) = 100.00000000000004: kept within [0, 100].
  bleu = min(100.0, sacrebleu.corpus_bleu(continuations, [references]).score)
  scorer = rouge_scorer.RougeScorer(["rougeL"])
  rouge = [scorer.score(ref, text)["rougeL"].fmeasure
           for text, ref in zip(continuations, references)]
  return {"bleu": float(bleu), "rouge_l": float(sum(rouge) / len(rouge))}


def scores(prompts: list[str], continuations: list[str], references: list[str]) -> dict:
  """BLEU and ROUGE-L of the continuations of `prompts` against their true
  `references`, and of the repeated-last-line baseline: {bleu, rouge_l,
  bleu_baseline, rouge_l_baseline}. The three lists pair by position."""
  if not len(prompts) == len(continuations) == len(references) > 0:
    raise ValueError(f"{len(prompts)} prompts, {len(continuations)} continuations and "
                     f"{len(references)} references: expected as many of each, at least one")
  baseline = [repeat_last_line(p, len(r)) for p, r in zip(prompts, references)]
  values = bleu_and_rouge_l(continuations, references)
  values.update({f"{k}_baseline": v for k, v in bleu_and_rouge_l(baseline, references).items()})
  return values
