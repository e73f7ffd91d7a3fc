#!/usr/bin/env bash
# Run ON a lent GPU machine (after scripts/gpu_prepare.sh here, carrying .whl and .shared).
# Logs and result JSON go to $OUT, which comes back.
#   bash scripts/gpu_checks.sh                 the GPU tests (tests/test_gpu.py), then the 2:4 matmul benchmark
#   bash scripts/gpu_checks.sh distill [ARGS]  the GPU-sized AKT comparison, benchmarks.distill_akt --full ARGS
#                                              (default ARGS: --arms 0,1,2,3,4,5, the joint arms; needs
#                                              gpu_prepare.sh --models), stopped after DISTILL_S seconds
#                                              (default 540). Each finished arm is saved at once, so
#                                              running it again with the returned JSON in
#                                              benchmarks/results goes on with the arms still missing.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" SHRINK_SHARED="$PWD/.shared" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
if [[ "${1:-tests}" == "distill" ]]; then
    shift
    (($#)) || set -- --arms 0,1,2,3,4,5
    timeout "${DISTILL_S:-540}" python3 -m benchmarks.distill_akt --full "$@" 2>&1 | tee "$OUT/distill_akt_full.log"
    status=${PIPESTATUS[0]}
    cp benchmarks/results/distill_akt_full*.json "$OUT/" 2>/dev/null
    exit "$status"
fi
python3 -m pytest -q tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log"
tests=${PIPESTATUS[0]}
python3 -m benchmarks.sparse_matmul 2>&1 | tee "$OUT/sparse_matmul.log"
cp benchmarks/results/sparse_matmul.json "$OUT/" 2>/dev/null
exit "$tests"
