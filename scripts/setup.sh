#!/usr/bin/env bash
# Set up a fresh machine: an optimised BLAS for MLX's CPU backend on Linux, then .venv with the project.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "$(uname -s)" == "Linux" ]]; then
    # mlx[cpu] links the reference BLAS (~30x slower); policy_core loads OpenBLAS when it is present.
    if ! ls /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1 \
        && command -v apt-get >/dev/null 2>&1; then
        if [[ "$(id -u)" == "0" ]]; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread
        elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread
        else
            echo "note: install libopenblas0-pthread (apt) for ~20x faster MLX on CPU; continuing without" >&2
        fi
    fi
fi

PYTHON="${PYTHON:-python3}"
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
.venv/bin/dpmlx info
