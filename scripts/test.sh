#!/usr/bin/env bash
# The whole test suite from a fresh clone: install what it needs, lint, test, and run every
# benchmark once, briefly (a smoke run with no thresholds, so benchmarks cannot rot).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
scripts/install-test-deps.sh
export RBEE_REQUIRE_SSHD=1   # SSH tests must run here, not skip
export RBEE_REQUIRE_BROWSER=1   # and so must the web UI's tests in chromium
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
if [ -f bench/run_all.py ]; then
  .venv/bin/python bench/run_all.py --quick --out bench/results/smoke.json
fi
echo "scripts/test.sh: done in $(( $(date +%s) - started ))s" >&2
