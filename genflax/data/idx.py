"""IDX files (the format of MNIST, KMNIST and Fashion-MNIST), and the `idx` dataset.

An IDX file is a 4-byte magic (0, 0, the element type, the rank), one
big-endian uint32 per dimension, then the elements in C order, big-endian;
the files are often gzipped. `read` takes either form.

`idx` is a local tfds builder over any MNIST-format directory
(`config.data.idx_dir`): the four files of FILES, gzipped or not, 28x28
images with labels 0-9. It is prepared into the data dir once per distinct
set of files, under `idx/<sha256 prefix of the four files>/`, so different
files never share a copy and changed files are prepared afresh.
"""
import gzip
import hashlib
import os

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from genflax.data import digits
from genflax.errors import DatasetNotPreparedError, UserError

# The element types of the IDX format, by the magic's third byte.
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
# split -> (images file, labels file), as MNIST and its successors name them.
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def contents(path: str) -> bytes:
  """The file's bytes, gunzipped when it is gzip (by its own magic, not its name)."""
  with open(path, "rb") as f:
    data = f.read()
  return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def parse(data: bytes, name: str = "data") -> np.ndarray:
  """IDX bytes -> an array of the shape and type its header gives."""
  if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _DTYPES:
    raise UserError(f"{name} is not an IDX file: it starts with {data[:4].hex(' ')}, "
                    "not 00 00 <type 08-0e> <rank>")
  rank = data[3]
  shape = tuple(int(d) for d in np.frombuffer(data, ">u4", rank, 4))
  dtype = np.dtype(_DTYPES[data[2]])
  offset = 4 + 4 * rank
  if len(data) - offset != dtype.itemsize * int(np.prod(shape)):
    raise UserError(f"{name}: its header says {shape} of {dtype}, which is "
                    f"{dtype.itemsize * int(np.prod(shape)):,} bytes, but "
                    f"{len(data) - offset:,} follow it (a truncated file?)")
  return np.frombuffer(data, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def read(path: str) -> np.ndarray:
  """The array in the IDX file at `path` (gzipped or plain)."""
  return parse(contents(path), path)


def find(directory: str, dataset: str, how_to_get: str) -> dict[str, str]:
  """{file stem of FILES: its path in directory}, `stem` or `stem.gz`; all four or an error."""
  found, missing = {}, []
  for stem in (s for pair in FILES.values() for s in pair):
    paths = [os.path.join(directory, stem + ext) for ext in ("", ".gz")]
    found[stem] = next((p for p in paths if os.path.isfile(p)), None)
    missing += [] if found[stem] else [stem]
  if missing:
    raise DatasetNotPreparedError(
        f"dataset {dataset!r} reads MNIST-format IDX files from {directory}, which lacks "
        f"{', '.join(missing)} (each plain or .gz); {how_to_get}")
  return found


def splits(paths: dict[str, str], arrays: dict[str, np.ndarray]):
  """{split: (images uint8 [N, 28, 28], labels [N] in 0-9)}, checked.

  paths: find()'s; arrays: {file stem: its array}.
  """
  out = {}
  for split, (images_stem, labels_stem) in FILES.items():
    images, labels = arrays[images_stem], arrays[labels_stem]
    where = os.path.dirname(paths[images_stem])
    if images.shape[1:] != (28, 28) or images.dtype != np.uint8 or labels.ndim != 1:
      raise UserError(f"{where}: {split} images are {images.dtype} {images.shape} and labels "
                      f"{labels.shape}; MNIST-format data is uint8 [N, 28, 28] with labels [N]")
    if len(images) != len(labels) or not ((0 <= labels) & (labels <= 9)).all():
      raise UserError(f"{where}: {len(images)} {split} images but {len(labels)} labels, or "
                      "labels outside 0-9; MNIST-format data has one label 0-9 per image")
    out[split] = images, labels
  return out


class IdxBuilder(digits.LocalBuilder, skip_registration=True):
  """What MNIST-format datasets share: 28x28x1 uint8 images, labels 0-9, the IDX order.

  Built from `idx_dir`'s files; once prepared, reading needs only the data dir.
  Images are stored as raw bytes (tfds's int64 lists take 3x longer to write).
  """

  VERSION = tfds.core.Version("1.0.0")
  code_path = epath.Path(__file__)  # see digits.Digits.code_path
  CLASS_NAMES = None  # a list of 10 names, or None for 0-9
  DESCRIPTION = ""
  DEFAULT_DIR = ""  # where the files are when config.data.idx_dir is ""
  HOW_TO_GET = ""  # said where the files are missing

  def __init__(self, *, idx_dir: str, **kwargs):
    self.idx_dir = idx_dir
    super().__init__(**kwargs)

  def download_and_prepare(self, *args, **kwargs):
    # Look first: where files are missing, tfds has announced and made nothing yet.
    self.paths = find(self.idx_dir, self.name, self.HOW_TO_GET)
    super().download_and_prepare(*args, **kwargs)

  def source(self) -> str:
    return f"the IDX files in {os.path.dirname(next(iter(self.paths.values())))}"

  def _info(self) -> tfds.core.DatasetInfo:
    names = {"names": self.CLASS_NAMES} if self.CLASS_NAMES else {"num_classes": 10}
    return self.dataset_info_from_configs(
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8,
                                          encoding=tfds.features.Encoding.BYTES),
            "label": tfds.features.ClassLabel(**names),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,  # records in the files' order: record i is image i
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the files are on this machine
    return {split: self._generate_examples(images, labels)
            for split, (images, labels) in splits(self.paths, self._arrays()).items()}

  def _arrays(self) -> dict[str, np.ndarray]:
    return {stem: read(path) for stem, path in self.paths.items()}

  def _generate_examples(self, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image[..., None], "label": int(label)}


class Idx(IdxBuilder, skip_registration=True):
  """Any MNIST-format directory; its config name is a prefix of its files' sha256."""

  name = "idx"
  DESCRIPTION = "MNIST-format IDX files (MNIST, KMNIST, Fashion-MNIST) from a directory."
  HOW_TO_GET = "name a directory that holds them in --config.data.idx_dir"

  def __init__(self, *, idx_dir: str, **kwargs):
    digest = hashlib.sha256()
    for stem, path in sorted(find(idx_dir, self.name, self.HOW_TO_GET).items()):
      with open(path, "rb") as f:
        digest.update(hashlib.sha256(f.read()).digest())
    super().__init__(idx_dir=idx_dir, config=digest.hexdigest()[:16], **kwargs)

  @classmethod
  def get_builder_config(cls, name, version=None):
    del version
    return tfds.core.BuilderConfig(name=name)  # each set of files is a config of its own
