#!/usr/bin/env bash
# Each family's train step in float32 and in bfloat16, alternated, on this machine:
# the rows behind model.dtype=auto and model.conv=auto (genflax/platform.py).
#   ROUNDS=2 bash benchmarks/dtypes.sh
# Per line: the config, the run (float32; bfloat16 with the auto choices; for the
# image families also bfloat16 with XLA's convolutions, model.conv=forward), then
# hot_loop's dtype, conv, dense_grads, median step ms and, for the LM, cached
# decode tokens/s against the weight-matmul floor's.
set -uo pipefail
cd "$(dirname "$0")/.."
row() {  # label config steps overrides...
  label=$1 cfg=$2 steps=$3; shift 3
  fields=$(python -m benchmarks.hot_loop --config "$cfg" --steps "$steps" --warmup 2 "$@" 2>&1 |
    grep -E '^\| (dtype|conv|dense_grads|step_ms_median|decode_tokens_per_s_cached|decode_tokens_per_s_matvecs_only) ' |
    awk -F'|' '{gsub(/ /, "", $2); gsub(/ /, "", $3); printf "%s=%s ", $2, $3}')
  echo "$cfg $label: ${fields:-failed}"
}
images=("configs/dcgan_fashion.py 20" "configs/vae_fashion.py:conv 20"
        "configs/diffusion_fashion.py:conditional 6")
dense=("configs/vae_fashion.py 40" "configs/lm_shakespeare.py:nano 60"
       "configs/lm_shakespeare.py:baby 4")
for r in $(seq "${ROUNDS:-2}"); do
  echo "round $r"
  for f in "${images[@]}"; do
    set -- $f
    row float32 "$1" "$2"
    row "bfloat16 forward" "$1" "$2" model.dtype=bfloat16 model.conv=forward
    row bfloat16 "$1" "$2" model.dtype=bfloat16
  done
  for f in "${dense[@]}"; do
    set -- $f
    row float32 "$1" "$2"
    row bfloat16 "$1" "$2" model.dtype=bfloat16
  done
done
