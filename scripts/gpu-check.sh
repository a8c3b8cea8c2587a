#!/usr/bin/env bash
# The GPU check: one command on a GPU machine that has no Rust and no
# network, from a kit built beforehand on a CPU machine
# (scripts/gpu-kit.sh: the stripped release and GPU-test binaries, and the
# wheels chatvec sft needs there). Every step is timed and logged; a step
# that fails never hides the next; the whole run keeps within 8 minutes
# (each step gets what is left, at most its own limit); a table at the end
# says what ran, how it ended and how long it took.
#
#   scripts/gpu-kit.sh                     # here, on the CPU machine
#   scripts/gpu-check.sh OUT               # there (OUT, or $OUT when set)
#   scripts/gpu-check.sh --rehearse OUT    # on a CPU machine: every step
#                                          # that needs no GPU, as CI does
#
# Steps on the GPU: the GPU tests (CPU against CUDA bytes for every method
# and dtype, the ignored ones included); `chatvec demo --device cuda`; the
# pinned host-to-device bound (torch); the 70b-layer bench (chat vector and
# TIES) on cuda and on every CPU core; a 2-step `chatvec sft --fsdp --nproc
# 1` (FSDP2 on one GPU) on a tiny Llama with a chat vector applied; and
# `chatvec eval` on it with the transformers GPU path. The rehearsal runs
# the same steps without a GPU: the test binary's argument parsing
# (`--list`), the demo and a tiny bench on the CPU, the SFT dry run, and
# the eval on the CPU.
#
# OUT gets four files (the device tool brings back at most eight):
# summary.txt, check.log (every step's output under its name), and the
# bench reports bench-cuda.json and bench-cpu.json. Models and runs go to a
# temporary directory. KIT (default gpu-kit) names the kit; PYTHON the
# interpreter with torch (default: $CHATVEC_SFT_PYTHON, else python3);
# BENCH_SHAPE the GPU run's bench shape (default 70b-layer).
set -uo pipefail
cd "$(dirname "$0")/.."

rehearse=0
if [ "${1:-}" = --rehearse ]; then
    rehearse=1
    shift
fi
out=${1:-${OUT:-}}
if [ -z "$out" ]; then
    echo "usage: scripts/gpu-check.sh [--rehearse] OUT   (or OUT=... in the environment)" >&2
    exit 2
fi
kit=${KIT:-gpu-kit}
for f in "$kit/bin/chatvec" "$kit/bin/gpu-tests"; do
    if [ ! -x "$f" ]; then
        echo "gpu-check.sh: $f is missing: build the kit first (scripts/gpu-kit.sh $kit)" >&2
        exit 2
    fi
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
bin=$(cd "$kit/bin" && pwd)/chatvec
tests=$(cd "$kit/bin" && pwd)/gpu-tests
py=${PYTHON:-${CHATVEC_SFT_PYTHON:-python3}}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The test binary was built elsewhere: it finds chatvec through this.
export CHATVEC_BIN="$bin"
export PYTHONUNBUFFERED=1

log="$out/check.log"
summary="$out/summary.txt"
: >"$log"
printf '%-12s %-22s %-18s %8s\n' mode step status seconds >"$summary"
mode=$([ "$rehearse" = 1 ] && echo rehearse || echo gpu)
deadline=$((SECONDS + 470))
failed=0

# step NAME LIMIT CMD...: runs CMD for at most LIMIT seconds (or what is
# left of the run's 8 minutes), its output into check.log under NAME, and
# records how it ended.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((deadline - SECONDS))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 5 ]; then
        skip "$name" "no time left"
        return
    fi
    echo "=== $name: $*" >>"$log"
    local t0=$SECONDS start
    start=$(date +%s%N)
    # A step that is one of the functions below runs in a child bash
    # (timeout runs programs, not functions).
    if declare -F "$1" >/dev/null; then
        timeout --kill-after=10 "$limit" bash -c '"$@"' step "$@" >>"$log" 2>&1
    else
        timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    fi
    local rc=$?
    local ms=$((($(date +%s%N) - start) / 1000000))
    local status=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status="timeout (${limit}s)"
    elif [ "$rc" -ne 0 ]; then
        status="FAIL (exit $rc)"
    fi
    [ "$status" = ok ] || failed=$((failed + 1))
    printf '%-12s %-22s %-18s %8s\n' "$mode" "$name" "$status" "$((ms / 1000)).$((ms % 1000 / 100))" >>"$summary"
    echo "=== $name: $status after $((SECONDS - t0)) s" >>"$log"
    echo "== $name: $status"
}

