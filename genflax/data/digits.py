"""The digits dataset that ships inside scikit-learn, as a local tfds builder.

Being real data that needs no download, it is what smoke runs and tests train
on, so it goes through the same tfds format (array_record) as catalogue data.
"""

import contextlib
import errno
import logging
import os
import shutil

from etils import epath
import filelock
import numpy as np
import tensorflow_datasets as tfds

from genflax.errors import UserError

NUM_TRAIN = 1437  # of 1,797; the other 360 are the test split


class Unreadable(Exception):
  """A prepared copy of a LocalBuilder's data that cannot be read back (a file cut
  short, overwritten or missing): its `directory`, which preparing again rebuilds,
  and the `lock` that preparing it takes."""

  def __init__(self, builder, why: Exception):
    self.directory = os.fspath(builder._data_dir)  # pylint: disable=protected-access
    self.lock = _lock_path(builder)
    super().__init__(f"the prepared dataset in {self.directory} is unreadable ({_why(why)})")


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder of data on this machine: preparing it says so in one line (what,
  from where, into where) in place of tfds's download announcements. A prepared
  copy whose description tfds cannot read raises Unreadable."""

  def __init__(self, **kwargs):
    try:
      super().__init__(**kwargs)
    except Exception as e:  # pylint: disable=broad-except  (tfds reading dataset_info.json)
      if not getattr(self, "_data_dir", None):  # failed before tfds named its directory
        raise
      raise Unreadable(self, e) from None

  def source(self) -> str:
    """Where the data comes from, as the line says it."""
    raise NotImplementedError

  def _log_download_bytes(self) -> None:  # tfds: "Downloading and preparing ... Unknown size"
    print(f"preparing {self.name} from {self.source()} into {self.data_dir} "
          "(once: later runs read it there)", flush=True)

  def _log_download_done(self) -> None:  # tfds: "Dataset ... downloaded and prepared"
    pass


class _NoVariantWarnings(logging.Filter):
  """Drops tfds's "Variant folder ... has no dataset_info.json", which it logs
  while it looks for a dataset not prepared yet (the folder preparing makes)."""

  def filter(self, record):
    return not str(record.msg).startswith("Variant folder")


@contextlib.contextmanager
def quiet_lookup():
  """tfds's warnings about unprepared variant folders off, for a builder's lookups."""
  logger, quiet = logging.getLogger("absl"), _NoVariantWarnings()
  logger.addFilter(quiet)
  try:
    yield
  finally:
    logger.removeFilter(quiet)


class Digits(LocalBuilder):
  """sklearn's `load_digits()`: 1,797 real 8x8 handwritten digits, 0..16.

  Split: a permutation seeded with 0 puts its first 1,437 images in "train"
  and the last 360 in "test". Features: image uint8 [8, 8, 1], label 0..9.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Seeded 1,437/360 split of sklearn's digits."}
  # tfds derives this for builders in packages through `importlib_resources`,
  # a backport it only installs for Python < 3.9; give it the file directly.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="sklearn.datasets.load_digits (UCI optdigits test set).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
    )

  def source(self) -> str:
    return "scikit-learn's copy of the UCI digits"

  def _split_generators(self, dl_manager):
    del dl_manager  # the data comes with scikit-learn
    from sklearn import datasets  # slow to import; needed only to prepare
    digits = datasets.load_digits()
    images = digits.images.astype(np.uint8)[..., None]  # [1797, 8, 8, 1]
    perm = np.random.default_rng(0).permutation(len(images))
    train, test = perm[:NUM_TRAIN], perm[NUM_TRAIN:]
    return {
        "train": self._generate_examples(images[train], digits.target[train]),
        "test": self._generate_examples(images[test], digits.target[test]),
    }

  def _generate_examples(self, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image, "label": int(label)}


def prepared_builder(make):
  """make(), a LocalBuilder reading its data dir, once its data is prepared there.
  make(**kwargs) passes kwargs to the builder."""
  with quiet_lookup():
    builder = make(file_format="array_record")
    if not builder.is_prepared():
      prepare(builder)
    return make()


