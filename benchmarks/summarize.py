"""One markdown row per hot_loop JSON: `python -m benchmarks.summarize benchmarks/results/*.json`."""
import json
import sys

COLUMNS = [("run", "command_config"), ("data", "dataset"), ("processes", "processes"),
           ("devices", "devices"),
           ("batch", "batch_size"), ("micro-batches", "microbatches"),
           ("grad all-reduce", "grad_allreduce"), ("dense grads", "dense_grads"),
           ("convs", "conv"), ("dtype", "dtype"), ("device", "device_kind"), ("batches from", "batches"),
           ("compile s", "compile_s"), ("step ms (p10-p90)", None), ("examples/s", "examples_per_s"),
           ("GFLOP/step model / XLA", None), ("peak GFLOP/s", "peak_matmul_gflops_per_s"),
           ("MFU", "mfu"), ("MFU of datasheet", "mfu_datasheet"),
           ("input share", "input_share_of_step"),
           ("loop waits on input", "loop_time_waiting_on_input"), ("host MB", "peak_host_mem_mb"),
           ("KV-cache decode tokens/s (vs recompute; weight matmuls alone)", None)]


def kv_cell(r: dict) -> str:
  if "decode_speedup" not in r:
    return "-"
  cell = (f"{r['decode_tokens_per_s_cached']:,.0f} / {r['decode_tokens_per_s_recompute']:,.0f}"
          f" ({r['decode_speedup']:.1f}x)")
  if "decode_tokens_per_s_matvecs_only" in r:
    cell += f"; {r['decode_tokens_per_s_matvecs_only']:,.0f}"
  return cell


def row(r: dict) -> str:
  cells = []
  for title, key in COLUMNS:
    if title.startswith("step ms"):
      cells.append(f"{r['step_ms_median']:.1f} ({r['step_ms_p10']:.1f}-{r['step_ms_p90']:.1f})")
    elif title.startswith("GFLOP/step"):
      cells.append(f"{r['model_gflops_per_step']:.3g} / {r['xla_gflops_per_step']:.3g}")
    elif title.startswith("KV-cache"):
      cells.append(kv_cell(r))
    elif key in ("mfu", "mfu_datasheet", "input_share_of_step", "loop_time_waiting_on_input"):
      value = r.get(key, float("nan"))
      cells.append("-" if value != value else f"{100 * value:.1f}%")  # nan: not known
    elif isinstance(r.get(key), float):
      cells.append(f"{r[key]:.3g}")
    else:
      cells.append(str(r.get(key, "-")))
  return "| " + " | ".join(cells) + " |"


def main(paths: list[str]) -> None:
  print("| " + " | ".join(t for t, _ in COLUMNS) + " |")
  print("|" + " --- |" * len(COLUMNS))
  for path in paths:
    with open(path) as f:
      print(row(json.load(f)))


if __name__ == "__main__":
  main(sys.argv[1:])
