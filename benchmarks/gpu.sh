#!/usr/bin/env bash
# The GPU benchmark. First checks the Triton implementation of the operators (`cbam_dsa.ops.cuda`) against the
# reference path and for bitwise repeatability, float32 and bfloat16, and times it beside the reference
# (benchmarks/gpu_check.py, figures in $OUT/gpu-check-triton.json), then runs `cbam-dsa bench` on CUDA once per
# dtype with the Triton kernels registered (CBAM_DSA_TRITON=1, the opt-in switch): eager and compiled contenders,
# forward and forward + backward, saved tensors and peak memory.
#
#   OUT=/tmp/gpu bash benchmarks/gpu.sh                 # float32 and bfloat16, no resnet50 step
#   DTYPES=bfloat16 ROUNDS=30 bash benchmarks/gpu.sh    # other settings; extra arguments go to `cbam-dsa bench`
#
# Results land in $OUT/results-cuda-<dtype>.{json,txt,png}; copy the JSON files into benchmarks/ and re-render
# docs/BENCHMARKS.md with `cbam-dsa bench --markdown docs/BENCHMARKS.md --render benchmarks/results-*.json`.
# Uses the source tree (PYTHONPATH=src) with whatever torch, timm and matplotlib the machine has.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench-output}"
export PYTHONPATH=src
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true


mkdir -p "$out"
python3 benchmarks/gpu_check.py --time --json "$out/gpu-check-triton.json" || echo "triton gpu check: FAILED"

for dtype in ${DTYPES:-float32 bfloat16}; do
    CBAM_DSA_TRITON=1 python3 -m cbam_dsa.cli bench --device cuda --dtype "$dtype" --rounds "${ROUNDS:-15}" --no-network \
        --out "$out" "$@" || echo "bench $dtype: FAILED"
done
