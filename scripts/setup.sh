#!/usr/bin/env bash
# Set up a fresh machine: an optimised BLAS for MLX's CPU backend on Linux, then .venv with the project.
# Quiet: one line per stage, then `dpmlx info`; a failing step shows its output. Re-running installs only
# what is missing: the project is reinstalled only when pyproject.toml (or the checkout's place) changed.
set -euo pipefail
cd "$(dirname "$0")/.."

LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT

quietly() {  # run a step with its output kept aside, shown only if it fails
    if ! "$@" >"$LOG" 2>&1; then
        cat "$LOG" >&2
        echo "setup: failed: $*" >&2
        exit 1
    fi
}

if [[ "$(uname -s)" == "Linux" ]]; then
    # mlx[cpu] links the reference BLAS (~30x slower); policy_core loads numpy's OpenBLAS, else this one.
    if ls /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1; then
        echo "blas: system OpenBLAS present"
    elif ! command -v apt-get >/dev/null 2>&1; then
        echo "blas: no apt-get; MLX uses numpy's OpenBLAS (see dpmlx info)"
    elif [[ "$(id -u)" == "0" ]]; then
        quietly apt-get update -qq
        quietly env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread
        echo "blas: installed libopenblas0-pthread"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        quietly sudo apt-get update -qq
        quietly sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread
        echo "blas: installed libopenblas0-pthread"
    else
        echo "blas: note: no root; libopenblas0-pthread (apt) is a fallback to numpy's OpenBLAS, skipped"
    fi
fi

PYTHON="${PYTHON:-python3}"
if [[ -x .venv/bin/python ]]; then
    echo "venv: .venv exists ($(.venv/bin/python --version))"
else
    quietly "$PYTHON" -m venv .venv
    quietly .venv/bin/python -m pip install --upgrade pip
    echo "venv: created .venv ($(.venv/bin/python --version))"
fi

# The editable install follows the source files by itself; only its metadata (dependencies, extras,
# entry points: pyproject.toml) and the checkout's path need a reinstall.
STAMP=.venv/.dpmlx-install-stamp
WANT="$(.venv/bin/python -c 'import hashlib, os; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest(), os.getcwd())')"
if [[ -x .venv/bin/dpmlx && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    echo "install: diffusion-policy-mlx[dev] up to date (pyproject.toml unchanged)"
else
    quietly .venv/bin/python -m pip install -e '.[dev]'
    echo "$WANT" >"$STAMP"
    echo "install: diffusion-policy-mlx[dev], editable (the full product from this checkout)"
fi
.venv/bin/dpmlx info
