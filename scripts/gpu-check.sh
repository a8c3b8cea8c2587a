#!/usr/bin/env bash
# The GPU run (issue 10), from binaries built here beforehand, since the GPU
# machine may have no Rust:
#   cargo build --release --features bench && cargo test --release --features bench --test gpu --no-run
# then, on the GPU machine: scripts/gpu-check.sh OUTDIR
# It runs the GPU tests (CPU vs CUDA bytes for every method and dtype, the
# ignored ones included), the demo on CUDA, the 70B-shaped benchmark (chat vector and
# TIES) on CUDA and on all CPU cores, and a pinned host-to-device copy for
# the PCIe bound, writing logs and JSON reports into OUTDIR.
set -uo pipefail
out=${1:?usage: scripts/gpu-check.sh OUTDIR}
mkdir -p "$out"
nvidia-smi | tee "$out/nvidia-smi.txt" || true
test_bin=$(ls -t target/release/deps/gpu-* | grep -v '\.d$' | head -1)
"$test_bin" --include-ignored --nocapture 2>&1 | tee "$out/gpu-tests.log"
target/release/chatvec demo --device cuda 2>&1 | tee "$out/demo.log"
# The PCIe bound: a pinned 1 GiB host buffer copied to the device, best of 5.
python3 - <<'PY' 2>&1 | tee "$out/pcie.txt"
import time, torch
n = 1 << 30
h = torch.empty(n, dtype=torch.uint8).pin_memory()
d = torch.empty(n, dtype=torch.uint8, device="cuda")
best = 1e9
for _ in range(5):
    torch.cuda.synchronize(); t = time.perf_counter()
    d.copy_(h, non_blocking=True); torch.cuda.synchronize()
    best = min(best, time.perf_counter() - t)
print(f"pinned host-to-device: {n / best / 1e9:.2f} GB/s (1 GiB, best of 5)")
PY
data=${BENCH_DIR:-/tmp/bench-data}
for dev in cuda cpu; do
    target/release/chatvec --json bench --shape 70b-layer --dir "$data" --device "$dev" \
        --threads "$(nproc)" --method ties >"$out/bench-70b-layer-$dev.json" 2>"$out/bench-70b-layer-$dev.log"
done