def read_prepared(make, read):
  """read(builder) of prepared_builder(make). A prepared copy found damaged
  (Unreadable, raised by the builder or by read through `reading`) is removed and
  prepared again, with one line saying so. Processes that find it damaged at once
  take turns through the preparing lock: the first rebuilds it, and the others
  then read the new copy."""
  try:
    return read(prepared_builder(make))
  except Unreadable as damaged:
    print(f"{damaged}: it is prepared again", flush=True)
    with filelock.FileLock(damaged.lock):
      try:  # another process may have rebuilt it since this one read it
        with quiet_lookup():
          builder = make()
        if builder.is_prepared():
          return read(builder)
      except Unreadable:
        pass
      shutil.rmtree(damaged.directory, ignore_errors=True)
  return read(prepared_builder(make))


@contextlib.contextmanager
def reading(builder):
  """Errors raised while reading builder's prepared files become Unreadable for a
  LocalBuilder (which read_prepared rebuilds) and a one-line UserError for a
  catalogue dataset (prepared elsewhere, so not here)."""
  try:
    yield
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (array_record's and tfds's errors)
    if isinstance(builder, LocalBuilder):
      raise Unreadable(builder, e) from None
    raise unreadable_catalogue(builder.name, builder.data_dir, builder.data_dir_root, e) from None


def unreadable_catalogue(name: str, directory, root, why: Exception) -> UserError:
  """The error for a damaged catalogue dataset, which was prepared elsewhere."""
  return UserError(
      f"dataset {name!r} in {directory} is unreadable ({_why(why)}); genflax cannot "
      "prepare it: copy it again from "
      f"where `tfds build {name} --data_dir={root} --file_format=array_record` made it")


def _why(error: Exception) -> str:
  """An error as a few words: its type and its message's first line."""
  first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
  return type(error).__name__ + (f": {first}" if first else "")


def _lock_path(builder) -> str:
  """The lock file that preparing builder's data takes, beside its dataset folder."""
  return os.path.join(os.fspath(builder._data_dir_root),  # pylint: disable=protected-access
                      f".{builder.name}.prepare.lock")


def prepare(builder: tfds.core.DatasetBuilder) -> None:
  """Prepares `builder` unless another process has: processes preparing the
  same data dir at once (the processes of a multi-host run, sweep trials)
  take turns through a lock file beside the dataset, and whoever comes second
  finds it prepared."""
  tfds.disable_progress_bar()  # a sub-second build needs no progress bars
  root = os.fspath(builder.data_dir_root)
  made = not os.path.exists(root)
  lock = _lock_path(builder)
  try:
    os.makedirs(root, exist_ok=True)
    with filelock.FileLock(lock):
      if builder.is_prepared():  # re-read: another process may have written it meanwhile
        return
      leftover = os.fspath(builder.data_dir)
      if os.path.isdir(leftover) and os.listdir(leftover):  # tfds renames a whole copy here
        print(f"the prepared dataset in {leftover} is unreadable (its dataset_info.json is "
              "missing): it is prepared again", flush=True)
        shutil.rmtree(leftover)
      try:
        builder.download_and_prepare()
      except OSError as e:
        # Where the lock does not hold (some network file systems), tfds's
        # rename of its private tmp dir into place fails once another process
        # renamed its copy first (FileExistsError if etils saw it there,
        # ENOTEMPTY if it came between etils's check and the rename); the copy
        # there is then complete.
        lost_race = isinstance(e, FileExistsError) or e.errno == errno.ENOTEMPTY
        if not lost_race or not builder.is_prepared():
          raise
  except BaseException as e:
    if made:  # a failed first preparation leaves no data dir behind
      with contextlib.suppress(OSError):
        os.remove(lock)
        os.rmdir(root)
    if isinstance(e, OSError):  # a read-only data dir, a full disk
      raise UserError(
          f"cannot prepare {builder.name} in {root} ({e.strerror or e}): give a data dir "
          "where files can be written (--config.data.data_dir, or TFDS_DATA_DIR)") from None
    raise
