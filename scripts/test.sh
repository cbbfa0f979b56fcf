#!/usr/bin/env bash
# The test command: set up .venv, then run the whole test suite (unit tests and the
# reduced-budget end-to-end pipeline with its quality gates). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
