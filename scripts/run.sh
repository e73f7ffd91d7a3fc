#!/usr/bin/env bash
# Installs shrink and runs the main job on the embedded default (SmolLM2-135M + Shakespeare).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. "${SHRINK_VENV:-.venv}/bin/activate"
shrink "$@"
