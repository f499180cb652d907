"""Tests for genflax.data: the digits builder, IDX files and datasets, catalogue loading,
batches."""

import json
import logging
import os
import shutil
import threading

from etils import epath
import filelock
import numpy as np
import pytest
from sklearn import datasets as sk_datasets
import tensorflow_datasets as tfds

import jax

from genflax import data, sharding
from genflax.data import digits, fashion_mnist, idx
from genflax.errors import ConfigError, UserError
from tests import helpers


class GenflaxTestImages(tfds.core.GeneratorBasedBuilder):
  """A catalogue-style dataset: 12 train / 4 test random 5x4x3 images."""

  VERSION = tfds.core.Version("1.0.0")
  # tfds infers both paths from the module's package, and a test module is no
  # package (and see digits.Digits.code_path); give them directly.
  code_path = epath.Path(__file__)
  pkg_dir_path = epath.Path(__file__).parent

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(5, 4, 3), dtype=np.uint8),
        "label": tfds.features.ClassLabel(num_classes=3),
    }))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(12), "test": self._generate_examples(4)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"image": _test_image(i, (5, 4, 3)), "label": i % 3}


class GenflaxTestGrey(tfds.core.GeneratorBasedBuilder):
  """Unlabelled HxW images (no channel axis): 6 train / 2 test, 6x6."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = epath.Path(__file__)
  pkg_dir_path = epath.Path(__file__).parent

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(6, 6), dtype=np.uint8),
    }))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(6), "test": self._generate_examples(2)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"image": _test_image(i, (6, 6))}


def _test_image(i, shape):
  return np.random.default_rng(i).integers(0, 256, shape, dtype=np.uint8)


def _prepare(builder_cls, data_dir):
  builder_cls(data_dir=data_dir, file_format="array_record").download_and_prepare()


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds_digits"))


@pytest.fixture(scope="session")
def loaded_digits(digits_dir):
  return data.load("digits", data_dir=digits_dir)


@pytest.fixture(scope="session")
def catalogue_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds_catalogue"))
  _prepare(GenflaxTestImages, data_dir)
  _prepare(GenflaxTestGrey, data_dir)
  return data_dir


# --- digits -----------------------------------------------------------------


def test_digits_contents(loaded_digits):
  train, test, info = loaded_digits
  assert info == data.DatasetInfo("digits", (8, 8, 1), 10, 17, 1437, 360)
  for split, n in ((train, 1437), (test, 360)):
    assert split["image"].shape == (n, 8, 8, 1)
    assert split["image"].dtype == np.uint8 and split["label"].dtype == np.int32
    assert split["image"].max() <= 16
    assert set(split["label"]) == set(range(10))


def test_digits_are_sklearns_digits(loaded_digits):
  train, test, _ = loaded_digits
  ours = np.concatenate([_rows(train), _rows(test)])
  sk = sk_datasets.load_digits()
  theirs = np.concatenate(
      [sk.images.reshape(-1, 64).astype(np.uint8), sk.target[:, None]], axis=1)
  np.testing.assert_array_equal(_sorted_rows(ours), _sorted_rows(theirs))


def _rows(split):
  """[N, 65]: each image's 64 pixels, then its label."""
  return np.concatenate(
      [split["image"].reshape(-1, 64), split["label"][:, None]], axis=1)


def _sorted_rows(a):
  return a[np.lexsort(a.T[::-1])]


def test_digits_second_load_reuses_data(digits_dir, loaded_digits, monkeypatch):
  before = _snapshot(digits_dir)
  def no_rebuild(*args, **kwargs):
    raise AssertionError("digits was generated again")
  monkeypatch.setattr(digits.Digits, "_split_generators", no_rebuild)
  train, test, info = data.load("digits", data_dir=digits_dir)
  assert _snapshot(digits_dir) == before
  for new, old in ((train, loaded_digits[0]), (test, loaded_digits[1])):
    np.testing.assert_array_equal(new["image"], old["image"])
    np.testing.assert_array_equal(new["label"], old["label"])
  assert info == loaded_digits[2]


def _snapshot(root):
  """{path: mtime_ns} of everything under root."""
  return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
          for d, dirs, files in os.walk(root) for f in dirs + files}


