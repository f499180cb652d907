"""What a sweep costs beyond its trials' training, and what a second worker buys.

    python -m benchmarks.sweep [--out benchmarks/results/sweep.json]

1. Per-trial overhead: the wall time of one trial of configs/vae_digits.py
   that trains a single step (interpreter and imports, data, setup,
   compiling its ~20 programs, the final evaluation with 1,000 importance
   samples, images, checkpoint, exit), first with JAX's compilation cache
   empty, then filled as a sweep's later trials find it; the interpreter
   with genflax's imports alone; and the full default trial (2,000 steps).
2. Throughput: a grid of 12 trials run by `python -m genflax.sweep` with
   --workers 1, then 2, each in a fresh workdir (wall time, trials per minute
   and the ratio), for two configs: the default VAE (latent size x beta x two
   seeds) and the MLP GAN (loss x noise size x two seeds). A lone worker's
   trial already uses the second core in its final evaluation (IWAE with
   1,000 samples; FID through the feature network), which bounds the ratio.

The trials run as the sweep runs them, one CPU device each (XLA_FLAGS is
dropped from their environment).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

from genflax import errors, files
from genflax.sweep import worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEPS = {
    "vae": ("configs/vae_digits.py", "iwae_nll",
            {"model.latent_dim": "[4, 8, 16]", "model.beta": "[0.5, 1.0]", "seed": "[0, 1]"}),
    "gan": ("configs/gan_digits.py", "fid",
            {"loss.kind": "[ns, hinge]", "model.latent_dim": "[32, 64, 100]", "seed": "[0, 1]"}),
}


def env(cache: str | None = None) -> dict:
  e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if cache:  # what a sweep's worker gives its trials (genflax/sweep/worker.py)
    e.update(worker.compile_cache(cache))
  return e


def timed(command: list[str], cache: str | None = None) -> tuple[float, str]:
  start = time.time()
  out = subprocess.run(command, cwd=ROOT, env=env(cache), capture_output=True, text=True,
                       check=True)
  return time.time() - start, out.stdout


def overhead(tmp: str) -> dict:
  """Seconds of one trial's parts; `warm`: with the compilation cache already filled."""
  imports, _ = timed([sys.executable, "-c",
                      "import genflax.trainer, genflax.tasks.vae, tensorflow_datasets"])
  main = [sys.executable, "-m", "genflax.main", "--config=configs/vae_digits.py"]
  out = {"python_and_imports_s": imports}
  for run in ("cold", "warm"):
    wall, log = timed([*main, f"--workdir={tmp}/one_{run}", "--config.train.num_steps=1"], tmp)
    out[f"one_step_trial_{run}_s"] = wall
    out[f"first_step_{run}_s"] = float(re.search(r"compiled and ran in ([\d.]+)s", log).group(1))
  out["default_trial_warm_s"], _ = timed([*main, f"--workdir={tmp}/full"], tmp)
  return out


def sweep(tmp: str, name: str, workers: int) -> dict:
  config, metric, grid = SWEEPS[name]
  workdir = os.path.join(tmp, f"{name}_workers{workers}")
  wall, out = timed([sys.executable, "-m", "genflax.sweep", f"--config={config}",
                     f"--workdir={workdir}", f"--metric={metric}", f"--workers={workers}",
                     *(f"--param={k}={v}" for k, v in grid.items())])
  assert "12 complete" in out, out
  return {"sweep": name, "config": config, "workers": workers, "trials": 12, "wall_s": wall,
          "trials_per_min": 12 / wall * 60}


@errors.one_line
def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--out")
  args = p.parse_args()
  if args.out:
    files.check_output(args.out)
  with tempfile.TemporaryDirectory() as tmp:
    result = {"overhead": overhead(tmp), "cpus": len(os.sched_getaffinity(0))}
    result["sweeps"] = [sweep(tmp, name, w) for name in SWEEPS for w in (1, 2)]
  result["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                    capture_output=True, text=True, check=False).stdout.strip()
  o = result["overhead"]
  print(f"per trial: python + imports {o['python_and_imports_s']:.1f} s; a 1-step trial "
        f"{o['one_step_trial_cold_s']:.1f} s cold (first step {o['first_step_cold_s']:.1f} s), "
        f"{o['one_step_trial_warm_s']:.1f} s with the compilation cache (first step "
        f"{o['first_step_warm_s']:.1f} s); the default 2,000-step trial "
        f"{o['default_trial_warm_s']:.1f} s")
  runs = result["sweeps"]
  for r in runs:
    print(f"{r['config']}: {r['trials']} trials, {r['workers']} worker(s): {r['wall_s']:.1f} s "
          f"({r['trials_per_min']:.1f} trials/min)")
  result["speedup_2_workers"] = {}
  for one, two in zip(runs[::2], runs[1::2]):
    result["speedup_2_workers"][one["sweep"]] = one["wall_s"] / two["wall_s"]
    print(f"{one['config']}: 2 workers / 1 worker: {one['wall_s'] / two['wall_s']:.2f}x")
  if args.out:
    files.write_json(args.out, result)


if __name__ == "__main__":
  main()
