#!/usr/bin/env bash
# rbee's GPU checks in one go, on a lent CUDA machine with no network (the device tool), from
# the repository root with .gpukit/ (scripts/gpu-kit.sh) carried beside it:
#
#   run(command="bash scripts/gpu-check.sh", carry=[".gpukit"], timeout_s=600)
#
# 1. a venv over the image's Python (its PyTorch stack stays visible), the kit's wheels in it;
# 2. llama-cpp-python built from the kit's sdist for CUDA, with RPC, for this GPU's
#    architecture (about 3 minutes on 16 cores), and rbee installed editable;
# 3. `rbee-hive detect`, the GPU tests (pytest -m gpu), and bench/gpu.py on the realistic
#    model (BENCH_ARGS, default: 22 layers, 256 tokens, 3 rounds).
# Logs and results go to $OUT (the device tool brings them back): build.log, pytest.log,
# gpu.json, bench.log, detect.json, nvidia-smi.txt. Each step has its own time limit, so one
# that hangs leaves time for the others; the exit status is the first failing step's.
#
# Elsewhere: LLAMA_WHEEL=path.whl installs that build instead of building one (a check of
# this script itself on a machine without CUDA, where the GPU steps skip).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/rbee-gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 CUDA_DEVICE_ORDER=PCI_BUS_ID
status=0
step() {  # step NAME SECONDS COMMAND...: run one step, note its time and status
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  echo "== $name: exit $rc in $((SECONDS - t0)) s" >&2
  [ "$rc" -ne 0 ] && [ "$status" -eq 0 ] && status=$rc
  return "$rc"
}

python=${PYTHON:-python3}
venv=/tmp/rbee-gpu-venv
step venv 120 bash -c '
  set -e
  "$1" -m venv "$2"
  site=$("$1" -c "import site; print(site.getsitepackages()[0])")
  echo "$site" > "$2/lib/python$("$1" -c "import sys; print(*sys.version_info[:2], sep=\".\")")/site-packages/_image.pth"
  "$2/bin/python" -m pip install -q --no-index --no-deps --no-compile .gpukit/wheels/*.whl
' _ "$python" "$venv" || exit "$status"
vpy=$venv/bin/python

if [ -n "${LLAMA_WHEEL:-}" ]; then
  step llama 120 "$vpy" -m pip install -q --no-index --no-deps "$LLAMA_WHEEL" || exit "$status"
else
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d .)
  src=$(mktemp -d)
  tar -xzf .gpukit/llama_cpp_python-*.tar.gz -C "$src"
  CMAKE_ARGS="-DGGML_CUDA=on -DGGML_RPC=on -DCMAKE_CUDA_ARCHITECTURES=${arch:-90} -DGGML_CUDA_FA=OFF -DLLAVA_BUILD=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    step llama 420 "$vpy" -m pip install --no-index --no-deps --no-build-isolation \
    "$src"/llama_cpp_python-*/ > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit "$status"; }
fi
step rbee 120 "$vpy" -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit "$status"
"$vpy" -c "import llama_cpp as l; print('llama-cpp-python', l.__version__, 'offload:',
  l.llama_supports_gpu_offload(), 'rpc:', l.llama_cpp.llama_supports_rpc())"

nvidia-smi > "$out/nvidia-smi.txt" 2>&1
step detect 60 "$venv/bin/rbee-hive" detect --format json > "$out/detect.json"
cat "$out/detect.json"
step pytest 300 "$vpy" -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_gpu.py \
  tests/test_gpu_worker.py > "$out/pytest.log" 2>&1
tail -40 "$out/pytest.log"
# shellcheck disable=SC2086
step bench 420 "$vpy" bench/gpu.py --out "$out/gpu.json" ${BENCH_ARGS:-} > "$out/bench.log" 2>&1
tail -60 "$out/bench.log"
exit "$status"
