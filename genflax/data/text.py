"""Loads a text dataset by tfds name as two strings: (train, validation).

`shakespeare` is prepared here on first use; catalogue datasets with a
"text" feature (`tiny_shakespeare`, `lm1b`, ...) load when prepared, with the
same error as images when they are not (genflax never downloads).
"""
from genflax.data import catalogue, digits, shakespeare
from genflax.errors import UserError

_CHUNK = 8192  # records decoded per read


def load_text(name: str, data_dir: str | None = None) -> tuple[str, str]:
  """(train, validation) texts; a dataset without "validation" gives "test".

  A split of many examples (lm1b's sentences) is joined with newlines.
  """
  if name == "shakespeare":
    return digits.read_prepared(shakespeare.make(data_dir), lambda builder: _load(builder, name))
  return _load(catalogue._catalogue_builder(name, data_dir), name)


def _load(builder, name: str) -> tuple[str, str]:
  with digits.reading(builder):
    if "text" not in builder.info.features:
      raise UserError(f"dataset {name!r} has no 'text' feature; genflax's language "
                      "models need one")
    splits = builder.info.splits
    held_out = "validation" if "validation" in splits else "test"
    catalogue._splits(builder, "train", held_out)
    source = catalogue._data_source(builder)
    return _read(source["train"]), _read(source[held_out])


def _read(source) -> str:
  parts = []
  for start in range(0, len(source), _CHUNK):
    records = source.__getitems__(range(start, min(start + _CHUNK, len(source))))
    parts += [r["text"] for r in records]
  return b"\n".join(parts).decode("utf-8")
