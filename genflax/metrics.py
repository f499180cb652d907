"""Where numbers and pictures go: console, metrics.jsonl, TensorBoard, PNGs.

Only process 0 writes; the others get a writer that drops everything, so
callers need no `if jax.process_index() == 0`.
"""
import json
import math
import os

import jax
import numpy as np
from PIL import Image

from genflax import files
from genflax.errors import ConfigError


class Writer:
  """One run's outputs in `workdir`: `metrics.jsonl`, TensorBoard events, images/.

  metrics.jsonl is the run's history: a run resumed from the checkpoint at
  `resume_step` first drops the rows an interrupted run wrote after it (and
  any final rows), so after any number of resumes the file holds what one
  uninterrupted run writes; TensorBoard hides the same steps (purge_step).
  """

  def __init__(self, workdir: str, resume_step: int | None = None):
    self.enabled = jax.process_index() == 0
    self.workdir = workdir
    self.logged = set()  # (step, split) of the rows in metrics.jsonl
    if not self.enabled:
      return
    path = os.path.join(workdir, "metrics.jsonl")
    if resume_step is not None:
      self.logged = keep_history(path, resume_step)
    from tensorboardX import SummaryWriter  # Imported here: only process 0 writes.
    self._tb = SummaryWriter(logdir=os.path.join(workdir, "tb"),
                             purge_step=None if resume_step is None else resume_step + 1)
    self._jsonl = open(path, "a")

  def scalars(self, step: int, split: str, values: dict) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in values.items()}
    self._jsonl.write(json.dumps({"step": step, "split": split, **values}) + "\n")
    self._jsonl.flush()
    self.logged.add((step, split))
    for k, v in values.items():
      self._tb.add_scalar(f"{split}/{k}", v, step)

  def image_grid(self, step: int, name: str, grid: np.ndarray) -> str | None:
    """Writes a [rows, cols, H, W, C] array in [0, 1] as one PNG and to TensorBoard."""
    if not self.enabled:
      return None
    picture = tile(grid)
    os.makedirs(os.path.join(self.workdir, "images"), exist_ok=True)
    path = os.path.join(self.workdir, "images", f"{name}_{step:07d}.png")
    files.write_atomically(path, lambda f: save_png(f, picture))
    self._tb.add_image(name, picture, step, dataformats="HWC")
    return path

  def image_grids(self, step: int, grids: dict) -> None:
    for name, grid in grids.items():
      self.image_grid(step, name, grid)

  def text(self, step: int, name: str, text: str) -> None:
    if self.enabled:
      self._tb.add_text(name, text, step)

  def flush(self) -> None:
    if self.enabled:
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def keep_history(path: str, step: int) -> set:
  """Drops the rows of metrics.jsonl after `step`, final rows and a torn last line
  (and says so of any other line it cannot read); returns the (step, split) of the
  rows kept."""
  if not os.path.exists(path):
    return set()
  lines = _lines(path, keepends=True)
  kept, unreadable = [], 0
  for i, line in enumerate(lines):
    row = _row(line)
    if row is None:
      unreadable += i < len(lines) - 1 or line.endswith("\n")  # not a torn last line
    elif row["step"] <= step and row["split"] != "final":
      kept.append(line if line.endswith("\n") else line + "\n")
  if unreadable:
    print(f"{path}: {unreadable} unreadable line(s) dropped; the other rows are kept", flush=True)
  if kept != lines:
    files.write_atomically(path, lambda f: f.write("".join(kept).encode()))
  return {(r["step"], r["split"]) for r in map(_row, kept)}


def read_rows(path: str) -> list[dict]:
  """The rows of a metrics.jsonl ([] without one), skipping lines that are not rows."""
  if not os.path.exists(path):
    return []
  return [row for row in map(_row, _lines(path)) if row is not None]


def _lines(path: str, keepends: bool = False) -> list[str]:
  """A text file's lines, bytes that are not UTF-8 replaced (they make no row)."""
  with open(path, "rb") as f:
    return f.read().decode("utf-8", errors="replace").splitlines(keepends)


def _row(line: str) -> dict | None:
  """A metrics.jsonl row, or None where the line is not one."""
  try:
    row = json.loads(line)
  except ValueError:
    return None
  ok = (isinstance(row, dict) and isinstance(row.get("step"), int)
        and isinstance(row.get("split"), str))
  return row if ok else None


def tile(grid: np.ndarray, pad: int = 1) -> np.ndarray:
  """[R, C, H, W, ch] -> one [R*(H+pad)+pad, C*(W+pad)+pad, ch] picture, grey gaps."""
  rows, cols, h, w, ch = grid.shape
  out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, ch), 0.5, np.float32)
  for r in range(rows):
    for c in range(cols):
      y, x = pad + r * (h + pad), pad + c * (w + pad)
      out[y:y + h, x:x + w] = grid[r, c]
  return out


def save_png(f, picture: np.ndarray, min_size: int = 256) -> None:
  """Writes a [H, W, C] float picture in [0, 1] as PNG into the binary file f (one
  that write_atomically gives); small ones are enlarged (nearest)."""
  scale = max(1, math.ceil(min_size / max(picture.shape[:2])))
  pixels = np.clip(picture * 255 + 0.5, 0, 255).astype(np.uint8)
  pixels = pixels.repeat(scale, 0).repeat(scale, 1)
  if pixels.shape[-1] == 1:
    pixels = pixels[..., 0]
  Image.fromarray(pixels).save(f, format="PNG")


def sample_grid(num: int, label, num_classes: int | None):
  """The layout of `genflax.sample`'s PNG: (rows, cols, labels).

  At least `num` images, 8 per row. For a conditional model (num_classes
  given) labels [rows * cols] are `label` everywhere, or row r's class r
  mod num_classes; otherwise None, and a label is an error.
  """
  cols = 8
  rows = max(1, -(-num // cols))
  check_label(label, num_classes)
  if num_classes is None:
    return rows, cols, None
  labels = (np.full(rows * cols, label) if label is not None
            else np.arange(rows * cols) // cols % num_classes)
  return rows, cols, labels


def check_label(label, num_classes: int | None) -> None:
  """`--label`: only for a conditional model (num_classes given), and one of its classes."""
  if num_classes is None and label is not None:
    raise ConfigError("--label needs a conditional model (model.conditional=True)")
  if label is not None and not 0 <= label < num_classes:
    raise ConfigError(f"--label={label}: the model's classes are 0 to {num_classes - 1}")


def save_sample_grid(path: str, images, rows: int, cols: int) -> None:
  """images [rows * cols, H, W, C] in [0, 1] -> one PNG grid at path (parents made,
  written whole or not at all)."""
  images = np.asarray(jax.device_get(images))
  picture = tile(images.reshape(rows, cols, *images.shape[1:]))
  files.write_atomically(path, lambda f: save_png(f, picture))
  print(f"wrote {rows * cols} samples to {path}")


def format_duration(seconds: float) -> str:
  seconds = int(seconds)
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  return f"{seconds // 60}m{seconds % 60:02d}s"


def format_values(values: dict) -> str:
  return "  ".join(f"{k} {v:.4g}" for k, v in values.items())
