"""Damaged files: what can be rebuilt is rebuilt with one line saying so, what
cannot is named in one line (exit status 2), and the checkpoints are left
byte-identical either way.

The workdir's files: a finished smoke run is copied once per case, one file
damaged, and the same command run again on it. The files genflax rebuilds (a
prepared dataset, the feature network, a tokenizer): each damaged in a copy
and read again, which must say so and give back what the undamaged copy gave.
"""
import ast
import hashlib
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from genflax import data, tokenizers, trainer
from genflax.data import shakespeare
from genflax.errors import UserError
from genflax.tasks import image_metrics
from tests import helpers

COMMAND = ["--config=configs/vae_digits.py:smoke"]


def _damage(path, how: str) -> None:
  """Damages the file at `path`: gone, empty, cut to half, random bytes, or
  valid JSON of the wrong shape."""
  if how == "missing":
    os.remove(path)
    return
  content = open(path, "rb").read()
  damaged = {"empty": b"", "half": content[:len(content) // 2],
             "bytes": os.urandom(max(len(content), 64)), "shape": b"[1, 2, 3]\n"}[how]
  with open(path, "wb") as f:
    f.write(damaged)


def _digest(directory) -> dict:
  """{path relative to directory: sha256 of its bytes} of every file under it."""
  return {os.path.relpath(os.path.join(root, name), directory):
          hashlib.sha256(open(os.path.join(root, name), "rb").read()).hexdigest()
          for root, _, files in os.walk(directory) for name in files}


DAMAGES = ("empty", "half", "bytes", "shape")
CASES = [*(("config.json", how) for how in DAMAGES), ("results.json", "half"),
         ("results.json", "shape")]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished smoke run, and every case run on a damaged copy of it:
  {case: (workdir, CompletedProcess)}, plus the run itself under None."""
  base = tmp_path_factory.mktemp("finished")
  runs = {None: (base / "run", None)}
  assert helpers.cli(*COMMAND, f"--workdir={base / 'run'}").returncode == 0
  commands = []
  for name, how in CASES:
    workdir = base / f"{name}-{how}"
    shutil.copytree(base / "run", workdir)
    _damage(workdir / name, how)
    runs[name, how] = workdir, len(commands)
    commands.append([*COMMAND, f"--workdir={workdir}"])
  # metrics.jsonl with unreadable lines amid its rows, resumed by a longer schedule.
  workdir = base / "metrics"
  shutil.copytree(base / "run", workdir)
  lines = open(workdir / "metrics.jsonl", "rb").read().splitlines(keepends=True)
  with open(workdir / "metrics.jsonl", "wb") as f:
    f.writelines([lines[0], b"\xff\xfe garbage\n", b"[1, 2]\n", b'{"no": "step"}\n', *lines[1:]])
  runs["metrics"] = workdir, len(commands)
  commands.append([*COMMAND, f"--workdir={workdir}", "--config.train.num_steps=16"])
  done = [helpers.cli(*command) for command in commands]
  return {key: (w, done[i] if i is not None else None) for key, (w, i) in runs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name, how", CASES)
def test_a_damaged_file_the_run_can_rebuild_is_rebuilt_and_said_so(finished, name, how):
  run, _ = finished[None]
  workdir, result = finished[name, how]
  assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
  said = {"config.json": f"{workdir / name} is unreadable: checkpoint 12 names this experiment, "
                         "so it is written again from this command's config",
          "results.json": f"{workdir / name} is unreadable: the final evaluation runs again "
                          "to write it"}[name]
  assert said in result.stdout
  rebuilt, original = json.load(open(workdir / name)), json.load(open(run / name))
  if name == "results.json":  # the rerun's final evaluation traced no train step
    assert rebuilt.pop("train_step_traces") == 0 and original.pop("train_step_traces") == 1
  assert rebuilt == original
  assert _digest(workdir / "checkpoints") == _digest(run / "checkpoints")


@pytest.mark.slow
def test_unreadable_history_lines_are_dropped_and_said_so(finished):
  run, _ = finished[None]
  workdir, result = finished["metrics"]
  assert result.returncode == 0, result.stderr
  assert f"{workdir / 'metrics.jsonl'}: 3 unreadable line(s) dropped" in result.stdout
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  before = [r for r in map(json.loads, open(run / "metrics.jsonl")) if r["split"] != "final"]
  assert rows[:len(before)] == before  # the history up to the resumed step, as it was
  assert [(r["step"], r["split"]) for r in rows[len(before):]] == [(16, "train"), (16, "final")]


@pytest.mark.slow
@pytest.mark.parametrize("how", DAMAGES)
def test_a_config_json_that_cannot_be_rebuilt_is_one_line_and_nothing_changes(
    finished, tmp_path, how):
  """Without a checkpoint that names its experiment, config.json cannot be
  told from another experiment's: the run refuses, and so does genflax.sample."""
  run, _ = finished[None]
  workdir = tmp_path / "w"
  shutil.copytree(run, workdir)
  _damage(workdir / "config.json", how)
  for step in ("8", "12"):  # checkpoints saved before saves named their experiment
    meta = workdir / "checkpoints" / step / "meta" / "metadata"
    kept = {k: v for k, v in json.load(open(meta)).items() if k in ("step", "opt_layout")}
    meta.write_text(json.dumps(kept))
  before = _digest(workdir)
  del before["run.owner"]  # names the command that holds the workdir (this one, while it checks)
  result = helpers.cli(*COMMAND, f"--workdir={workdir}")
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
  assert result.stderr.strip() == (
      f"error: {workdir / 'config.json'} is unreadable, and checkpoint 12 does not say which "
      f"experiment wrote it: put back the run's config.json, or move {workdir} away to start "
      "afresh")
  after = _digest(workdir)
  del after["run.owner"]
  assert after == before
  with pytest.raises(UserError, match=r"config.json is unreadable: run the command that "
                                      r"trained .* again, which writes it again"):
    trainer.load_run(str(workdir))


# ---- Files genflax rebuilds

# The prepared digits' files: rebuilt when damaged, or not read (tfds takes the
# features from dataset_info.json).
PREPARED = {"dataset_info.json": "rebuilt", "features.json": "not read",
            "digits-train.array_record-00000-of-00001": "rebuilt",
            "digits-test.array_record-00000-of-00001": "rebuilt"}


@pytest.fixture(scope="module")
def prepared_digits(tmp_path_factory):
  """A data dir with digits prepared, and what loading it gives."""
  data_dir = tmp_path_factory.mktemp("prepared")
  return data_dir, data.load("digits", str(data_dir))


@pytest.mark.parametrize("how", ("missing", "empty", "half", "bytes"))
@pytest.mark.parametrize("name", PREPARED)
def test_a_damaged_prepared_dataset_is_prepared_again_and_said_so(prepared_digits, tmp_path,
                                                                  capsys, name, how):
  data_dir, want = prepared_digits
  shutil.copytree(data_dir / "digits", tmp_path / "digits")
  _damage(tmp_path / "digits" / "1.0.0" / name, how)
  train, test, info = data.load("digits", str(tmp_path))
  said = capsys.readouterr().out.splitlines()
  if PREPARED[name] == "rebuilt":
    assert said[0].startswith(f"the prepared dataset in {tmp_path / 'digits' / '1.0.0'} is "
                              "unreadable (") and said[0].endswith("): it is prepared again"), said
    assert said[1].startswith("preparing digits from ") and len(said) == 2, said
    assert sorted(os.listdir(tmp_path / "digits" / "1.0.0")) == sorted(
        os.listdir(data_dir / "digits" / "1.0.0"))
  else:
    assert not said
  assert info == want[2]
  for got, expected in ((train, want[0]), (test, want[1])):
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])


