#!/usr/bin/env bash
# The GPU benchmark. First checks that the fast path equals the reference path on this GPU (outputs and every
# gradient, float32 and float64, and under bfloat16 autocast), then checks the Triton block (`cbam_dsa.ops.cuda`)
# against the reference and for bitwise repeatability, float32 and bfloat16, and times it beside the reference
# (benchmarks/gpu_check.py, figures in $OUT/gpu-check-triton.json), then runs `cbam-dsa bench` on CUDA once per
# dtype: eager and compiled contenders, forward and forward + backward, saved tensors and peak memory.
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

python3 - <<'PY' || echo "gpu check: FAILED"
import os
import torch
from cbam_dsa import CBAMResidualDynamicSA

device = os.environ.get("DEVICE", "cuda")
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
configs = [{}, {"learnable_alpha": True, "alpha_init": 0.6, "ca_gate": "hardsigmoid", "learnable_temperature": True},
           {"residual": False, "ca_fusion": "sum", "sa_kernels": (5,), "sa_use_dilated": False}]
worst = {}
for dtype in (torch.float32, torch.float64):
    for index, config in enumerate(configs):
        for shape in ((4, 32, 28, 28), (8, 64, 7, 7)):
            torch.manual_seed(index)
            block = CBAMResidualDynamicSA(shape[1], **config).to(device, dtype)
            x = torch.randn(shape, device=device, dtype=dtype).relu()
            grad = torch.randn(shape, device=device, dtype=dtype)
            runs = []
            for fast in (True, False):
                block._fast_path = fast
                block.zero_grad(set_to_none=True)
                xx = x.clone().requires_grad_()
                out = block(xx)
                out.backward(grad)
                runs.append([out.detach(), xx.grad, *(p.grad for p in block.parameters())])
            error = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(*runs))
            worst[str(dtype)] = max(worst.get(str(dtype), 0.0), error)
print("gpu check: fast vs reference, worst error relative to each tensor's max:", worst)
assert worst["torch.float32"] < 1e-4 and worst["torch.float64"] < 1e-10, worst
block = CBAMResidualDynamicSA(32).to(device)
x = torch.randn(4, 32, 28, 28, device=device).relu()
with torch.autocast(device, dtype=torch.bfloat16):
    fast = block(x)
    block._fast_path = False
    reference = block(x)
error = ((fast - reference).abs().max() / reference.abs().max()).item()
print(f"gpu check: bfloat16 autocast, error relative to max {error:.2e}")
assert error < 5e-2
print("gpu check: ok")
PY

mkdir -p "$out"
python3 benchmarks/gpu_check.py --time --json "$out/gpu-check-triton.json" || echo "triton gpu check: FAILED"

for dtype in ${DTYPES:-float32 bfloat16}; do
    python3 -m cbam_dsa.cli bench --device cuda --dtype "$dtype" --rounds "${ROUNDS:-15}" --no-network \
        --out "$out" "$@" || echo "bench $dtype: FAILED"
done
