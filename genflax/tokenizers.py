"""Tokenizers that are trained locally and saved with the run.

`char`: the distinct characters of the training text, in code-point order.
`sentencepiece`: a BPE model trained on the training text, with byte
fallback and no normalisation, so that any text round-trips exactly.
Both are built once in the workdir (`tokenizer/`) and reused from there, so
a resumed run and `genflax.sample` see the same vocabulary.
"""
import io
import json
import os

import numpy as np

from genflax import files
from genflax.errors import ConfigError, UserError

KINDS = ("char", "sentencepiece")


class CharTokenizer:
  """One token per character; a character not in the vocabulary is an error."""
  kind = "char"
  FILE = "chars.json"

  def __init__(self, chars: str):
    self.chars = chars
    self.vocab_size = len(chars)
    codes = np.frombuffer(chars.encode("utf-32-le"), np.uint32)
    self._ids = np.full(int(codes.max()) + 1, -1, np.int32)  # code point -> id
    self._ids[codes] = np.arange(len(chars))

  @classmethod
  def train(cls, text: str) -> "CharTokenizer":
    return cls("".join(sorted(set(text))))

  def encode(self, text: str) -> np.ndarray:
    """str -> int32 [len(text)]."""
    codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    ids = self._ids[np.minimum(codes, len(self._ids) - 1)]
    unknown = (ids < 0) | (codes >= len(self._ids))
    if unknown.any():
      bad = sorted({text[i] for i in np.flatnonzero(unknown)[:20]})
      raise UserError(f"characters {bad} are not in the {self.vocab_size}-character "
                      "vocabulary of the training text")
    return ids

  def decode(self, ids) -> str:
    return "".join(self.chars[i] for i in np.asarray(ids).reshape(-1))

  def save(self, directory: str) -> None:
    files.write_atomically(os.path.join(directory, self.FILE),
                             lambda f: f.write(json.dumps(self.chars).encode()))

  @classmethod
  def load(cls, directory: str) -> "CharTokenizer | None":
    """The tokenizer saved in directory; None if there is none, _Unreadable if
    its file is damaged."""
    path = os.path.join(directory, cls.FILE)
    if not os.path.exists(path):
      return None
    try:
      with open(path, encoding="utf-8") as f:
        chars = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: bad JSON, or bytes that are not UTF-8
      raise _Unreadable(path, e) from None
    if not isinstance(chars, str) or not chars or len(set(chars)) != len(chars):
      raise _Unreadable(path, "not a string of distinct characters")
    return cls(chars)


class SentencePieceTokenizer:
  """Subword tokens of a sentencepiece BPE model; newline is a token of its own."""
  kind = "sentencepiece"
  FILE = "spm.model"

  def __init__(self, model_proto: bytes):
    import sentencepiece as spm  # Imported here: char-level runs do not need it.
    self.model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.get_piece_size()

  @classmethod
  def train(cls, text: str, vocab_size: int) -> "SentencePieceTokenizer":
    import sentencepiece as spm
    model = io.BytesIO()
    # Lines are its sentences; "\n" then comes back as a user-defined symbol.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.split("\n")), model_writer=model,
        vocab_size=vocab_size, model_type="bpe", character_coverage=1.0,
        byte_fallback=True, normalization_rule_name="identity",
        add_dummy_prefix=False, remove_extra_whitespaces=False,
        user_defined_symbols=["\n"], bos_id=-1, eos_id=-1, unk_id=0,
        num_threads=1, minloglevel=2)
    return cls(model.getvalue())

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids) -> str:
    return self._sp.decode(np.asarray(ids).reshape(-1).tolist())

  def save(self, directory: str) -> None:
    files.write_atomically(os.path.join(directory, self.FILE),
                             lambda f: f.write(self.model_proto))

  @classmethod
  def load(cls, directory: str) -> "SentencePieceTokenizer | None":
    """The tokenizer saved in directory; None if there is none, _Unreadable if
    its file is damaged."""
    path = os.path.join(directory, cls.FILE)
    if not os.path.exists(path):
      return None
    try:
      with open(path, "rb") as f:
        tokenizer = cls(f.read())
    except (OSError, RuntimeError) as e:  # RuntimeError: sentencepiece cannot parse it
      raise _Unreadable(path, str(e).splitlines()[0]) from None
    if not tokenizer.vocab_size:  # an empty file parses as a model of no pieces
      raise _Unreadable(path, "a model of no pieces")
    return tokenizer


class _Unreadable(Exception):
  """A saved tokenizer's file that cannot be read back."""

  def __init__(self, path: str, why):
    super().__init__(f"{path} is unreadable ({why})")


def load_or_train(kind: str, directory: str, train_text: str, vocab_size: int = 0):
  """The tokenizer saved in `directory`, or one trained on `train_text` and saved there.

  A saved one that is unreadable (cut short, overwritten) is trained again, with
  a line that says so: training is deterministic, so the run's checkpoints
  still match it."""
  if kind not in KINDS:
    raise ConfigError(f"tokenizer {kind!r}: expected one of {KINDS}")
  cls = CharTokenizer if kind == "char" else SentencePieceTokenizer
  try:
    tokenizer = cls.load(directory)
  except _Unreadable as e:
    print(f"{e}: the tokenizer is trained again from the training text", flush=True)
    tokenizer = None
  if tokenizer is None:
    tokenizer = cls.train(train_text) if kind == "char" else cls.train(train_text, vocab_size)
    tokenizer.save(directory)
  elif kind == "sentencepiece" and tokenizer.vocab_size != vocab_size:
    raise ConfigError(f"{directory} holds a {tokenizer.vocab_size}-token sentencepiece "
                      f"model, but the config asks for {vocab_size}; use a new workdir")
  return tokenizer