@pytest.fixture(scope="module")
def feature_network(tmp_path_factory, prepared_digits):
  """A data dir holding the digits feature network of 20 steps, and its features of
  the test images."""
  data_dir, (train, test, info) = prepared_digits
  fn, accuracy = image_metrics.load_or_train(str(data_dir), train, test, info, steps=20)
  return data_dir, fn(image_metrics.scale(test["image"], info.num_levels)), accuracy


# An Orbax checkpoint's files: its tree's description, the index of its data, the
# process's own index (which the first one repeats), the data. Restoring reads
# _METADATA when it is there (the caller gives the tree, so it may be missing) and
# not the process's index.
NETWORK_FILES = ("_METADATA", "manifest.ocdbt", "ocdbt.process_0/manifest.ocdbt",
                 "ocdbt.process_0/d/*")
NOT_READ = {("_METADATA", "missing"), *(("ocdbt.process_0/manifest.ocdbt", how)
                                        for how in ("missing", "empty", "half", "bytes"))}


@pytest.mark.parametrize("how", ("missing", "empty", "half", "bytes"))
@pytest.mark.parametrize("name", NETWORK_FILES)
def test_a_damaged_feature_network_is_trained_again_and_said_so(feature_network, prepared_digits,
                                                                tmp_path, capsys, name, how):
  data_dir, want, accuracy = feature_network
  _, (train, test, info) = prepared_digits
  path = tmp_path / "genflax_features" / "digits-steps20"
  shutil.copytree(data_dir / "genflax_features" / "digits-steps20", path)
  for target in path.glob(name):
    _damage(target, how)
  fn, got_accuracy = image_metrics.load_or_train(str(tmp_path), train, test, info, steps=20)
  said = capsys.readouterr().out.splitlines()
  if (name, how) not in NOT_READ:
    assert said[0].startswith(f"the feature network in {path} is unreadable ("), said
    assert said[0].endswith("): it is trained again") and len(said) == 1, said
  else:
    assert not said
  assert got_accuracy == accuracy
  got = fn(image_metrics.scale(test["image"], info.num_levels))
  np.testing.assert_array_equal(got[0], want[0])
  assert os.listdir(tmp_path / "genflax_features") == ["digits-steps20"]  # nothing left over