def test_digits_concurrent_prepare_keeps_winners_copy(tmp_path, loaded_digits):
  winner = digits.Digits(data_dir=str(tmp_path), file_format="array_record")
  loser = digits.Digits(data_dir=str(tmp_path), file_format="array_record")
  generate = loser._download_and_prepare
  def race(**kwargs):  # the winner finishes while the loser is generating
    winner.download_and_prepare()
    return generate(**kwargs)
  loser._download_and_prepare = race
  digits.prepare(loser)
  train, test, _ = data.load("digits", data_dir=str(tmp_path))
  # Preparing is deterministic: this copy equals the one built elsewhere.
  np.testing.assert_array_equal(train["image"], loaded_digits[0]["image"])
  np.testing.assert_array_equal(test["label"], loaded_digits[1]["label"])
  assert sorted(os.listdir(tmp_path / "digits")) == ["1.0.0"]  # no tmp dirs


def test_processes_preparing_one_data_dir_take_turns(tmp_path, loaded_digits):
  """While one process generates a dataset it holds a lock file beside it:
  the processes of a multi-host run, reaching a fresh data dir together,
  prepare it one at a time (at once, one's rename into place failed)."""
  first = digits.Digits(data_dir=str(tmp_path), file_format="array_record")
  generating, finish = threading.Event(), threading.Event()
  generate = first._download_and_prepare
  def held(**kwargs):  # generating until the test lets it finish
    generating.set()
    finish.wait()
    return generate(**kwargs)
  first._download_and_prepare = held
  thread = threading.Thread(target=digits.prepare, args=(first,))
  thread.start()
  try:
    generating.wait()
    with pytest.raises(filelock.Timeout):  # a second process would wait here
      filelock.FileLock(str(tmp_path / ".digits.prepare.lock")).acquire(timeout=0)
  finally:
    finish.set()
    thread.join()
  second = digits.Digits(data_dir=str(tmp_path), file_format="array_record")
  second._download_and_prepare = lambda **kwargs: pytest.fail("prepared a second time")
  digits.prepare(second)  # it found the data dir unprepared before it took the lock
  train, _, _ = data.load("digits", data_dir=str(tmp_path))
  np.testing.assert_array_equal(train["image"], loaded_digits[0]["image"])


# --- IDX files ----------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("shape", [(7,), (5, 3, 4)], ids=["rank1", "rank3"])
def test_idx_reads_what_was_written(tmp_path, gz, shape):
  array = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  path = str(tmp_path / "x")  # gzip is told by its magic, not the name
  helpers.write_idx(path, array, gz)
  got = idx.read(path)
  assert got.dtype == np.uint8 and got.shape == shape
  np.testing.assert_array_equal(got, array)


def test_idx_reads_big_endian_int32(tmp_path):
  array = np.array([[1, -2], [70000, 3]], np.int32)
  helpers.write_idx(tmp_path / "x", array, type_code=0x0C)
  got = idx.read(str(tmp_path / "x"))
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, array)


def test_idx_bad_magic_and_truncated_file_are_clear_errors(tmp_path):
  (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n")
  with pytest.raises(UserError, match=r"png is not an IDX file: it starts with 89 50 4e 47"):
    idx.read(str(tmp_path / "png"))
  helpers.write_idx(tmp_path / "short", np.zeros((4, 3), np.uint8))
  (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-2])
  with pytest.raises(UserError, match=r"\(4, 3\) of uint8, which is 12 bytes, but 10 follow"):
    idx.read(str(tmp_path / "short"))


