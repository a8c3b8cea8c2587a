#!/usr/bin/env bash
# Builds, on a CPU machine, everything the GPU check (scripts/gpu-check.sh)
# runs on a GPU machine that has no Rust toolchain and no network, into one
# folder to carry there (the device tool carries 64 MiB at most):
#   bin/chatvec      the release binary with the bench tools, stripped
#   bin/gpu-tests    the GPU test binary (tests/gpu.rs), stripped
#   wheels/          the pure-Python wheels `chatvec sft` needs beyond what
#                    that machine has (torch, transformers, accelerate, peft,
#                    pandas, pyarrow): trl, datasets, dill, multiprocess
#   MANIFEST.txt     each file with its size, and the total
# The versions are scripts/sft-venv.sh's, the ones chatvec sft was checked
# against.
#
#   scripts/gpu-kit.sh [KIT]      KIT defaults to gpu-kit/ (ignored by git)
set -euo pipefail
cd "$(dirname "$0")/.."
kit=${1:-gpu-kit}
limit=$((60 << 20))

case "$kit" in
    /|.|..|"") echo "gpu-kit.sh: refusing to use '$kit' as the kit folder" >&2; exit 2 ;;
esac
if [ -e "$kit" ] && [ ! -f "$kit/MANIFEST.txt" ] && [ -n "$(ls -A "$kit" 2>/dev/null)" ]; then
    echo "gpu-kit.sh: $kit exists and is not a kit (no MANIFEST.txt); not replacing it" >&2
    exit 2
fi
rm -rf "$kit"
mkdir -p "$kit/bin" "$kit/wheels"

cargo build --release --features bench
# The test binary's path, from cargo's own report of what it built.
tests=$(cargo test --release --features bench --test gpu --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu" and m.get("executable"):
        print(m["executable"])
')
[ -n "$tests" ] || { echo "gpu-kit.sh: cargo built no gpu test binary" >&2; exit 1; }
strip -o "$kit/bin/chatvec" target/release/chatvec
strip -o "$kit/bin/gpu-tests" "$tests"

python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
    -d "$kit/wheels" trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19

(
    cd "$kit"
    find bin wheels -type f -printf '%s\t%p\n' | sort -k2
    find bin wheels -type f -printf '%s\n' | awk '{ s += $1 } END { printf "%d\ttotal\n", s }'
) > "$kit/MANIFEST.txt"
total=$(tail -1 "$kit/MANIFEST.txt" | cut -f1)
cat "$kit/MANIFEST.txt"
if [ "$total" -gt "$limit" ]; then
    echo "gpu-kit.sh: the kit is $total bytes, over the $limit it may carry" >&2
    exit 1
fi
