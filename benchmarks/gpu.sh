#!/usr/bin/env bash
# The GPU check and benchmark, in one call (a lent GPU machine's time is short):
#
# 1. benchmarks/gpu_check.py --time: the Triton kernels against the reference (float32 and bfloat16, every gradient,
#    bitwise repeatability), the block through the operator against its reference path (layouts, configurations,
#    opcheck, torch.compile), then timings against timm's CbamModule at the stage shapes and at a training batch,
#    with the forward's memory-traffic floor. It stops here if any check fails.
# 2. `cbam-dsa bench --device cuda` in bfloat16 (the stage shapes and the training batch) and in float32 (the stage
#    shapes, and the resnet50 training step at batch 64, 224 x 224, under bfloat16 autocast): eager and compiled
#    contenders, saved tensors and peak memory.
#
#   OUT=/tmp/gpu bash benchmarks/gpu.sh
#   ROUNDS=30 bash benchmarks/gpu.sh    # more rounds; extra arguments go to both `cbam-dsa bench` runs
#
# Results land in $OUT: gpu-check.json, results-cuda-<dtype>.{json,txt,png}. Copy the JSON files into benchmarks/
# and re-render docs/BENCHMARKS.md with `cbam-dsa bench --render benchmarks/results-*.json --markdown
# docs/BENCHMARKS.md`. Uses the source tree (PYTHONPATH=src) with whatever torch, triton and timm the machine has.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench-output}"
rounds="${ROUNDS:-16}"
# CBAM_DSA_TRITON=1: the Triton kernels stay opt-in on CUDA until this script has passed on a real GPU.
export PYTHONPATH=src PYTHONUNBUFFERED=1 CBAM_DSA_TRITON=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" || true
mkdir -p "$out"
started=$SECONDS

timeout "${CHECK_TIMEOUT:-300}" python3 benchmarks/gpu_check.py --time --json "$out/gpu-check.json"
code=$?
echo "gpu check: exit $code after $((SECONDS - started)) s"
if [ "$code" -ne 0 ]; then
    echo "gpu check FAILED: no benchmark"
    exit 1
fi

stages="16,64,56,56 8,256,28,28 32,512,7,7"
timeout "${BENCH_TIMEOUT:-240}" python3 -m cbam_dsa.cli bench --device cuda --dtype bfloat16 --rounds "$rounds" \
    --shapes $stages 128,64,56,56 --no-network --out "$out" "$@" || echo "bench bfloat16: FAILED"
echo "bench bfloat16: done after $((SECONDS - started)) s"
timeout "${BENCH_TIMEOUT:-240}" python3 -m cbam_dsa.cli bench --device cuda --dtype float32 --rounds "$rounds" \
    --shapes $stages --network-batch 64 --network-size 224 --network-autocast bfloat16 --network-rounds 11 \
    --out "$out" "$@" || echo "bench float32: FAILED"
echo "bench float32: done after $((SECONDS - started)) s"
