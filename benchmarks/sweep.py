"""What a sweep costs beyond its trials' training, and what a second worker buys.

    python -m benchmarks.sweep [--trials 12] [--out benchmarks/results/sweep.json]

1. Per-trial overhead: the wall time of one trial of configs/vae_digits.py
   that trains a single step, split into the interpreter with genflax's
   imports, the rest up to the first step (data, setup, compiling the step),
   and what follows (final evaluation: IWAE with 1,000 samples, images,
   checkpoint, exit); beside it, the full default trial (2,000 steps).
2. Throughput: the same grid of `--trials` default VAE trials (latent size x
   beta) run by `python -m genflax.sweep` with --workers 1, then 2, each in
   a fresh workdir: wall time, trials per minute and the ratio.

The trials run as the sweep runs them, one CPU device each (XLA_FLAGS is
dropped from their environment).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID = {"model.latent_dim": [2, 4, 8, 16, 32, 64], "model.beta": [0.5, 1.0, 2.0, 4.0]}


def env() -> dict:
  return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def timed(command: list[str]) -> tuple[float, str]:
  start = time.time()
  out = subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True, check=True)
  return time.time() - start, out.stdout


def overhead(tmp: str) -> dict:
  imports, _ = timed([sys.executable, "-c",
                      "import genflax.trainer, genflax.tasks.vae, tensorflow_datasets"])
  main = [sys.executable, "-m", "genflax.main", "--config=configs/vae_digits.py"]
  one, log = timed([*main, f"--workdir={tmp}/one", "--config.train.num_steps=1"])
  compiled = float(re.search(r"compiled and ran in ([\d.]+)s", log).group(1))
  full, _ = timed([*main, f"--workdir={tmp}/full"])
  return {"python_and_imports_s": imports, "one_step_trial_s": one, "first_step_compile_s": compiled,
          "default_trial_s": full}


def sweep(tmp: str, workers: int, trials: int) -> dict:
  workdir = os.path.join(tmp, f"workers{workers}")
  params = [f"--param={k}={v}" for k, v in GRID.items()]
  wall, out = timed([sys.executable, "-m", "genflax.sweep", "--config=configs/vae_digits.py",
                     f"--workdir={workdir}", "--metric=iwae_nll", f"--trials={trials}",
                     f"--workers={workers}", *params])
  assert f"{trials} complete" in out, out
  return {"workers": workers, "trials": trials, "wall_s": wall, "trials_per_min": trials / wall * 60}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--trials", type=int, default=12)
  p.add_argument("--out")
  args = p.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    result = {"overhead": overhead(tmp), "cpus": len(os.sched_getaffinity(0))}
    runs = [sweep(tmp, w, args.trials) for w in (1, 2)]
  result["sweeps"] = runs
  result["speedup_2_workers"] = runs[0]["wall_s"] / runs[1]["wall_s"]
  result["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip()
  o = result["overhead"]
  print(f"per trial: python + imports {o['python_and_imports_s']:.1f} s; a 1-step trial "
        f"{o['one_step_trial_s']:.1f} s (first step compiled in {o['first_step_compile_s']:.1f} s); "
        f"the default 2,000-step trial {o['default_trial_s']:.1f} s")
  for r in runs:
    print(f"{r['trials']} trials, {r['workers']} worker(s): {r['wall_s']:.1f} s "
          f"({r['trials_per_min']:.1f} trials/min)")
  print(f"2 workers / 1 worker: {result['speedup_2_workers']:.2f}x")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
