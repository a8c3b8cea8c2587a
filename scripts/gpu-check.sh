#!/usr/bin/env bash
# Runs the GPU checks of issue 5 on a machine with an NVIDIA GPU, from a
# release build made beforehand (the GPU machine may have no Rust):
#   cargo build --release && cargo test --release --test gpu --no-run
# then, there: scripts/gpu-check.sh OUTDIR
# It runs the GPU tests (CPU vs CUDA bytes for every method and dtype), the
# demo on CUDA, and the 70B-shaped benchmark (chat vector and TIES) on CUDA
# and on the CPU's cores, writing logs and JSON reports into OUTDIR.
set -euo pipefail
out=${1:?usage: scripts/gpu-check.sh OUTDIR}
mkdir -p "$out"
nvidia-smi | tee "$out/nvidia-smi.txt" || true
test_bin=$(ls -t target/release/deps/gpu-* | grep -v '\.d$' | head -1)
"$test_bin" --nocapture 2>&1 | tee "$out/gpu-tests.log"
target/release/chatvec demo --device cuda 2>&1 | tee "$out/demo.log"
data=${BENCH_DIR:-/tmp/bench-data}
for dev in cuda cpu; do
    target/release/chatvec --json bench --shape 70b-layer --dir "$data" --device "$dev" \
        --threads "$(nproc)" --method ties >"$out/bench-70b-layer-$dev.json"
done
