#!/usr/bin/env bash
# Creates, or reuses, the Python environment that chatvec's SFT end-to-end
# test runs TRL in, and prints its interpreter's path. The versions are the
# ones chatvec sft was checked against; the venv is cached (PyPI's torch
# wheel and its CUDA libraries are about 6 GB) and rebuilt when they change.
set -euo pipefail
dir="${CHATVEC_SFT_VENV:-$HOME/.cache/chatvec/sft-venv}"
req="torch==2.15.0 transformers==5.23.0 trl==1.16.0 accelerate==1.15.0 datasets==5.2.0 peft==0.21.2"
stamp="$dir/.chatvec-requirements"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$req" ]; then
    echo "setting up $dir ($req) ..." >&2
    rm -rf "$dir"
    python3 -m venv "$dir"
    "$dir/bin/pip" install --quiet --upgrade pip >&2
    # shellcheck disable=SC2086
    "$dir/bin/pip" install --quiet $req >&2
    "$dir/bin/python" -c "import torch, transformers, trl, accelerate, datasets, peft" >&2
    echo "$req" > "$stamp"
fi
echo "$dir/bin/python"
