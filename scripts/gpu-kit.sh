#!/usr/bin/env bash
# Pack, on a machine with network, what a lent CUDA machine lacks to run rbee's GPU checks
# (scripts/gpu-check.sh): that machine (the device tool's image 'cuda': Python 3.12 with
# PyTorch's stack, nvcc, cmake, ninja, scikit-build-core; no network) gets Python 3.12 wheels
# of the packages its image does not hold, and llama-cpp-python's sdist without the parts its
# build does not read (77 MB -> about 12 MB). Everything goes to .gpukit/ (ignored by git),
# about 25 MB: carry it with the call, e.g. run(command="bash scripts/gpu-check.sh",
# carry=[".gpukit"]).
#
#   scripts/gpu-kit.sh            # versions from this checkout's .venv, else the newest
set -euo pipefail
cd "$(dirname "$0")/.."
kit=.gpukit
py=${PYTHON:-.venv/bin/python}
rm -rf "$kit"
mkdir -p "$kit/wheels"

# What rbee, its GPU tests and bench/gpu.py (llama_cpp.server among its contenders) import
# that the image lacks, pinned to what this checkout runs with where it has them. typer and
# click travel too: rbee pins typer below 0.29, and the image's may be newer.
names=(typer click shellingham pydantic pydantic-core annotated-types typing-inspection paramiko bcrypt
       cryptography pynacl cffi pycparser invoke fabric decorator deprecated starlette uvicorn
       sse-starlette gguf diskcache fastapi annotated-doc pydantic-settings python-dotenv
       starlette-context opentelemetry-api importlib-metadata hatchling editables trove-classifiers
       pytest-timeout)
specs=()
for name in "${names[@]}"; do
  version=$("$py" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p' || true)
  specs+=("$name${version:+==$version}")
done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_26_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$kit/wheels" "${specs[@]}"

llama=$("$py" -m pip show llama-cpp-python 2>/dev/null | sed -n 's/^Version: //p' || true)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip download -q --no-deps --no-binary=:all: -d "$tmp" \
  "llama-cpp-python${llama:+==$llama}"
tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
src=$(basename "$tmp"/llama_cpp_python-*/)
rm -rf "$tmp/$src"/vendor/llama.cpp/{models,docs,benches,.git,media,examples/*/assets} \
       "$tmp/$src"/{docs,examples,.git}
tar -czf "$kit/$src.tar.gz" -C "$tmp" "$src"
du -sh "$kit"
