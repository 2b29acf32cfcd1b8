"""Compile every kernel of the Triton block for a CUDA target without a GPU (sm_90 by default): the launches of a
forward and a backward call are caught, and each kernel is compiled with triton's ahead-of-time API and assembled by
the ptxas that ships with triton, which reports registers and spills. This catches what the interpreter cannot:
code that runs in Python but does not compile.

    PYTHONPATH=src python tests/triton_compile.py [--arch 90] [--all]

Prints one JSON line per kernel (``{"config", "kernel", "seconds", "registers", "spill_bytes"}``); exits 1 on the
first kernel that does not compile. Not run under ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_cases as T

CONFIGS = {
    "default_f32": ((2, 64, 14, 14), torch.float32, {"maps": True}),
    "bf16_params_f32": ((2, 64, 14, 14), torch.bfloat16, {"maps": True, "params": torch.float32}),
    "f16_one_branch": ((2, 8, 5, 6), torch.float16, {"kernels": [(5, 1)], "alpha": None, "no_out_grad": True,
                                                     "maps": True}),
    "f64_four_branches_hard": ((1, 4, 9, 8), torch.float64,
                               {"kernels": [(1, 1), (3, 1), (3, 3), (5, 2)], "alpha": 1.3, "router_hidden": 3,
                                "fusion": "sum", "act": "silu", "ca_gate": "hardsigmoid", "sa_gate": "hardsigmoid"}),
    "one_by_one_map": ((3, 16, 1, 1), torch.float32, {"hidden": 1}),
}
CODES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def _ptxas(ptx: str, arch: int) -> dict:
    import triton

    binary = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        done = subprocess.run([str(binary), f"--gpu-name=sm_{arch}a", "-v", str(source), "-o", os.devnull],
                              capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    registers = re.search(r"Used (\d+) registers", done.stderr)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", done.stderr)]
    return {"registers": int(registers.group(1)) if registers else None, "spill_bytes": sum(spills)}


def compile_config(name: str, arch: int = 90) -> list[dict]:
    """Compile the kernels one forward and one backward call of config ``name`` launch."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from cbam_dsa.ops.cuda import block

    rows: list[dict] = []

    def compile_launch(kernel, grid, *args, **meta):
        positional = dict(zip(kernel.arg_names, args, strict=False))
        signature, constants = {}, {}
        for arg in kernel.arg_names:
            if arg in meta:
                signature[arg], constants[arg] = "constexpr", meta[arg]
            else:
                value = positional[arg]
                signature[arg] = "*" + CODES[value.dtype] if isinstance(value, torch.Tensor) else "i32"
        started = time.perf_counter()
        compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", arch, 32))
        row = {"config": name, "kernel": kernel.__name__, "seconds": round(time.perf_counter() - started, 2)}
        row.update(_ptxas(compiled.asm["ptx"], arch))
        print(json.dumps(row), flush=True)
        rows.append(row)

    shape, dtype, config = CONFIGS[name]
    case = T.build(shape, dtype, config)
    args = [case[n] for n in T.GRAD_NAMES] + [case["branch_weights"], case["branch_biases"]]
    spec = [case["dilations"], case["act"], case["ca_gate"], case["sa_gate"]]
    launch, block._launch = block._launch, compile_launch
    try:
        block.block_forward(*args, *spec)
        needs = [t is not None for t in T._tensors(case)]
        block.block_backward(case["grad_out"], *case["grad_maps"], *args, block.saved_like(*args, *spec), *spec,
                             needs)
    finally:
        block._launch = launch
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    parser.add_argument("--all", action="store_true", help="every config (default: the first)")
    options = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("triton_compile: unset TRITON_INTERPRET to compile")
        return 1
    for name in CONFIGS if options.all else list(CONFIGS)[:1]:
        compile_config(name, options.arch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
