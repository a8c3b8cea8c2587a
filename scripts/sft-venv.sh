#!/usr/bin/env bash
# Creates, or reuses, the Python environment that chatvec's SFT end-to-end
# test runs TRL in, and prints its interpreter's path. The versions are the
# ones chatvec sft was checked against; the venv is cached (PyPI's torch
# wheel and its CUDA libraries are about 6 GB) and rebuilt when they change.
#
# CHATVEC_SFT_VENV names the directory. A rebuild deletes it, so the script
# deletes only a directory it made itself (it holds this script's marker,
# or the requirements stamp earlier versions wrote) or an empty one;
# anything else is refused and left as it is.
set -euo pipefail
dir="${CHATVEC_SFT_VENV:-$HOME/.cache/chatvec/sft-venv}"
req="torch==2.15.0 transformers==5.23.0 trl==1.16.0 accelerate==1.15.0 datasets==5.2.0 peft==0.21.2"
stamp="$dir/.chatvec-requirements"
marker="$dir/.chatvec-sft-venv"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$req" ]; then
    if [ -L "$dir" ]; then
        echo "sft-venv.sh: refusing to use $dir: it is a symbolic link" >&2
        exit 1
    fi
    if [ -e "$dir" ]; then
        if [ ! -d "$dir" ]; then
            echo "sft-venv.sh: refusing to replace $dir: it is not a directory" >&2
            exit 1
        fi
        if [ -f "$marker" ] || [ -f "$stamp" ]; then
            rm -rf "$dir"
        elif [ -n "$(ls -A "$dir")" ]; then
            echo "sft-venv.sh: refusing to delete $dir: this script did not create it (no $(basename "$marker") inside)" >&2
            echo "hint: set CHATVEC_SFT_VENV to a new directory, or remove $dir yourself" >&2
            exit 1
        fi
    fi
    echo "setting up $dir ($req) ..." >&2
    mkdir -p "$dir"
    : > "$marker"
    python3 -m venv "$dir"
    "$dir/bin/pip" install --quiet --upgrade pip >&2
    # shellcheck disable=SC2086
    "$dir/bin/pip" install --quiet $req >&2
    "$dir/bin/python" -c "import torch, transformers, trl, accelerate, datasets, peft" >&2
    echo "$req" > "$stamp"
fi
# lm-evaluation-harness for `chatvec eval --harness` and py3langid for its
# answer language (Latin-script languages told apart): added to the same
# environment (it keeps torch and transformers as they are), with its own
# stamp so a change here does not rebuild the whole environment.
extras="lm_eval==0.4.13 py3langid==0.4.0"
extras_stamp="$dir/.chatvec-extras"
if [ ! -f "$extras_stamp" ] || [ "$(cat "$extras_stamp")" != "$extras" ]; then
    echo "adding $extras to $dir ..." >&2
    # shellcheck disable=SC2086
    "$dir/bin/pip" install --quiet $extras >&2
    "$dir/bin/python" -c "import lm_eval, py3langid, torch, transformers" >&2
    echo "$extras" > "$extras_stamp"
fi
# mergekit 0.1.5, the peer chatvec's merge methods are checked against
# (`cargo test --test merge -- --ignored`). Its requirements are already
# here but for two small packages; --no-deps keeps torch and transformers
# as they are.
mergekit="mergekit==0.1.5 immutables==0.21 sentencepiece==0.2.3"
mergekit_stamp="$dir/.chatvec-mergekit"
if [ ! -f "$mergekit_stamp" ] || [ "$(cat "$mergekit_stamp")" != "$mergekit" ]; then
    echo "adding $mergekit to $dir ..." >&2
    # shellcheck disable=SC2086
    "$dir/bin/pip" install --quiet --no-deps $mergekit >&2
    "$dir/bin/python" -c "import mergekit.merge, torch, transformers" >&2
    echo "$mergekit" > "$mergekit_stamp"
fi
echo "$dir/bin/python"
