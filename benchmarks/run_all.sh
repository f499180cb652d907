#!/usr/bin/env bash
# Every family's hot loop on this machine; JSON per run in benchmarks/results/.
#   bash benchmarks/run_all.sh        the CPU rows (benchmarks/README.md)
#   bash benchmarks/run_all.sh gpu    on the accelerators: each family in float32
#                                     and bfloat16, the LM at nano and baby size;
#                                     JSON in benchmarks/results/gpu/
# A row that fails is named at the end (exit status 1); the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-cpu}
out=benchmarks/results
failed=()
run() {
  name=$1; shift
  python -m benchmarks.hot_loop --out "$out/$name.json" "$@" > /dev/null || failed+=("$name")
}
finish() {
  python -m benchmarks.summarize "$out"/*.json
  if [ ${#failed[@]} -gt 0 ]; then echo "rows that failed: ${failed[*]}"; exit 1; fi
}
fashion=/usr/share/datasets/fashion-mnist
if [ "$mode" = gpu ]; then
  out=benchmarks/results/gpu
  mkdir -p "$out"
  for dtype in float32 bfloat16; do
    run "vae_conv_$dtype" --config configs/vae_digits.py:conv --steps 100 model.dtype=$dtype
    run "dcgan_$dtype" --config configs/dcgan_digits.py --steps 100 model.dtype=$dtype
    run "cgan_$dtype" --config configs/cgan_digits.py --steps 100 model.dtype=$dtype
    run "diffusion_$dtype" --config configs/diffusion_digits.py --steps 100 model.dtype=$dtype
    run "lm_nano_$dtype" --config configs/lm_shakespeare.py:nano --steps 100 model.dtype=$dtype
    run "lm_baby_$dtype" --config configs/lm_shakespeare.py:baby --steps 50 model.dtype=$dtype \
        train.microbatches=1
    if [ -d $fashion ]; then  # 28x28 Fashion-MNIST, batch 256
      fm="data.batch_size=256 model.dtype=$dtype"
      run "dcgan28_b256_$dtype" --config configs/dcgan_fashion.py --steps 100 $fm
      run "cgan28_b256_$dtype" --config configs/dcgan_fashion.py:conditional --steps 100 $fm
      run "vae_conv28_b256_$dtype" --config configs/vae_fashion.py:conv --steps 100 $fm
      run "vae_mlp28_b256_$dtype" --config configs/vae_fashion.py --steps 100 $fm
      run "diffusion28_b256_$dtype" --config configs/diffusion_fashion.py --steps 50 $fm
    fi
  done
  if [ -d $fashion ]; then  # the CPU's convolutions on the GPU, against XLA's (auto there)
    for impl in forward matmul; do
      run "dcgan28_b256_float32_$impl" --config configs/dcgan_fashion.py --steps 100 \
          data.batch_size=256 model.conv=$impl
      run "vae_conv28_b256_float32_$impl" --config configs/vae_fashion.py:conv --steps 100 \
          data.batch_size=256 model.conv=$impl
    done
  fi
  finish
fi
mkdir -p "$out"
# Two local processes with one CPU device each, through jax.distributed (gloo).
run2() {
  name=$1; shift
  port=$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  for i in 1 0; do
    XLA_FLAGS=--xla_force_host_platform_device_count=1 python -m benchmarks.hot_loop --coordinator_address "127.0.0.1:$port" --num_processes 2 \
        --process_id $i --out "$out/$name.json" "$@" > /dev/null &
  done
  wait
}
run vae_mlp --config configs/vae_digits.py --steps 200
run vae_mlp_hostfeed --config configs/vae_digits.py --steps 200 data.on_device_mb=0
run vae_conv --config configs/vae_digits.py:conv --steps 100
run gan_mlp --config configs/gan_digits.py --steps 200
run gan_mlp_hostfeed --config configs/gan_digits.py --steps 200 data.on_device_mb=0
run vae_conv_xla --config configs/vae_digits.py:conv --steps 100 model.conv=xla
run dcgan --config configs/dcgan_digits.py --steps 100
run dcgan_xla --config configs/dcgan_digits.py --steps 100 model.conv=xla
run cgan --config configs/cgan_digits.py --steps 100
run cgan_xla --config configs/cgan_digits.py --steps 100 model.conv=xla
run diffusion --config configs/diffusion_digits.py --steps 50
# 28x28 Fashion-MNIST (Debian's dataset-fashion-mnist), batch 64 and 256.
if [ -d $fashion ]; then
  for b in 64 256; do
    fm="data.batch_size=$b"
    run "dcgan28_b$b" --config configs/dcgan_fashion.py --steps 20 $fm
    run "cgan28_b$b" --config configs/dcgan_fashion.py:conditional --steps 20 $fm
    run "vae_conv28_b$b" --config configs/vae_fashion.py:conv --steps 20 $fm
    run "vae_mlp28_b$b" --config configs/vae_fashion.py --steps 50 $fm
  done
  run dcgan28_b256_xla --config configs/dcgan_fashion.py --steps 10 $fm model.conv=xla
  run vae_conv28_b256_xla --config configs/vae_fashion.py:conv --steps 10 $fm model.conv=xla
fi
XLA_FLAGS=--xla_force_host_platform_device_count=1 run lm_nano_1dev --config configs/lm_shakespeare.py:nano --steps 200
XLA_FLAGS=--xla_force_host_platform_device_count=2 run lm_nano_2dev \
    --config configs/lm_shakespeare.py:nano --steps 200 mesh.data=2
XLA_FLAGS=--xla_force_host_platform_device_count=2 run lm_nano_2dev_flat \
    --config configs/lm_shakespeare.py:nano --steps 200 mesh.data=2 train.grad_allreduce=flat
XLA_FLAGS=--xla_force_host_platform_device_count=2 run lm_nano_2dev_per_param \
    --config configs/lm_shakespeare.py:nano --steps 200 mesh.data=2 train.grad_allreduce=per_param
XLA_FLAGS=--xla_force_host_platform_device_count=2 run lm_nano_2dev_xla_grads \
    --config configs/lm_shakespeare.py:nano --steps 200 mesh.data=2 model.dense_grads=xla
run2 lm_nano_2proc --config configs/lm_shakespeare.py:nano --steps 100 mesh.data=2
run2 lm_nano_2proc_flat --config configs/lm_shakespeare.py:nano --steps 100 mesh.data=2 \
    train.grad_allreduce=flat
run2 lm_nano_2proc_per_param --config configs/lm_shakespeare.py:nano --steps 20 mesh.data=2 \
    train.grad_allreduce=per_param
XLA_FLAGS=--xla_force_host_platform_device_count=1 run lm_baby_1dev --config configs/lm_shakespeare.py:baby --steps 4 --warmup 1
XLA_FLAGS=--xla_force_host_platform_device_count=2 run lm_baby_2dev \
    --config configs/lm_shakespeare.py:baby --steps 4 --warmup 1 mesh.data=2
XLA_FLAGS=--xla_force_host_platform_device_count=2 run lm_baby_2dev_per_param \
    --config configs/lm_shakespeare.py:baby --steps 4 --warmup 1 mesh.data=2 train.grad_allreduce=per_param
XLA_FLAGS=--xla_force_host_platform_device_count=2 run lm_baby_2dev_1micro \
    --config configs/lm_shakespeare.py:baby --steps 4 --warmup 1 mesh.data=2 train.microbatches=1
finish
