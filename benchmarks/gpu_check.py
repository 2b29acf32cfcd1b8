"""The Triton block (``cbam_dsa.ops.cuda``) on a real GPU: correctness against the reference and bitwise repeatability.

For each case (configurations of ``tests/triton_cases.py`` and the benchmark's stage shapes), in float32 and
bfloat16: outputs, maps and every gradient against autograd through the reference
(:func:`cbam_dsa.functional.cbam_residual_dynamic_sa`) on the same GPU, with TF32 off; bfloat16 also against the
float64 reference (within 2e-2, or within 3x the bfloat16 reference's own error); the non-finite masks; and two runs
of forward + backward bitwise equal. Then, with ``--time``, a side-by-side timing of the fused forward and
forward + backward against the reference at the stage shapes (median of CUDA-event timings, interleaved rounds).

    PYTHONPATH=src python benchmarks/gpu_check.py [--time] [--full] [--json OUT.json] [--limit N]
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/gpu_check.py --device cpu --limit 2   # the script itself

Prints one line per case and a summary; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import triton_cases as T

TOLERANCE = {torch.float32: 2e-4}
FLOOR = {torch.bfloat16: 2e-2, torch.float16: 3e-3}
STAGES = [(16, 64, 56, 56), (8, 256, 28, 28), (32, 512, 7, 7)]
CONFIGS = {
    "default": {"maps": True},
    "hard_gates_silu_sum": {"ca_gate": "hardsigmoid", "sa_gate": "hardsigmoid", "act": "silu", "fusion": "sum",
                            "ca_t": 0.7, "sa_t": 1.6, "alpha": 0.6},
    "one_branch_no_residual": {"kernels": [(5, 1)], "alpha": None},
    "four_branches": {"kernels": [(1, 1), (3, 1), (3, 3), (5, 2)], "alpha": 1.3, "router_hidden": 3},
}


# The cases of the default run: each new combination of settings compiles the kernels again (seconds each), so the
# default run keeps to a few; --full runs every case of tests/triton_cases.py and every configuration above.
QUICK = ["default_f32", "maps_temperatures", "four_branches_dilated", "one_branch_no_residual", "large_c_tiny_map",
         "ties", "nan", "inf"]


def _cases(full: bool) -> list[tuple[str, tuple, torch.dtype, dict]]:
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for name, (shape, case_dtype, config) in T.CASES.items():
            if case_dtype in (torch.float32, torch.bfloat16) and (full or name in QUICK):
                cases.append((f"{name}[{dtype}]", shape, dtype, dict(config, repeat=True)))
        for name, stage_config in CONFIGS.items():
            if not full and name != "default":
                continue
            for shape in STAGES:
                small = (min(shape[0], 4), *shape[1:])
                config = dict(stage_config, repeat=True, hidden=shape[1] // 16)
                cases.append((f"{name}{small}[{dtype}]", small, dtype, config))
    return cases


def _check(name: str, shape: tuple, dtype: torch.dtype, config: dict, device: str) -> tuple[bool, dict]:
    case = T.build(shape, dtype, config, device=device)
    found = T.compare(case, repeat=True)
    problems = []
    if found["shapes"]:
        problems.append(f"shapes {found['shapes']}")
    if found["masks"]:
        problems.append(f"non-finite masks {found['masks']}")
    if not found["bitwise"]:
        problems.append("two runs differ")
    if dtype in TOLERANCE:
        worst = {k: v for k, v in found["errors"].items() if not v <= TOLERANCE[dtype]}
    else:
        worst = {k: v for k, v in found["truth"].items()
                 if not v <= max(FLOOR[dtype], 3 * found["reference_truth"][k])}
    if worst:
        problems.append(f"errors {worst}")
    top = max(found["errors"].values(), default=0.0)
    print(f"{'ok  ' if not problems else 'FAIL'} {name:60s} worst error vs reference {top:.2e} {'; '.join(problems)}",
          flush=True)
    return not problems, found


def _time(fn, rounds: int = 20) -> float:
    """Median milliseconds of ``fn`` over ``rounds`` CUDA-event timings (after warm-up)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _contenders(case: dict) -> dict:
    """The four timed calls on one case: fused and reference, forward and forward + backward."""
    from cbam_dsa.ops.cuda import block

    args = [case[n] for n in T.GRAD_NAMES] + [case["branch_weights"], case["branch_biases"]]
    spec = [case["dilations"], case["act"], case["ca_gate"], case["sa_gate"]]
    needs = [t is not None for t in T._tensors(case)]

    def fused_train():
        out = block.block_forward(*args, *spec)
        return block.block_backward(case["grad_out"], None, None, None, None, *args, out[5], *spec, needs)

    def reference_forward():
        with torch.no_grad():
            return T.reference_outputs(case)

    return {
        "fused_forward_ms": lambda: block.block_forward(*args, *spec),
        "reference_forward_ms": reference_forward,
        "fused_train_ms": fused_train,
        "reference_train_ms": lambda: T.reference(case),
    }


def _timings() -> list[dict]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for shape in STAGES:
            case = T.build(shape, dtype, {"hidden": shape[1] // 16}, device="cuda")
            row = {"shape": list(shape), "dtype": str(dtype)}
            for _ in range(3):  # interleaved rounds; the median of each contender's rounds is kept
                for key, fn in _contenders(case).items():
                    row.setdefault(key, []).append(_time(fn))
            row.update({key: statistics.median(row[key]) for key in _contenders(case)})
            row["forward_ratio"] = row["fused_forward_ms"] / row["reference_forward_ms"]
            row["train_ratio"] = row["fused_train_ms"] / row["reference_train_ms"]
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", action="store_true", help="also time fused against reference at the stage shapes")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu under TRITON_INTERPRET=1 to try the script")
    parser.add_argument("--limit", type=int, default=None, help="run only the first LIMIT cases")
    parser.add_argument("--full", action="store_true", help="every case and configuration (many more compilations)")
    options = parser.parse_args()
    if options.device == "cuda" and not torch.cuda.is_available():
        print("gpu check: no CUDA device")
        return 1
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    device_name = torch.cuda.get_device_name() if options.device == "cuda" else options.device
    print(f"gpu check: {device_name}, torch {torch.__version__}", flush=True)
    started = time.perf_counter()
    results, failed = {}, []
    for name, shape, dtype, config in _cases(options.full)[: options.limit]:
        try:
            case_started = time.perf_counter()
            ok, found = _check(name, shape, dtype, config, options.device)
            found["seconds"] = time.perf_counter() - case_started
        except Exception as error:  # report it and go on to the next case
            ok, found = False, {"exception": repr(error)[:2000]}
            print(f"FAIL {name:60s} {found['exception']}", flush=True)
        results[name] = found
        if not ok:
            failed.append(name)
    print(f"gpu check: {len(results) - len(failed)} of {len(results)} cases ok in {time.perf_counter() - started:.0f}s")
    timings = _timings() if options.time and options.device == "cuda" else []
    if options.json:
        options.json.write_text(json.dumps({"cases": results, "failed": failed, "timings": timings}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
