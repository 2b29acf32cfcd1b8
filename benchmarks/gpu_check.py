"""The Triton block (``cbam_dsa.ops.cuda``) on a real GPU: correctness, bitwise repeatability, and timings.

1. **Kernels.** For each case (configurations of ``tests/triton_cases.py`` and the benchmark's stage shapes), in
   float32 and bfloat16: outputs, maps and every gradient of the kernels against autograd through the reference
   (:func:`cbam_dsa.functional.cbam_residual_dynamic_sa`) on the same GPU, with TF32 off; bfloat16 also against the
   float64 reference (within 2e-2, or within 3x the bfloat16 reference's own error); the non-finite masks; and two
   runs of forward + backward bitwise equal. The cases run in ``--jobs`` processes: each new combination of
   settings compiles the kernels again (seconds each), and the compilations are what takes the time.
2. **The operator, as users get it.** ``CBAMResidualDynamicSA`` on CUDA through ``torch.ops.cbam_dsa`` (the Triton
   kernels registered for CUDA) against the same block with ``fast_path = False``, contiguous and channels_last,
   float32 and bfloat16: outputs, maps and the gradients of the input and of every parameter; then
   ``torch.library.opcheck`` on both operators, and ``torch.compile(block, fullgraph=True)`` against eager.
3. **Timings** (``--time``): at the stage shapes and at a training batch, the module's forward and forward + backward
   against the reference path and timm's ``CbamModule`` (medians of per-round ratios, interleaved rounds, CUDA
   synchronized), and the forward against its memory-traffic floor: three reads and one write of ``x``, that is twice
   the time of a device copy of ``x`` (one read, one write) in the same rounds.

    PYTHONPATH=src python benchmarks/gpu_check.py [--time] [--full] [--json OUT.json] [--limit N] [--jobs N]
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/gpu_check.py --device cpu --limit 2   # the script itself

Prints one line per check and a summary; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import triton_cases as T

TOLERANCE = {torch.float32: 2e-4}
FLOOR = {torch.float32: 2e-4, torch.bfloat16: 2e-2, torch.float16: 3e-3}
STAGES = [(16, 64, 56, 56), (8, 256, 28, 28), (32, 512, 7, 7)]
TRAINING_BATCH = (128, 64, 56, 56)
CONFIGS = {
    "default": {"maps": True},
    "hard_gates_silu_sum": {"ca_gate": "hardsigmoid", "sa_gate": "hardsigmoid", "act": "silu", "fusion": "sum",
                            "ca_t": 0.7, "sa_t": 1.6, "alpha": 0.6},
    "one_branch_no_residual": {"kernels": [(5, 1)], "alpha": None},
    "four_branches": {"kernels": [(1, 1), (3, 1), (3, 3), (5, 2)], "alpha": 1.3, "router_hidden": 3},
}
BLOCK_CONFIGS = {  # keyword arguments of CBAMResidualDynamicSA, for the checks through the operator
    "default": {},
    "sum_hard_one_branch": {"ca_fusion": "sum", "ca_gate": "hardsigmoid", "sa_kernels": (3,), "sa_use_dilated": False},
    "learnable": {"learnable_alpha": True, "alpha_init": 0.5, "learnable_temperature": True, "ca_act": "silu"},
    "no_residual": {"residual": False, "sa_gate": "hardsigmoid"},
}


# The cases of the default run; --full runs every case of tests/triton_cases.py and every configuration above.
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


def _no_tf32() -> None:
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def _report(ok: bool, name: str, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name:60s} {detail}", flush=True)


def _check(shape: tuple, dtype: torch.dtype, config: dict, device: str) -> tuple[bool, dict]:
    """One kernel case (in a worker process): ``(ok, figures)``; an exception is reported as a failure."""
    _no_tf32()
    started = time.perf_counter()
    try:
        found = T.compare(T.build(shape, dtype, config, device=device), repeat=True)
    except Exception as error:  # reported, and the other cases go on
        return False, {"exception": repr(error)[:2000], "seconds": time.perf_counter() - started}
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
    found["problems"] = problems
    found["seconds"] = time.perf_counter() - started
    return not problems, found


def run_checks(tasks: list[tuple[str, object, tuple]], jobs: int) -> tuple[dict, list]:
    """``tasks`` (``(name, function, arguments)``, each function returning ``(ok, figures)``) in ``jobs`` processes
    (spawned: CUDA cannot be forked), reported in the tasks' order."""
    results, failed = {}, []
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = [pool.submit(function, *args) for _, function, args in tasks]
        for (name, *_), future in zip(tasks, futures, strict=True):
            ok, found = future.result()
            if "detail" in found:
                detail = found["detail"]
            else:
                top = max(found.get("errors", {}).values(), default=0.0)
                detail = found.get("exception") or f"worst error vs reference {top:.2e} {'; '.join(found['problems'])}"
            _report(ok, name, f"{detail} ({found['seconds']:.0f}s)")
            results[name] = found
            if not ok:
                failed.append(name)
    return results, failed


# ----------------------------------------------------------------------------------------------------------
# The operator through the module, as users get it.


