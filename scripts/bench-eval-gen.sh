#!/usr/bin/env bash
# Batched against one-at-a-time generation in `chatvec eval`: runs the
# quick set's generation on MODEL with PROMPTS (JSONL) at --batch-size 1
# and 16, alternating, RUNS times each, and prints each run's tokens per
# second of generation (the worker's own clock: loading and scoring not
# counted), the medians, their ratio, and whether the answers are the
# same token for token (greedy decoding).
#
#   scripts/bench-eval-gen.sh CHATVEC PYTHON MODEL PROMPTS [RUNS] [MAX_NEW_TOKENS]
set -euo pipefail
chatvec="$1"; py="$2"; model="$3"; prompts="$4"; runs="${5:-3}"; k="${6:-16}"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
for r in $(seq "$runs"); do
    for b in 1 16; do
        "$chatvec" -q eval "$model" --python "$py" --prompts "$prompts" --max-new-tokens "$k" \
            --batch-size "$b" --fresh --json > "$work/b$b-$r.json"
    done
done
python3 - "$work" "$runs" <<'PY'
import json, statistics, sys
work, runs = sys.argv[1], int(sys.argv[2])
tps = {1: [], 16: []}
answers = {}
for b in (1, 16):
    for r in range(1, runs + 1):
        m = json.load(open(f"{work}/b{b}-{r}.json"))["models"][0]
        tps[b].append(m["tokens_per_second"])
        answers.setdefault(b, [a["answer"] for a in m["answers"]])
for b in (1, 16):
    print(f"batch {b:>2}: tokens/s " + ", ".join(f"{x:.2f}" for x in tps[b]) + f"; median {statistics.median(tps[b]):.2f}")
print(f"ratio of medians: {statistics.median(tps[16]) / statistics.median(tps[1]):.2f}x")
same = sum(a == b for a, b in zip(answers[1], answers[16]))
print(f"same answers: {same} of {len(answers[1])}")
PY
