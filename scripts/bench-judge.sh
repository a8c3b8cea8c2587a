#!/usr/bin/env bash
# Measures chatvec's judging against its bound: an 80-question benchmark
# judged by a stand-in judge that answers in 200 ms must take at most
# 80 x 0.2 s / concurrency + 10%. The answers are generated once and kept
# (the eval cache); every timed run uses a new judge model name, so each
# one asks the judge all 80 questions. Prints the judging stage's own time
# (chatvec's "judged 80/80 (T s)" line) per run.
#
#   scripts/bench-judge.sh CHATVEC PYTHON MODEL_DIR [RUNS]
set -euo pipefail
chatvec="$1"; py="$2"; model="$3"; runs="${4:-3}"
work="$(mktemp -d)"; trap 'kill $judge_pid 2>/dev/null; rm -rf "$work"' EXIT
port=18931
python3 "$(dirname "$0")/stand_in_judge.py" "$port" 0.2 & judge_pid=$!
mkdir -p "$work/bench80"
python3 - "$work/bench80" <<'PY'
import json, sys
d = sys.argv[1]
with open(f"{d}/question.jsonl", "w") as f:
    for i in range(80):
        f.write(json.dumps({"question_id": i + 1, "category": "extraction", "turns": [f"質問 {i + 1}: 短く答えてください。"]}, ensure_ascii=False) + "\n")
with open(f"{d}/judge_prompts.jsonl", "w") as f:
    f.write(json.dumps({"name": "single-v1", "system_prompt": "judge", "prompt_template": "{question}\n{answer}"}) + "\n")
PY
sleep 1
export CHATVEC_CACHE_DIR="$work/cache"
common=(eval "$model" --bench "$work/bench80" --judge-url "http://127.0.0.1:$port/v1" --python "$py" --bench-max-new-tokens 8)
"$chatvec" -q "${common[@]}" --judge-model warm-up > /dev/null
for c in 1 8 16; do
    for r in $(seq "$runs"); do
        line=$("$chatvec" "${common[@]}" --judge-model "stand-in-$c-$r" --judge-concurrency "$c" 2>&1 >/dev/null | grep 'judged 80/80')
        echo "concurrency $c run $r: $line (bound $(python3 -c "print(round(80 * 0.2 / $c * 1.1, 2))") s)"
    done
done