def _make_block(channels: int, dtype: torch.dtype, device: str, config: dict, fast: bool = True):
    from cbam_dsa import CBAMResidualDynamicSA

    torch.manual_seed(0)
    block = CBAMResidualDynamicSA(channels, **config)
    with torch.no_grad():  # random, non-default parameters, so that every gradient is exercised
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    block = block.to(device=device, dtype=dtype)
    block.fast_path = fast
    block.return_maps = True
    return block


def _outputs_and_grads(block, x: torch.Tensor, seed: int = 1) -> list[torch.Tensor]:
    """The outputs, the maps, and the gradients of ``x`` and of every parameter under a random loss on all five."""
    x = x.detach().clone().requires_grad_()
    outs = block(x)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=generator, device=o.device, dtype=torch.float64)).sum()
               for o in outs)
    params = list(block.parameters())
    grads = torch.autograd.grad(loss, [x, *params])
    return [o.detach() for o in outs] + list(grads)


def _worst(got: list, want: list) -> float:
    return max(T._error(g, w) for g, w in zip(got, want, strict=True))


def _operator_block(config: str, dtype: torch.dtype, shape: tuple, layout: str, device: str) -> tuple[bool, str]:
    """The block through the operator against the same block's reference path, both against float64."""
    memory_format = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}[layout]
    torch.manual_seed(1)
    x = torch.randn(shape, device=device).relu().to(dtype).contiguous(memory_format=memory_format)
    channels, settings = shape[1], BLOCK_CONFIGS[config]
    ours = _outputs_and_grads(_make_block(channels, dtype, device, settings), x)
    reference = _outputs_and_grads(_make_block(channels, dtype, device, settings, fast=False), x)
    truth = _outputs_and_grads(_make_block(channels, torch.float64, device, settings, fast=False), x.double())
    same_layout = ours[0].stride() == x.stride() and ours[5].stride() == x.stride()
    error, reference_error = _worst(ours, truth), _worst(reference, truth)
    ok = same_layout and error <= max(FLOOR[dtype], 3 * reference_error)
    return ok, (f"error vs float64 {error:.2e}, the reference's {reference_error:.2e}"
                f"{'' if same_layout else '; the output or the input gradient is not laid out as the input'}")


def _operator_opcheck(config: str, device: str) -> tuple[bool, str]:
    """``torch.library.opcheck`` on both operators, with the block's arguments."""
    from cbam_dsa import ops
    from cbam_dsa.bench.measure import capture_operator_args
    from cbam_dsa.ops import library

    x = torch.randn(2, 6, 5, 7, device=device)
    captured = capture_operator_args(_make_block(6, torch.float32, device, BLOCK_CONFIGS[config]), x)
    if not captured:
        return False, "the block did not call the operator"
    args = [[t.detach() for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)
            else a.detach() if isinstance(a, torch.Tensor) else a for a in captured]
    torch.library.opcheck(ops.FORWARD, [x.clone().requires_grad_(), *args[1:]])
    out, ca, sa, fusion_w, router_w, *saved = ops.FORWARD(*args)
    grads = [torch.randn_like(t) for t in (out, ca, sa, fusion_w, router_w)]
    needs = [t is not None for t in library.gradient_inputs(args)]
    torch.library.opcheck(ops.BACKWARD, (*grads, *args[:15], saved, *args[15:], needs))
    return True, "forward and backward"


def _operator_compiled(dtype: torch.dtype, device: str) -> tuple[bool, str]:
    """A training step of ``torch.compile(block, fullgraph=True)`` against eager mode."""
    x = torch.randn(4, 64, 14, 14, device=device).relu().to(dtype)
    block = _make_block(64, dtype, device, {})
    eager = _outputs_and_grads(block, x)
    graph = _outputs_and_grads(torch.compile(block, fullgraph=True), x)
    error = _worst(graph, eager)
    return error <= FLOOR[dtype], f"compiled vs eager {error:.2e}"


def _operator_task(kind: str, *args: object) -> tuple[bool, dict]:
    """One check of the operator (in a worker process): ``(ok, {"detail", "seconds"})``."""
    from cbam_dsa import ops

    _no_tf32()
    ops.use_triton()
    started = time.perf_counter()
    try:
        ok, detail = {"block": _operator_block, "opcheck": _operator_opcheck, "compiled": _operator_compiled}[kind](
            *args)
    except Exception as error:  # reported, and the other checks go on
        ok, detail = False, repr(error)[:2000]
    return ok, {"detail": detail, "seconds": time.perf_counter() - started}