TEXT = shakespeare.corpus()[:60_000]


@pytest.fixture(scope="module")
def saved_tokenizers(tmp_path_factory):
  """{kind: (directory, tokenizer)}: a char and a sentencepiece tokenizer trained and saved."""
  out = {}
  for kind, vocab in (("char", 0), ("sentencepiece", 400)):
    directory = tmp_path_factory.mktemp(kind)
    out[kind] = directory, tokenizers.load_or_train(kind, str(directory), TEXT, vocab)
  return out


@pytest.mark.parametrize("kind, how", [*(("char", h) for h in ("empty", "half", "bytes", "shape")),
                                       *(("sentencepiece", h) for h in ("empty", "half", "bytes"))])
def test_a_damaged_tokenizer_is_trained_again_and_said_so(saved_tokenizers, tmp_path, capsys,
                                                          kind, how):
  directory, tokenizer = saved_tokenizers[kind]
  shutil.copytree(directory, tmp_path / "tokenizer")
  path = tmp_path / "tokenizer" / os.listdir(directory)[0]
  _damage(path, how)
  vocab = tokenizer.vocab_size if kind == "sentencepiece" else 0
  again = tokenizers.load_or_train(kind, str(tmp_path / "tokenizer"), TEXT, vocab)
  said = capsys.readouterr().out.splitlines()
  assert len(said) == 1 and said[0].startswith(f"{path} is unreadable ("), said
  assert said[0].endswith("): the tokenizer is trained again from the training text"), said
  assert open(path, "rb").read() == open(directory / path.name, "rb").read()
  np.testing.assert_array_equal(again.encode(TEXT[-3000:]), tokenizer.encode(TEXT[-3000:]))