def _write_mnist_format(directory, seed=0, gz=True):
  """A tiny MNIST-format dataset: 20 train / 10 test random 28x28 images, labels i % 10."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, n in (("train", 20), ("test", 10)):
    images_stem, labels_stem = idx.FILES[split]
    arrays[split] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n) % 10
    for stem, array in zip((images_stem, labels_stem), arrays[split]):
      helpers.write_idx(os.path.join(directory, stem + ".gz" * gz), array, gz)
  return arrays


def test_first_use_says_in_one_line_what_it_prepares_from_where(tmp_path, capsys, caplog):
  """In place of tfds's "Downloading and preparing dataset Unknown size" and its
  warnings about the variant folder it is making, though nothing is downloaded."""
  caplog.set_level(logging.WARNING)
  files = tmp_path / "files"
  _write_mnist_format(files, gz=False)
  tfds_dir = tmp_path / "tfds"
  for _ in range(2):  # prepared, then read
    data.load("digits", str(tfds_dir))
    _, _, info = data.load("idx", str(tfds_dir), str(files))
  assert capsys.readouterr().out.splitlines() == [
      f"preparing digits from scikit-learn's copy of the UCI digits into {tfds_dir}/digits/1.0.0 "
      "(once: later runs read it there)",
      f"preparing idx from the IDX files in {files} into {tfds_dir}/{info.name}/1.0.0 "
      "(once: later runs read it there)"]
  assert caplog.records == [], caplog.text


def test_idx_dataset_reads_any_mnist_format_directory(tmp_path):
  written = _write_mnist_format(tmp_path / "files", gz=False)
  tfds_dir = str(tmp_path / "tfds")
  train, test, info = data.load("idx", tfds_dir, str(tmp_path / "files"))
  assert info.name.startswith("idx/") and info.image_shape == (28, 28, 1)
  assert (info.num_classes, info.num_levels, info.num_train, info.num_test) == (10, 256, 20, 10)
  for got, (images, labels) in ((train, written["train"]), (test, written["test"])):
    np.testing.assert_array_equal(got["image"][..., 0], images)  # in the files' order
    np.testing.assert_array_equal(got["label"], labels)
  # Other files are another dataset, prepared beside the first.
  _write_mnist_format(tmp_path / "other", seed=1)
  other = data.load("idx", tfds_dir, str(tmp_path / "other"))
  assert other[2].name != info.name and len(os.listdir(os.path.join(tfds_dir, "idx"))) == 2
  assert not np.array_equal(other[0]["image"], train["image"])


def test_idx_dataset_needs_a_directory_with_the_four_files(tmp_path):
  _write_mnist_format(tmp_path)
  os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
  with pytest.raises(data.DatasetNotPreparedError,
                     match=f"from {tmp_path}, which lacks t10k-labels-idx1-ubyte"):
    data.load("idx", str(tmp_path / "tfds"), str(tmp_path))
  with pytest.raises(UserError, match="'idx' reads MNIST-format IDX files from the directory "
                     "--config.data.idx_dir names, and it names none"):
    data.load("idx", str(tmp_path / "tfds"))


# --- fashion_mnist -----------------------------------------------------------

NO_FASHION_MNIST = (f"Fashion-MNIST's IDX files are not in {fashion_mnist.DEFAULT_DIR}: "
                    "apt-get install dataset-fashion-mnist (Debian's package; CI installs it)")


@pytest.fixture(scope="module")
def loaded_fashion():
  """Prepared once, into the tests' TFDS_DATA_DIR (tests/conftest.py)."""
  if not os.path.isdir(fashion_mnist.DEFAULT_DIR):
    pytest.skip(NO_FASHION_MNIST)
  return data.load("fashion_mnist")