def operator_tasks(device: str) -> list[tuple[str, tuple]]:
    """The checks of the operator as users get it: ``(name, arguments of _operator_task)``. The stage shapes' blocks
    (default configuration, batch 2) also compile the kernels the timings and the benchmark then launch."""
    tasks = []
    for dtype in (torch.float32, torch.bfloat16):
        for config in BLOCK_CONFIGS:
            for layout in ("contiguous", "channels_last"):
                tasks.append((f"operator {config} {layout}[{dtype}]", ("block", config, dtype, (3, 32, 11, 9), layout,
                                                                       device)))
        for shape in STAGES:
            small = (2, *shape[1:])
            tasks.append((f"operator default {small}[{dtype}]", ("block", "default", dtype, small, "contiguous",
                                                                 device)))
        tasks.append((f"compiled training step[{dtype}]", ("compiled", dtype, device)))
    tasks += [(f"opcheck {config}", ("opcheck", config, device)) for config in ("default", "sum_hard_one_branch")]
    return tasks


# ----------------------------------------------------------------------------------------------------------
# Timings.


def _repeated(fn, calls: int):
    def run():
        for _ in range(calls):
            fn()
    return run


def _timings(rounds: int, device: str = "cuda", shapes: list | None = None) -> list[dict]:
    """Per dtype and shape (the stage shapes and the training batch by default): milliseconds per call (medians) and
    ratios (medians of per-round ratios)."""
    from timm.layers.cbam import CbamModule

    from cbam_dsa import CBAMResidualDynamicSA
    from cbam_dsa.bench.contenders import training_step
    from cbam_dsa.bench.timing import interleaved_times, round_ratio

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for shape in shapes or [*STAGES, TRAINING_BATCH]:
            torch.manual_seed(0)
            channels = shape[1]
            ours = CBAMResidualDynamicSA(channels).to(device=device, dtype=dtype)
            reference = CBAMResidualDynamicSA(channels).to(device=device, dtype=dtype)
            reference.fast_path = False
            cbam = CbamModule(channels).to(device=device, dtype=dtype)
            x = torch.randn(shape, device=device, dtype=dtype).relu()
            x_grad = x.detach().clone().requires_grad_()
            grad_out = torch.randn_like(x)
            calls = 10  # per timed sample: one synchronization per ten calls

            def forward(module, x=x):
                def run():
                    with torch.no_grad():
                        module(x)
                return run

            fns = {"copy": x.clone}
            for name, module in (("ours", ours), ("reference", reference), ("cbam", cbam)):
                fns[f"{name}_forward"] = forward(module)
                fns[f"{name}_train"] = training_step(module, x_grad, grad_out)
            times = interleaved_times({k: _repeated(f, calls) for k, f in fns.items()}, rounds, 2, device)
            row = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch."),
                   "ms": {k: 1e3 * statistics.median(v) / calls for k, v in times.items()}}
            row["ours_vs_cbam_forward"] = round_ratio(times, "ours_forward", "cbam_forward")
            row["ours_vs_cbam_train"] = round_ratio(times, "ours_train", "cbam_train")
            row["ours_vs_reference_forward"] = round_ratio(times, "ours_forward", "reference_forward")
            row["ours_vs_reference_train"] = round_ratio(times, "ours_train", "reference_train")
            row["forward_vs_floor"] = round_ratio(times, "ours_forward", "copy") / 2  # 3 reads + 1 write = 2 copies
            row["copy_gb_per_s"] = 2 * x.numel() * x.element_size() / (row["ms"]["copy"] * 1e-3) / 1e9
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", action="store_true", help="also time the block at the stage shapes")
    parser.add_argument("--rounds", type=int, default=12, help="interleaved rounds of the timings (default: 12)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu under TRITON_INTERPRET=1 to try the script")
    parser.add_argument("--limit", type=int, default=None, help="run only the first LIMIT kernel cases")
    parser.add_argument("--full", action="store_true", help="every case and configuration (many more compilations)")
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="processes for the kernel cases")
    options = parser.parse_args()
    if options.device == "cuda" and not torch.cuda.is_available():
        print("gpu check: no CUDA device")
        return 1
    _no_tf32()
    device_name = torch.cuda.get_device_name() if options.device == "cuda" else options.device
    print(f"gpu check: {device_name}, torch {torch.__version__}", flush=True)
    started = time.perf_counter()
    from cbam_dsa import ops

    registered = ops.use_triton()
    print(f"gpu check: the Triton kernels registered for CUDA tensors: {registered}", flush=True)
    tasks = [(name, _check, (shape, dtype, config, options.device)) for name, shape, dtype, config in
             _cases(options.full)[: options.limit]]
    kernel_names = {name for name, *_ in tasks}
    if options.device == "cuda":  # the operator on CPU tensors runs the C kernels: nothing of Triton's to check
        tasks += [(name, _operator_task, args) for name, args in operator_tasks(options.device)]
    results, failed = run_checks(tasks, max(1, options.jobs))
    print(f"gpu check: {len(results) - len(failed)} of {len(results)} checks ok in "
          f"{time.perf_counter() - started:.0f}s", flush=True)
    cases = {name: found for name, found in results.items() if name in kernel_names}
    operator = {name: found for name, found in results.items() if name not in kernel_names}
    timings = _timings(options.rounds) if options.time and options.device == "cuda" and not failed else []
    if options.json:
        options.json.write_text(json.dumps({"device": device_name, "torch": torch.__version__, "cases": cases,
                                            "operator": operator, "failed": failed, "timings": timings}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
