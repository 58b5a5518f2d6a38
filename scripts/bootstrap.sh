#!/usr/bin/env bash
# Create .venv and install rbee into it (editable, so `rbee-hive git pull` updates it).
#   scripts/bootstrap.sh [EXTRAS]     e.g. scripts/bootstrap.sh test,bench
# A fresh machine builds llama-cpp-python from source: about 11 minutes on 2 cores.
# For a GPU build: CMAKE_ARGS="-DGGML_CUDA=on" scripts/bootstrap.sh   (Metal: -DGGML_METAL=on)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  if ! "$python" -m venv .venv 2>/dev/null; then
    echo "python3 -m venv failed; installing Debian's python3-venv" >&2
    sudo_="" ; [ "$(id -u)" -eq 0 ] || sudo_="sudo"
    $sudo_ apt-get update -qq && $sudo_ apt-get install -y -qq python3-venv
    rm -rf .venv && "$python" -m venv .venv
  fi
fi
.venv/bin/python -m pip install -q --upgrade pip
if [ -n "$extras" ]; then
  .venv/bin/python -m pip install -e ".[$extras]"
else
  .venv/bin/python -m pip install -e .
fi
