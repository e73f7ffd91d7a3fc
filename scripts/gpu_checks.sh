#!/usr/bin/env bash
# Run ON a lent GPU machine (after scripts/gpu_prepare.sh here, carrying .whl and .shared):
# the GPU tests (tests/test_gpu.py), then the 2:4 matmul benchmark. Logs and result JSON go
# to $OUT, which comes back.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" SHRINK_SHARED="$PWD/.shared" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log"
tests=${PIPESTATUS[0]}
python3 -m benchmarks.sparse_matmul 2>&1 | tee "$OUT/sparse_matmul.log"
cp benchmarks/results/sparse_matmul.json "$OUT/" 2>/dev/null
exit "$tests"
