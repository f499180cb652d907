"""Validation loss against parameter count from a scaling sweep's report, with a fitted power law.

    python experiments/sweep_lm_shakespeare/plot_scaling.py \
        runs/sweep_lm_scaling/report/results.csv experiments/sweep_lm_shakespeare/scaling.png

Fits loss = a * N^(-alpha) by least squares in log-log over the complete
trials (N: every trained parameter, embeddings included) and prints a, alpha.
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
from matplotlib import ticker  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position


def main(results_csv: str, out: str) -> None:
  with open(results_csv) as f:
    rows = [r for r in csv.DictReader(f) if r["state"] == "complete"]
  n = np.array([float(r["num_params"]) for r in rows])
  loss = np.array([float(r["loss"]) for r in rows])
  slope, intercept = np.polyfit(np.log(n), np.log(loss), 1)
  a, alpha = float(np.exp(intercept)), float(-slope)
  fig, ax = plt.subplots(figsize=(6.4, 4.8))
  ax.scatter(n, loss)
  for r, x, y in zip(rows, n, loss):
    ax.annotate(r["model.variant"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
  grid = np.geomspace(n.min() / 1.2, n.max() * 1.2, 50)
  ax.plot(grid, a * grid ** -alpha, "--", label=f"{a:.3g} N^-{alpha:.3f}")
  ax.set(xscale="log", yscale="log", xlabel="parameters N", ylabel="validation loss (nats/char)",
         title="Validation loss after 2,000 steps of 12 x 64 characters")
  for axis in (ax.yaxis,):
    axis.set_major_formatter(ticker.FormatStrFormatter("%.2f"))
    axis.set_minor_formatter(ticker.FormatStrFormatter("%.2f"))
  ax.legend()
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  print(f"fit over {len(rows)} trials: loss = {a:.4g} * N^-{alpha:.4f}")


if __name__ == "__main__":
  main(*sys.argv[1:3])
