#!/usr/bin/env bash
# Run HERE, before a session's first call to a lent GPU machine: puts what scripts/gpu_checks.sh
# needs there into two ignored folders that the call carries (64 MiB in all):
#   .whl/     the Python packages the GPU image lacks (it has torch, accelerate, safetensors,
#             tokenizers, pytest; Python 3.12), as manylinux wheels
#   .shared/  the shared tokenizer, docs-en and (with --models) the two shared models
# Then: run(command="bash scripts/gpu_checks.sh", carry=[".whl", ".shared"]).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${SHRINK_SHARED:-../shared}"
rm -rf .whl .shared
mkdir -p .whl .shared/models .shared/data
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl transformers==5.23.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 hydra-core==1.3.8 \
    omegaconf==2.3.1 gguf==0.19.0
# hydra's parser runtime is published as a source archive only: build its (pure Python) wheel here
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
cp -r "$SHARED/models/tokenizer-docs-en" .shared/models/
cp -r "$SHARED/data/docs-en" .shared/data/
if [[ "${1:-}" == "--models" ]]; then  # for benchmarks on the shared teacher and student (42 MB)
    cp -r "$SHARED/models/llama-teacher" "$SHARED/models/llama-student" .shared/models/
fi
du -sh .whl .shared