@pytest.mark.slow
def test_fashion_mnist_is_the_official_split(loaded_fashion):
  train, test, info = loaded_fashion
  assert info == data.DatasetInfo("fashion_mnist", (28, 28, 1), 10, 256, 60_000, 10_000)
  for split, n in ((train, 60_000), (test, 10_000)):
    assert split["image"].shape == (n, 28, 28, 1)
    assert split["image"].dtype == np.uint8 and split["label"].dtype == np.int32
    np.testing.assert_array_equal(np.bincount(split["label"], minlength=10), [n // 10] * 10)
  assert train["image"].mean() / 255 == pytest.approx(0.286, abs=0.001)
  # Record i is image i of the original files.
  files = idx.find(fashion_mnist.DEFAULT_DIR, "fashion_mnist", "")
  np.testing.assert_array_equal(test["image"][..., 0], idx.read(files["t10k-images-idx3-ubyte"]))
  np.testing.assert_array_equal(train["label"], idx.read(files["train-labels-idx1-ubyte"]))


@pytest.mark.slow
def test_fashion_mnist_second_load_reuses_data(loaded_fashion, monkeypatch, tmp_path):
  root = os.path.join(os.environ["TFDS_DATA_DIR"], "fashion_mnist")
  before = _snapshot(root)
  def no_rebuild(*args, **kwargs):
    raise AssertionError("fashion_mnist was generated again")
  monkeypatch.setattr(fashion_mnist.FashionMnist, "_split_generators", no_rebuild)
  # Once prepared, the IDX files are no longer needed.
  monkeypatch.setattr(fashion_mnist.FashionMnist, "DEFAULT_DIR", str(tmp_path))
  train, test, info = data.load("fashion_mnist")
  assert _snapshot(root) == before and info == loaded_fashion[2]
  np.testing.assert_array_equal(train["image"], loaded_fashion[0]["image"])
  np.testing.assert_array_equal(test["label"], loaded_fashion[1]["label"])


def test_fashion_mnist_refuses_other_files(tmp_path):
  _write_mnist_format(tmp_path)
  with pytest.raises(UserError, match="train-images-idx3-ubyte.gz is not Fashion-MNIST's"):
    data.load("fashion_mnist", str(tmp_path / "tfds"), str(tmp_path))


def test_fashion_mnist_missing_files_say_where_and_how(tmp_path, monkeypatch):
  monkeypatch.setattr(fashion_mnist.FashionMnist, "DEFAULT_DIR", str(tmp_path / "nowhere"))
  with pytest.raises(data.DatasetNotPreparedError) as e:
    data.load("fashion_mnist", str(tmp_path / "tfds"))
  message = str(e.value)
  assert f"from {tmp_path / 'nowhere'}, which lacks train-images-idx3-ubyte" in message
  assert "apt-get install dataset-fashion-mnist" in message and fashion_mnist.SITE in message
  assert not os.path.exists(tmp_path / "tfds")  # nothing half-made


@pytest.mark.slow
def test_fashion_mnist_missing_files_through_the_cli(tmp_path):
  """A fresh data dir: the tests' own has fashion_mnist prepared, so needs no files."""
  (tmp_path / "empty").mkdir()
  result = helpers.cli("--config=configs/vae_digits.py:smoke", f"--workdir={tmp_path / 'w'}",
                       "--config.data.name=fashion_mnist",
                       f"--config.data.idx_dir={tmp_path / 'empty'}",
                       f"--config.data.data_dir={tmp_path / 'tfds'}")
  assert result.returncode == 2, result.stdout + result.stderr
  assert "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: dataset 'fashion_mnist' reads MNIST-format IDX files from "
                         f"{tmp_path / 'empty'}, which lacks")
  assert "dataset-fashion-mnist" in last and fashion_mnist.SITE in last


# --- catalogue datasets -----------------------------------------------------


def test_catalogue_dataset_loads(catalogue_dir):
  train, test, info = data.load("genflax_test_images", data_dir=catalogue_dir)
  assert info == data.DatasetInfo("genflax_test_images", (5, 4, 3), 3, 256, 12, 4)
  assert train["image"].shape == (12, 5, 4, 3) and test["image"].shape == (4, 5, 4, 3)
  assert train["image"].dtype == np.uint8 and train["label"].dtype == np.int32
  # Records come back in a shuffled order; the pairing must survive it.
  for image, label in zip(train["image"], train["label"]):
    i = next(i for i in range(12) if np.array_equal(_test_image(i, (5, 4, 3)), image))
    assert label == i % 3


def test_a_process_decodes_a_prepared_dataset_once(catalogue_dir):
  first = data.load("genflax_test_images", data_dir=catalogue_dir)
  again = data.load("genflax_test_images", data_dir=catalogue_dir)
  assert again[0]["image"] is first[0]["image"] and again[1]["label"] is first[1]["label"]
  with pytest.raises(ValueError, match="read-only"):  # shared by both loads
    first[0]["image"][0] = 0
  # Files that change (here: their times) are decoded again.
  prepared = os.path.join(catalogue_dir, "genflax_test_images", "1.0.0")
  name = sorted(os.listdir(prepared))[0]
  stat = os.stat(os.path.join(prepared, name))
  os.utime(os.path.join(prepared, name), ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  fresh = data.load("genflax_test_images", data_dir=catalogue_dir)
  assert fresh[0]["image"] is not first[0]["image"]
  np.testing.assert_array_equal(fresh[0]["image"], first[0]["image"])


def test_catalogue_unlabelled_greyscale(catalogue_dir):
  train, test, info = data.load("genflax_test_grey", data_dir=catalogue_dir)
  assert info == data.DatasetInfo("genflax_test_grey", (6, 6, 1), 0, 256, 6, 2)
  assert set(train) == {"image"} and train["image"].shape == (6, 6, 6, 1)
  expected = np.stack([_test_image(i, (6, 6)) for i in range(6)])[..., None]
  np.testing.assert_array_equal(_sorted_rows(train["image"].reshape(6, -1)),
                                _sorted_rows(expected.reshape(6, -1)))


def test_unprepared_catalogue_dataset_says_how_to_build(tmp_path):
  with pytest.raises(data.DatasetNotPreparedError) as e:
    data.load("mnist", data_dir=str(tmp_path))
  message = str(e.value)
  assert "'mnist'" in message and str(tmp_path) in message
  assert (f"tfds build mnist --data_dir={tmp_path} --file_format=array_record"
          in message)


@pytest.mark.parametrize("name", ["dataset_info.json", "records"])
def test_a_damaged_catalogue_dataset_is_one_line_that_says_to_copy_it_again(catalogue_dir,
                                                                            tmp_path, name):
  """Prepared elsewhere (tfds build), so genflax cannot prepare it again."""
  shutil.copytree(os.path.join(catalogue_dir, "genflax_test_images"),
                  tmp_path / "genflax_test_images")
  prepared = tmp_path / "genflax_test_images" / "1.0.0"
  for path in (prepared.glob("*train.array_record*") if name == "records"
               else [prepared / name]):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
  with pytest.raises(UserError) as e:
    data.load("genflax_test_images", data_dir=str(tmp_path))
  message = str(e.value)
  assert message.startswith("dataset 'genflax_test_images' in ") and " is unreadable (" in message
  assert message.endswith("genflax cannot prepare it: copy it again from where `tfds build "
                          f"genflax_test_images --data_dir={tmp_path} --file_format=array_record`"
                          " made it"), message


def test_tfrecord_dataset_says_to_rebuild(catalogue_dir, tmp_path):
  shutil.copytree(os.path.join(catalogue_dir, "genflax_test_images"),
                  tmp_path / "genflax_test_images")
  info_path = tmp_path / "genflax_test_images" / "1.0.0" / "dataset_info.json"
  info = json.loads(info_path.read_text())
  info_path.write_text(json.dumps(dict(info, fileFormat="tfrecord")))
  with pytest.raises(UserError, match="stored as tfrecord.*--file_format=array_record"):
    data.load("genflax_test_images", data_dir=str(tmp_path))


def test_unknown_dataset_name(tmp_path):
  with pytest.raises(UserError, match="unknown dataset 'no_such_dataset'"):
    data.load("no_such_dataset", data_dir=str(tmp_path))


# --- batches ----------------------------------------------------------------


def _batches(n=103, batch_size=10, seed=0, **kwargs):
  arrays = {"index": np.arange(n), "twice": 2 * np.arange(n)}
  return data.Batches(arrays, batch_size, seed, **kwargs)


def test_batches_keep_rows_together():
  batch = _batches().get(3)
  assert batch["index"].shape == (10,)
  np.testing.assert_array_equal(batch["twice"], 2 * batch["index"])


def test_batches_depend_only_on_seed():
  a, b, c = _batches(seed=1), _batches(seed=1), _batches(seed=2)
  for p in range(25):
    np.testing.assert_array_equal(a.get(p)["index"], b.get(p)["index"])
  assert not np.array_equal(a.get(0)["index"], c.get(0)["index"])


def test_each_epoch_is_a_reshuffled_pass_without_repeats():
  batches = _batches(n=103, batch_size=10)
  assert batches.steps_per_epoch == 10  # the last 3 examples are dropped
  epochs = [np.concatenate([batches.get(e * 10 + i)["index"] for i in range(10)])
            for e in range(2)]
  for epoch in epochs:
    assert len(set(epoch)) == 100
  assert not np.array_equal(epochs[0], epochs[1])


def test_jumping_to_a_position_equals_reading_in_order():
  in_order = _batches()
  expected = [in_order.get(p)["index"] for p in range(35)]
  resumed = _batches()
  for p in (27, 3, 34, 10, 9, 0):
    np.testing.assert_array_equal(resumed.get(p)["index"], expected[p])


def test_process_slices_make_up_the_global_batch():
  single = _batches(batch_size=8, process_index=0, process_count=1)
  halves = [_batches(batch_size=8, process_index=p, process_count=2)
            for p in range(2)]
  for position in (0, 5, 13, 40):
    parts = [h.get(position)["index"] for h in halves]
    assert parts[0].shape == (4,)
    np.testing.assert_array_equal(np.concatenate(parts),
                                  single.get(position)["index"])


def test_batch_size_errors():
  with pytest.raises(ConfigError, match="global batch size 104 .* 103"):
    _batches(n=103, batch_size=104)
  with pytest.raises(ConfigError, match="multiple of 3"):
    _batches(batch_size=10, process_index=0, process_count=3)


def test_crops_take_each_row_at_an_offset_drawn_per_epoch():
  """Rows of a stream [N, W] cropped to n: the crop is a contiguous piece of
  its row, offsets cover [0, W - n], change with the epoch, and depend only on
  (seed, epoch), so a resumed run sees the same windows."""
  stream = np.arange(40 * 16).reshape(40, 16)  # row r holds 16r .. 16r + 15
  make = lambda: data.Batches({"tokens": stream, "row": np.arange(40)}, 8, seed=1,
                              crops={"tokens": 9})
  batches = make()
  starts = []
  for position in range(15):  # 5 steps per epoch: 3 epochs
    batch = batches.get(position)
    assert batch["tokens"].shape == (8, 9)
    offset = batch["tokens"][:, 0] - 16 * batch["row"]
    assert ((0 <= offset) & (offset <= 7)).all()
    np.testing.assert_array_equal(batch["tokens"], batch["tokens"][:, :1] + np.arange(9))
    starts.append(dict(zip(batch["row"], offset)))
  epochs = [{k: v for d in starts[e * 5:(e + 1) * 5] for k, v in d.items()} for e in range(3)]
  assert set(np.concatenate([list(e.values()) for e in epochs])) == set(range(8))
  assert epochs[0] != epochs[1] != epochs[2]
  np.testing.assert_array_equal(make().get(12)["tokens"], batches.get(12)["tokens"])
  plain = data.Batches({"tokens": stream, "row": np.arange(40)}, 8, seed=1)
  np.testing.assert_array_equal(plain.get(12)["row"], batches.get(12)["row"])  # same order


@pytest.mark.parametrize("on_device_mb", [0, 1])
def test_feed_gives_the_batches_of_batches_get(on_device_mb):
  """Host-sent or gathered on 8 devices: exactly Batches.get(step), across epochs."""
  rng = np.random.default_rng(0)
  arrays = {"image": rng.normal(size=(50, 4, 4, 1)), "label": rng.integers(0, 10, 50),
            "tokens": rng.integers(0, 99, (50, 12))}
  batches = data.Batches(arrays, 8, seed=3, crops={"tokens": 7})  # 6 steps per epoch
  mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  feed = data.Feed(batches, sharding.batch_sharding(mesh), on_device_mb)
  assert feed.mode == ("device" if on_device_mb else "host")
  get = jax.jit(feed.batch, in_shardings=(feed.shardings, None))
  for step in (0, 5, 6, 13, 5):
    got = get(feed.inputs(step), step)
    want = batches.get(step)
    for key in arrays:
      assert got[key].dtype == {"image": np.float32, "label": np.int32, "tokens": np.int32}[key]
      assert got[key].sharding.is_equivalent_to(sharding.batch_sharding(mesh), got[key].ndim)
      np.testing.assert_array_equal(np.asarray(got[key]), want[key].astype(got[key].dtype))