@pytest.mark.parametrize("how", ["read_only", "full"])
def test_a_data_dir_that_cannot_take_a_prepared_dataset_is_one_line(tmp_path, request, how):
  """Preparing digits into an immutable data dir (chattr +i) or a full disk (a small
  tmpfs, filled): one line naming the folder and the cause, and no half-made dataset
  left there."""
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  if how == "full":
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(data_dir)],
                      capture_output=True, check=False).returncode:
      pytest.skip("cannot mount a small tmpfs here: run the tests as root, where mount is allowed")
    request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(data_dir)], check=False))
    subprocess.run(["dd", "if=/dev/zero", f"of={data_dir}/fill", "bs=4k"], capture_output=True,
                   check=False)
  elif subprocess.run(["chattr", "+i", str(data_dir)], capture_output=True,
                      check=False).returncode:
    pytest.skip("chattr +i does not work here: run the tests as root, with the temporary "
                "directory on ext2/3/4 (chattr is in e2fsprogs)")
  else:
    request.addfinalizer(lambda: subprocess.run(["chattr", "-i", str(data_dir)], check=False))
  with pytest.raises(UserError) as e:
    data.load("digits", str(data_dir))
  message = str(e.value)  # full: tfds finds it so before writing ("Not enough disk space")
  assert message.startswith(f"cannot prepare digits in {data_dir} (") and message.endswith(
      "): give a data dir where files can be written (--config.data.data_dir, or TFDS_DATA_DIR)")
  assert ("Operation not permitted" if how == "read_only" else "disk space") in message
  assert "digits" not in os.listdir(data_dir)


# Writes that do not go through files.write_atomically, each with why it may not.
UNWRAPPED_WRITES = {
    ("genflax/metrics.py", "open"): "metrics.jsonl is appended a line at a time; a line cut "
                                     "short by a kill is dropped on resume (tested above)",
    ("genflax/sweep/worker.py", "open"): "a trial's log.txt is appended, never read back as data",
    ("genflax/checkpoints.py", "open"): "the workdir's write probe, removed at once",
    ("genflax/sweep/study.py", "open"): "study.journal cut back to its last whole record "
                                        "(a truncation, under the journal's lock)",
}
WRITERS = {"savez", "savez_compressed", "save", "savefig", "dump", "write_text", "write_bytes"}


def _unwrapped_writes() -> dict:
  """(file, function) -> lines of every call in genflax/ and benchmarks/ that
  writes a file by name: open() for writing, or np.save*/savefig/json.dump/
  Image.save/Path.write_* given anything but the file object a
  write_atomically callback receives (`f`)."""
  found = {}
  for top in ("genflax", "benchmarks"):
    for folder, _, names in os.walk(os.path.join(helpers.ROOT, top)):
      for name in (n for n in names if n.endswith(".py")):
        path = os.path.join(folder, name)
        rel = os.path.relpath(path, helpers.ROOT)
        if rel == "genflax/files.py":
          continue
        with open(path) as f:
          tree = ast.parse(f.read())
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
          func = call.func
          if isinstance(func, ast.Name) and func.id == "open":
            mode = call.args[1] if len(call.args) > 1 else next(
                (k.value for k in call.keywords if k.arg == "mode"), None)
            if isinstance(mode, ast.Constant) and set(mode.value) & set("wax+"):
              found.setdefault((rel, "open"), []).append(call.lineno)
          elif isinstance(func, ast.Attribute) and func.attr in WRITERS:
            receiver = ast.unparse(func.value)
            if func.attr == "save" and receiver not in ("np", "numpy") and not receiver.startswith(
                "Image"):
              continue  # Orbax's and genflax's own save methods: checked where they write
            first = call.args[0] if call.args else None
            written_to_f = isinstance(first, ast.Name) and first.id == "f"
            if func.attr == "dump":
              second = call.args[1] if len(call.args) > 1 else None
              written_to_f = isinstance(second, ast.Name) and second.id == "f"
            if func.attr in ("write_text", "write_bytes") or not written_to_f:
              found.setdefault((rel, func.attr), []).append(call.lineno)
  return found


def test_every_small_file_is_written_through_the_atomic_writer():
  """A kill during a write leaves the old file or the new one only where the write
  goes through files.write_atomically (its kill test: test_faults.py); every other
  write in genflax and the benchmarks is listed above with its reason."""
  found = _unwrapped_writes()
  assert set(found) == set(UNWRAPPED_WRITES), {k: found.get(k) for k in
                                               set(found) ^ set(UNWRAPPED_WRITES)}
