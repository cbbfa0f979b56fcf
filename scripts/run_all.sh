#!/usr/bin/env bash
# The main command: set up .venv, then run the whole pipeline on the shapes world
# (tokenizers, retriever, memory bank, pretraining, SFT, evaluation, report). Each stage skips
# itself when its published artifact under outputs/ exists, so a rerun resumes.
# Extra args go to the pipeline (e.g. --budget reduced).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m lit_cm3leon.pipeline "$@"
