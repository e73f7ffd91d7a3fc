#!/usr/bin/env bash
# Installs everything from scratch (scripts/install.sh) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. "${SHRINK_VENV:-.venv}/bin/activate"
python -m pytest -q "$@"
