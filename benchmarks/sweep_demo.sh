#!/usr/bin/env bash
# A real Hydra sweep on the shared 8-layer Llama teacher, gathered by `shrink report`:
# the table and plot shown in docs/results.md ("Sweeps and reports") are this script's output.
#
#   bash benchmarks/sweep_demo.sh        # ~15 min on 2 busy CPU cores
#
# RTN and GPTQ at 3 and 4 bits (group 128), 16 calibration windows, the first 64 eval
# windows of docs-en test. Hydra writes one job folder per setting under the sweep dir
# (its own multirun layout); afterwards only metrics.json + recipe.yaml are kept per job,
# since the quantized model folders do not belong in the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
SHRINK=${SHRINK:-$([ -x .venv/bin/shrink ] && echo .venv/bin/shrink || echo shrink)}
SWEEP=benchmarks/results/sweep
REPORT=benchmarks/results/sweep_report

rm -rf "$SWEEP" "$REPORT"
"$SHRINK" -m pipeline=quantize model=llama_teacher data=docs_en \
    quant.method=rtn,gptq quant.bits=3,4 quant.group_size=128 \
    data.calib.num_samples=16 data.eval.max_windows=64 \
    hydra.sweep.dir="$SWEEP"
"$SHRINK" report "$SWEEP" --out "$REPORT"

# Keep the evidence (metrics.json, recipe.yaml), drop models, Hydra logs and progress files.
find "$SWEEP" -type f ! -name metrics.json ! -name recipe.yaml -delete
find "$SWEEP" -depth -type d -empty -delete
ls "$REPORT"
