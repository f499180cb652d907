"""Loads an image dataset by tfds name into numpy arrays.

genflax reads tfds data without TensorFlow, through `as_data_source()`, so a
catalogue dataset must have been prepared in a random-access format
(array_record). `digits`, and the IDX datasets `fashion_mnist` and `idx`
from files on this machine, are prepared here on first use; every other
dataset is prepared once with the tfds CLI and copied over.
"""

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from genflax.data import digits, fashion_mnist, idx
from genflax.errors import DatasetNotPreparedError, UserError

_CHUNK = 8192  # records decoded per read; bounds the list of dicts in memory
# The arrays of the last _KEEP datasets loaded, by prepared directory and the
# size and time of its files: the trainer and the image scores' real side
# read a dataset once per process (decoding 70,000 records takes seconds).
_LOADED: dict = {}
_KEEP = 2
_NUM_LEVELS = {"digits": 17, "binarized_mnist": 2}  # default: 256 (uint8)
# Local builders over IDX files on this machine (config.data.idx_dir).
IDX_DATASETS = {"fashion_mnist": fashion_mnist.FashionMnist, "idx": idx.Idx}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What models need to know about a dataset."""
  name: str
  image_shape: tuple[int, int, int]  # (H, W, C)
  num_classes: int  # 0 when the dataset has no labels
  num_levels: int  # distinct pixel values: 17 for digits, 256 for uint8
  num_train: int
  num_test: int

  def __str__(self):
    h, w, c = self.image_shape
    return (f"{self.name} ({self.num_train} train / {self.num_test} test images, "
            f"{h}x{w}x{c}, {self.num_levels} levels, {self.num_classes} classes)")


Arrays = dict[str, np.ndarray]


def load(name: str, data_dir: str | None = None,
         idx_dir: str | None = None) -> tuple[Arrays, Arrays, DatasetInfo]:
  """Returns (train, test, info) for the tfds dataset `name`.

  train/test: {"image": uint8 [N, H, W, C], "label": int32 [N]}, without
  "label" when info.num_classes == 0. data_dir None means tfds's default
  (TFDS_DATA_DIR or ~/tensorflow_datasets). idx_dir: where an IDX dataset
  (IDX_DATASETS) reads its files when preparing; None: its default.
  """
  if name == "digits":
    return digits.read_prepared(lambda **kw: digits.Digits(data_dir=data_dir, **kw),
                                lambda builder: _load(builder, name))
  if name in IDX_DATASETS:
    make = _idx_builder(name, data_dir, idx_dir)
    return digits.read_prepared(make, lambda builder: _load(builder, _idx_name(name, builder)))
  return _load(_catalogue_builder(name, data_dir), name)


def _idx_name(name: str, builder) -> str:
  """`idx` is one dataset per set of files, named by its config."""
  return f"{name}/{builder.builder_config.name}" if builder.builder_config else name


def _load(builder, name: str) -> tuple[Arrays, Arrays, DatasetInfo]:
  with digits.reading(builder):
    image_shape, num_classes = _describe(builder)
    key = (builder.data_dir, _stamp(builder.data_dir))
    if key not in _LOADED:
      source = _data_source(builder)
      splits = tuple(_read(source[s], image_shape, num_classes > 0)
                     for s in _splits(builder, "train", "test"))
      for array in (a for split in splits for a in split.values()):
        array.flags.writeable = False  # shared by every later load of these files
      while len(_LOADED) >= _KEEP:
        del _LOADED[next(iter(_LOADED))]
      _LOADED[key] = splits
  train, test = _LOADED[key]
  info = DatasetInfo(name, image_shape, num_classes,
                     _NUM_LEVELS.get(name, 256), len(train["image"]),
                     len(test["image"]))
  return train, test, info


def _idx_builder(name, data_dir, idx_dir):
  """make(**kwargs) -> the IDX dataset's builder (digits.read_prepared)."""
  builder_cls = IDX_DATASETS[name]
  idx_dir = idx_dir or builder_cls.DEFAULT_DIR
  if not idx_dir:
    raise UserError(f"dataset {name!r} reads MNIST-format IDX files from the directory "
                    "--config.data.idx_dir names, and it names none")
  idx_dir = os.path.expanduser(idx_dir)
  return lambda **kw: builder_cls(data_dir=data_dir, idx_dir=idx_dir, **kw)


