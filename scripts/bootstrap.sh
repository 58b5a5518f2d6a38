#!/usr/bin/env bash
# Create .venv and install rbee into it (editable, so `rbee-hive git pull` updates it).
#   scripts/bootstrap.sh [EXTRAS]     e.g. scripts/bootstrap.sh test,bench
# A fresh machine builds llama-cpp-python from source: about 11 minutes on 2 cores.
# It is built with RPC (-DGGML_RPC=on: one model across several hosts) plus any CMAKE_ARGS
# you give; for a GPU build: CMAKE_ARGS="-DGGML_CUDA=on" scripts/bootstrap.sh (Metal:
# -DGGML_METAL=on). A remote host needs none of this: `rbee hosts install NAME` does it.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
user_cmake_args="${CMAKE_ARGS:-}"
export CMAKE_ARGS="-DGGML_RPC=on${user_cmake_args:+ $user_cmake_args}"
if [ ! -x .venv/bin/python ]; then
  if ! "$python" -m venv .venv 2>/dev/null; then
    echo "python3 -m venv failed; installing Debian's python3-venv" >&2
    sudo_="" ; [ "$(id -u)" -eq 0 ] || sudo_="sudo"
    $sudo_ apt-get update -qq && $sudo_ apt-get install -y -qq python3-venv
    rm -rf .venv && "$python" -m venv .venv
  fi
fi
.venv/bin/python -m pip install -q --upgrade pip
if [ -n "$user_cmake_args" ] && ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  # pip's wheel cache is keyed by the sdist, not by CMAKE_ARGS: a wheel built earlier with
  # other flags would be reused silently, so this build skips the cache
  echo "building llama-cpp-python with CMAKE_ARGS=$CMAKE_ARGS" >&2
  .venv/bin/python -m pip install --no-cache-dir "llama-cpp-python>=0.3.8"
fi
if [ -n "$extras" ]; then
  .venv/bin/python -m pip install -e ".[$extras]"
else
  .venv/bin/python -m pip install -e .
fi
