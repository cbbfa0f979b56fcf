#!/usr/bin/env bash
# Create .venv (or $VENV) and install lit_cm3leon with its dev tools. Idempotent: a second run
# with unchanged pyproject.toml/constraints.txt returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing into $VENV (torch pinned by constraints.txt)"
  "$VENV/bin/pip" install -q --disable-pip-version-check -c constraints.txt torch torchvision
  "$VENV/bin/pip" install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
