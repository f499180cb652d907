"""Every file genflax reads or writes, and what it does when one is damaged.

Small files are written whole to a temporary file beside them and renamed
into place (`write_atomically`), so a kill at any moment leaves the old file
or the new one; they are read with `read_json`, which calls anything
unreadable None, so that the caller can say what happens instead of raising.
tests/test_damage.py checks that every write in genflax and the benchmarks
goes through `write_atomically` or is listed there with the reason it need not.

Each file below, and what genflax does when it is missing, damaged (empty,
cut short, garbage, JSON of the wrong shape, another experiment's) or cannot
be written. "Rebuilt" files are made again and the run says so in one line;
"refused" means one line naming the file and what to do, exit status 2, no
traceback, nothing in the workdir changed. tests/test_damage.py damages each
rebuildable and refused file in each way; the checkpoint cases are in
tests/test_trainer.py, the output paths' in the commands' own tests.

A run's workdir (genflax.main):

  config.json          The run's config, written before the first step.
                       Missing: written. Damaged: rebuilt from the command's
                       config when the newest checkpoint names the same
                       experiment (every save does), else refused. Another
                       experiment's: refused (use another --workdir).
  checkpoints/<step>/  Orbax checkpoints, committed whole or not at all. The
                       newest unreadable: set aside as <step>.unreadable and
                       the one before resumes; none readable: refused. Another
                       experiment's: refused. Unwritable (full disk, read-only):
                       checked before the first step; a save that fails stops
                       the run in one line naming the newest checkpoint.
  results.json         The final evaluation, written last. Damaged: rebuilt by
                       running the final evaluation again.
  metrics.jsonl        One JSON row per log and evaluation, appended. Rows after
                       the resumed checkpoint and unreadable lines: dropped on
                       resume, said.
  tb/events.out.tfevents.*  TensorBoard's, one file per start of the run (a
                       resumed one tells TensorBoard to drop the steps after
                       its checkpoint); genflax never reads them.
  images/*.png         Sample grids, written atomically; never read.
  run.lock, run.owner  The lock that keeps a second run out (the kernel frees it
                       when its process dies) and who holds it, for the refusal's
                       message; an unreadable run.owner is named as "a process
                       that has not said who it is yet".
  tokenizer/           The LM's tokenizer (chars.json or spm.model). Missing:
                       trained. Damaged: rebuilt (training is deterministic, so
                       the checkpoints still match it).

The data dir (--config.data.data_dir, else TFDS_DATA_DIR or ~/tensorflow_datasets):

  <name>/[<config>/]<version>/  A prepared dataset: dataset_info.json,
                       features.json, the array_record files. Missing:
                       prepared (digits, shakespeare, fashion_mnist, idx: from
                       this machine) or refused (catalogue datasets, which
                       genflax never downloads). Damaged: rebuilt where genflax
                       prepares it, else refused (copy it again). A data dir
                       that cannot take it (read-only, full): refused.
  .<name>.prepare.lock  Processes preparing one dataset take turns through it.
  genflax_features/<dataset>[-steps<N>]/  The feature network that FID and the
                       other image scores use (Orbax). Missing: trained.
                       Damaged: rebuilt.

A sweep's workdir (genflax.sweep):

  sweep.json           The sweep's definition. Damaged: refused (it cannot be
                       recovered; put back a copy or start afresh).
  study.journal        Optuna's journal storage (or --storage's database): the
                       record of every trial. Garbage, JSON of the wrong shape,
                       or emptied while trials/ holds trials: refused (genflax
                       cannot rebuild it). Cut short (a kill or a full disk
                       mid-append): the cut record, a write that never
                       finished, is dropped and said; every one before it kept.
  sweep.lock, locks/<n>.lock  Claims of trials (see genflax/sweep/worker.py).
  trials/<n>/          Each trial's run workdir, as above, and its log.txt.
                       A trial whose results.json is damaged stays running and
                       its run writes it again when the sweep runs again.

Outputs named by --out (genflax.sample, genflax.sweep report, the benchmarks):
their folders are made, or the path is refused before any work (check_output,
check_folder); each file is written atomically.

Inputs named by --prompts and --references (genflax.sample, a language
model's): one text per line, read once. Missing, unreadable, not UTF-8,
empty, with a blank line, or a count of references unlike the prompts':
refused before the checkpoint is loaded.
"""
import json
import os

from genflax.errors import UserError


def read_json(path: str) -> dict | None:
  """The JSON object in a file genflax wrote; None if it is unreadable (cut short,
  overwritten, not an object)."""
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (OSError, ValueError):  # ValueError: bad JSON, or bytes that are not UTF-8
    return None
  return value if isinstance(value, dict) else None


def write_json(path: str, value) -> None:
  """value as indented JSON at path, written atomically (write_atomically)."""
  write_atomically(path, lambda f: f.write(json.dumps(value, indent=2).encode()))


def write_atomically(path: str, write) -> None:
  """write(file object) into a temporary file beside path, then renamed onto path:
  a kill at any moment leaves the old file or the new one. Parent folders are made."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
  try:
    with open(tmp, "wb") as f:
      write(f)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def check_output(path: str, flag: str = "--out") -> None:
  """Makes the folder of an output file a command will write when its work is done,
  or refuses the path (UserError) now, before any work."""
  if os.path.isdir(path):
    raise UserError(f"{flag} {path} is a directory: name a file in it")
  check_folder(os.path.dirname(os.path.abspath(path)), f"{flag} {path}: its folder")


def check_folder(folder: str, what: str = "--out") -> None:
  """Makes an output folder, or refuses it (UserError) now, before any work."""
  if os.path.exists(folder) and not os.path.isdir(folder):
    raise UserError(f"{what} {folder} is a file, not a folder: name another")
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    raise UserError(f"{what} {folder} cannot be made ({e.strerror or e}): name a folder "
                    "where files can be written") from None
  if not os.access(folder, os.W_OK):
    raise UserError(f"{what} {folder} is not writable: name a folder where files can be "
                    "written")