def _catalogue_builder(name, data_dir):
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(
        f"unknown dataset {name!r}: it is neither 'digits' nor a tfds "
        "catalogue name (https://www.tensorflow.org/datasets/catalog)"
    ) from None
  except Exception as e:  # pylint: disable=broad-except  (tfds reading a damaged dataset_info.json)
    root = data_dir or tfds.core.constants.get_default_data_dir()
    raise digits.unreadable_catalogue(name, os.path.join(root, name), root, e) from None
  if not builder.is_prepared():
    root = builder.data_dir_root
    raise DatasetNotPreparedError(
        f"dataset {name!r} is not prepared: nothing in {builder.data_dir}. "
        "genflax does not download; on a machine with internet and "
        f"TensorFlow run `tfds build {name} --data_dir={root} "
        f"--file_format=array_record`, then copy {root}/{name} into {root} "
        "here (or point data_dir at the copy)")
  return builder


def _describe(builder):
  """Returns (image_shape (H, W, C), num_classes) from the tfds features."""
  features = builder.info.features
  name = builder.info.name
  if "image" not in features:
    raise UserError(f"dataset {name!r} has no 'image' feature; genflax's "
                    "image models need one")
  image = features["image"]
  shape = tuple(image.shape) + (1,) * (len(image.shape) == 2)  # HxW -> HxWx1
  if len(shape) != 3 or None in shape or np.dtype(image.np_dtype) != np.uint8:
    raise UserError(f"dataset {name!r} has images of shape {image.shape} and "
                    f"dtype {image.np_dtype}; genflax needs fixed-size uint8")
  label = features["label"] if "label" in features else None
  num_classes = label.num_classes if isinstance(
      label, tfds.features.ClassLabel) else 0
  return shape, num_classes


def _data_source(builder):
  try:
    return builder.as_data_source()
  except NotImplementedError:
    # Only tfrecord-prepared data lands here: reading it needs TensorFlow.
    name = builder.info.name
    raise UserError(
        f"dataset {name!r} in {builder.data_dir} is stored as "
        f"{builder.info.file_format.value}, which genflax cannot read without "
        f"TensorFlow; rebuild it with `tfds build {name} "
        f"--data_dir={builder.data_dir_root} --file_format=array_record` "
        "into an empty directory") from None


def _splits(builder, *names):
  missing = [s for s in names if s not in builder.info.splits]
  if missing:
    raise UserError(f"dataset {builder.info.name!r} lacks split(s) {missing}; "
                    f"it has {list(builder.info.splits)}")
  return names


def _stamp(directory: str) -> tuple:
  """(name, size, mtime) of each file in a prepared dataset's directory."""
  stats = ((e.name, e.stat()) for e in os.scandir(directory) if e.is_file())
  return tuple(sorted((name, st.st_size, st.st_mtime_ns) for name, st in stats))


def _read(source, image_shape, has_label):
  """Decodes a data source into {"image": uint8 [N, H, W, C], "label": [N]}."""
  n = len(source)
  images = np.empty((n, *image_shape), np.uint8)
  labels = np.empty((n,), np.int32)
  for start in range(0, n, _CHUNK):
    records = source.__getitems__(range(start, min(start + _CHUNK, n)))
    stop = start + len(records)
    images[start:stop] = np.stack([r["image"] for r in records]).reshape(
        -1, *image_shape)
    if has_label:
      labels[start:stop] = [r["label"] for r in records]
  return {"image": images, "label": labels} if has_label else {"image": images}