skip() {
    printf '%-12s %-22s %-18s %8s\n' "$mode" "$1" "skipped" "-" >>"$summary"
    echo "=== $1: skipped ($2)" >>"$log"
    echo "== $1: skipped ($2)"
}

# The wheels chatvec sft needs there (Python 3.12), into a private site
# directory. The rehearsal installs them for 3.12 wherever it runs, to show
# that they install together, and does not import them (its own Python has
# trl already, and may not be 3.12).
wheels() {
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --only-binary=:all: --python-version 3.12 --implementation cp \
        --target "$work/site" "$kit"/wheels/*.whl || return
    ls "$work/site"
    [ "$mode" = rehearse ] ||
        PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" "$py" -c 'import trl, datasets; print("trl", trl.__version__, "datasets", datasets.__version__)'
}

pcie() {
    "$py" - <<'PY'
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
}

# bench DEVICE SHAPE: the bench's JSON report into OUT/bench-DEVICE.json.
bench() {
    "$bin" --json bench --shape "$2" --dir "$work/bench" --device "$1" --threads "$(nproc)" --method ties \
        >"$out/bench-$1.json"
}

# A tiny Llama trio (transformers), a chat vector applied by chatvec, and
# two chat examples: what the SFT and eval steps run on.
tiny() {
    "$py" scripts/make_tiny_llama.py "$work/tiny" &&
        "$bin" apply --base "$work/tiny/base" --chat "$work/tiny/chat" --pretrained "$work/tiny/pretrained" \
            -o "$work/tiny/cv" &&
        for _ in 1 2; do
            echo '{"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hello, how are you?"}]}'
        done >"$work/data.jsonl"
}

sft() {
    PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" "$bin" sft --model "$work/tiny/cv" --data "$work/data.jsonl" \
        -o "$work/run" --fsdp --nproc 1 --max-steps 2 --grad-accum 1 --max-seq-len 128 --save-steps 0 \
        --python "$py" "$@"
}

eval_tiny() {
    "$bin" eval "$work/tiny/cv" --python "$py" --samples 1 --max-new-tokens 16 --engine transformers
}

# What sft imports the wheels from: on the GPU machine only.
site=$([ "$rehearse" = 1 ] || echo "$work/site")
export -f wheels pcie bench tiny sft eval_tiny
export kit out bin py work mode site
echo "gpu-check: $mode, kit $kit, python $py, out $out" >>"$log"
ls -l "$kit/bin" "$kit/wheels" >>"$log" 2>&1
if [ "$rehearse" = 1 ]; then
    step machine 10 sh -c 'uname -a; nproc'
    step wheels 60 wheels
    step gpu-tests 30 "$tests" --list
    step demo 60 "$bin" demo --device cpu
    skip pcie "needs a GPU"
    step bench-cpu 120 bench cpu tiny
    skip bench-cuda "needs a GPU"
    step tiny-model 60 tiny
    step sft-fsdp 60 sft --dry-run
    step eval 120 eval_tiny
else
    step machine 20 nvidia-smi
    step wheels 60 wheels
    step gpu-tests 180 "$tests" --include-ignored --test-threads 1
    step demo 60 "$bin" demo --device cuda
    step pcie 60 pcie
    step bench-cuda 120 bench cuda "${BENCH_SHAPE:-70b-layer}"
    step tiny-model 60 tiny
    step sft-fsdp 120 sft
    step eval 90 eval_tiny
    step bench-cpu 120 bench cpu "${BENCH_SHAPE:-70b-layer}"
fi
cat "$summary"
echo "$failed step(s) failed; logs in $log"
[ "$failed" -eq 0 ]
