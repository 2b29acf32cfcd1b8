"""The measurements behind ``cbam-dsa bench``: per input shape, per contender, and the operator's call overhead.

For each input shape and contender (:mod:`.contenders`; method: ``benchmarks/README.md``):

* forward time under ``torch.no_grad()`` and forward + backward time, in interleaved rounds (:mod:`.timing`);
* bytes autograd saves for backward beyond the input, and the peak memory of one step (:mod:`.memory`).

Then the block on other inputs (:mod:`.inputs`), the operator's per-call overhead (:func:`measure_overhead`) and the
resnet50 training step (:mod:`.network`).
timm and torchvision are imported only when the benchmark runs.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import ops
from ..block import CBAMResidualDynamicSA
from ..ops.cpu import native
from .contenders import BASELINE, build_contenders, label, training_step
from .inputs import measure_inputs
from .memory import counting_faults, keep_freed_memory, peak_step_memory, saved_tensor_bytes
from .network import measure_network
from .timing import ORDERS, interleaved_times, round_ratio, summarize, timed_faults

__all__ = [
    "PAIRS",
    "QUICK_SHAPES",
    "SHAPES",
    "Settings",
    "capture_operator_args",
    "measure_overhead",
    "measure_shape",
    "run_benchmark",
]

SHAPES: tuple[tuple[int, int, int, int], ...] = ((16, 64, 56, 56), (8, 256, 28, 28), (32, 512, 7, 7))
"""ResNet stage shapes ``(B, C, H, W)``: early (large maps), middle, and late (small maps, many channels)."""

QUICK_SHAPES: tuple[tuple[int, int, int, int], ...] = ((2, 16, 14, 14), (2, 32, 7, 7))
"""Tiny shapes for ``--quick`` (a check of the tool, not of the numbers)."""

PAIRS = (("ours_compiled", "ours_operator"), ("ours_compiled", "timm_cbam_compiled"))
"""Ratios between two contenders besides the ones to timm's ``CbamModule``: ``(name, baseline)``."""


@dataclass
class Settings:
    """What to run.

    Args:
        shapes: input shapes ``(B, C, H, W)``.
        rounds: interleaved timing rounds per figure.
        warmup: untimed calls per contender before the rounds.
        compile: also time the block and timm's modules under ``torch.compile(fullgraph=True)``.
        network: also time the resnet50 training step.
        network_compile: also time the compiled resnet50 training steps (with ``network``; off by default: compiling
            the four networks takes four to ten minutes on two cores).
        network_rounds: rounds of the network timing.
        network_batch, network_size: the network's input, ``(batch, 3, size, size)``.
        network_autocast: ``None``, or ``"bfloat16"`` / ``"float16"``: the network's step under ``torch.autocast`` to
            that dtype (the model in ``dtype``), as mixed-precision training runs it.
        inputs: also time the block on other inputs (channels_last, strided, float16, bfloat16; CPU float32 runs).
        inputs_rounds: rounds of those timings.
        overhead: also measure the operator's per-call overhead (CPU).
        overhead_shape: the input of that measurement.
        overhead_calls: calls per timed sample of it.
        device: ``"cpu"`` or ``"cuda"``.
        dtype: ``"float32"`` or ``"bfloat16"`` (modules and inputs).
        threads: ``torch.set_num_threads`` for the run (CPU).
        seed: seed of weights, inputs and the order of the contenders in each round.
        keep_heap: have the C allocator keep freed memory (:func:`.memory.keep_freed_memory`, glibc) before
            measuring, for the rest of the process, so that a layer's step alone in a loop does not fault on memory
            returned to the system as a network's step does not; off for ``quick`` (the test suite's process).
    """

    shapes: Sequence[tuple[int, int, int, int]] = SHAPES
    rounds: int = 16
    warmup: int = 2
    compile: bool = True
    network: bool = True
    network_compile: bool = False
    network_rounds: int = 21
    network_batch: int = 8
    network_size: int = 160
    network_autocast: str | None = None
    inputs: bool = True
    inputs_rounds: int = 6
    overhead: bool = True
    overhead_shape: tuple[int, int, int, int] = (32, 512, 7, 7)
    overhead_calls: int = 20
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 2
    seed: int = 0
    keep_heap: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def quick(cls, **overrides: Any) -> Settings:
        """Tiny shapes, two rounds, no compilation, a small network step: seconds, for the test suite."""
        values = {
            "shapes": QUICK_SHAPES,
            "rounds": 2,
            "warmup": 1,
            "compile": False,
            "network_compile": False,
            "network_rounds": 1,
            "network_batch": 2,
            "network_size": 64,
            "inputs_rounds": 1,
            "overhead_shape": (2, 32, 7, 7),
            "overhead_calls": 2,
            "keep_heap": False,
        }
        values.update(overrides)
        return cls(**values)


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:300]


def measure_shape(settings: Settings, shape: tuple[int, int, int, int], dtype: torch.dtype) -> dict[str, Any]:
    """Every figure of one input shape (see the module docstring)."""
    device = settings.device
    if settings.compile:
        torch._dynamo.reset()  # each shape compiles afresh, for static shapes (what a fixed-size model gets)
    torch.manual_seed(settings.seed)
    contenders = build_contenders(shape[1], settings.compile, device, dtype)
    x = torch.randn(shape, device=device, dtype=dtype).relu()  # features after a ReLU, ties included
    x_grad = x.detach().clone().requires_grad_()
    grad_out = torch.randn_like(x)

    def forward(module: nn.Module) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return module(x)

        return run

    def train(module: nn.Module) -> Callable[[], None]:
        return training_step(module, x_grad, grad_out)

    errors: dict[str, str] = {}
    for name in list(contenders):
        contender = contenders[name]
        try:  # a compiler missing on this machine drops the compiled rows, not the run
            contender.wrap(forward(contender.module))()
            contender.wrap(train(contender.module))()
        except Exception as error:  # reported in the results
            if not name.endswith("_compiled"):
                raise
            errors[name] = _first_line(error)
            del contenders[name]
    faults: dict[str, dict[str, list[int]]] = {}
    times: dict[str, dict[str, list[float]]] = {}
    for figure, step in (("forward", forward), ("forward_backward", train)):
        faults[figure] = {n: [] for n in contenders}
        fns = {n: counting_faults(c.wrap(step(c.module)), faults[figure][n]) for n, c in contenders.items()}
        times[figure] = interleaved_times(fns, settings.rounds, settings.warmup, device, settings.seed)
    forward_times, train_times = times["forward"], times["forward_backward"]
    forward_summary = summarize(forward_times, BASELINE)
    train_summary = summarize(train_times, BASELINE)
    input_bytes = x.numel() * x.element_size()
    results: dict[str, Any] = {}
    memory_method = "not measured"
    for name, contender in contenders.items():
        saved = None
        if not name.endswith("_compiled"):
            saved = contender.wrap(lambda module=contender.module: saved_tensor_bytes(module, x_grad))()
        peak, memory_method = peak_step_memory(contender.wrap(train(contender.module)), device)
        results[name] = {
            "label": label(name, device),
            "forward": forward_summary[name],
            "forward_backward": train_summary[name],
            "page_faults": {figure: timed_faults(counts[name], settings.rounds) for figure, counts in faults.items()},
            "saved_bytes": saved,
            "saved_ratio": None if saved is None else saved / input_bytes,
            "peak_bytes": peak,
        }
    pairs = {
        f"{name}/{baseline}": {
            "forward": round_ratio(forward_times, name, baseline),
            "forward_backward": round_ratio(train_times, name, baseline),
        }
        for name, baseline in PAIRS
        if name in contenders and baseline in contenders
    }
    return {
        "shape": list(shape),
        "input_bytes": input_bytes,
        "contenders": results,
        "pairs": pairs,
        "errors": errors,
        "peak_memory_method": memory_method,
    }


def capture_operator_args(block: CBAMResidualDynamicSA, x: Tensor) -> tuple[Any, ...]:
    """The arguments ``block(x)`` passes to ``torch.ops.cbam_dsa.block_forward``, recorded from one call (under
    ``torch.no_grad()``); ``()`` where the block does not call the operator on ``x``."""
    calls: list[tuple[Any, ...]] = []
    operator = ops.FORWARD

    def record(*args: Any) -> Any:
        calls.append(args)
        return operator(*args)

    ops.FORWARD = record  # fused_block calls the operator through this module attribute
    try:
        with torch.no_grad():
            block(x)
    finally:
        ops.FORWARD = operator
    return calls[0] if calls else ()


def cpu_kernel(*args: Any) -> Any:
    """``torch.ops.cbam_dsa.block_forward`` below the autograd key: the CPU kernel alone (the library's C++ kernel,
    else the PyTorch implementation), as the autograd kernel reaches it."""
    with torch._C._AutoDispatchBelowAutograd():
        return ops.FORWARD(*args)


def measure_overhead(settings: Settings, dtype: torch.dtype) -> dict[str, Any] | None:
    """What one forward of the block costs beyond the CPU kernel it runs, under ``torch.no_grad()``.

    Three calls with the same arguments, timed side by side in interleaved rounds (each sample
    ``settings.overhead_calls`` calls, reported per call): ``block(x)``; ``torch.ops.cbam_dsa.block_forward`` with
    the arguments the block gives it; :func:`cpu_kernel`, the same call below the autograd key (the CPU kernel alone,
    reported as ``implementation``). The operator's overhead is the median over rounds of operator time -
    implementation time (the autograd kernel); the module's is block time - operator time (the input check and the
    gathering of the weights). ``None`` off the CPU, or where the block does not run the operator.
    """
    if settings.device != "cpu":
        return None
    torch.manual_seed(settings.seed)
    block = CBAMResidualDynamicSA(settings.overhead_shape[1]).to(dtype=dtype)
    x = torch.randn(settings.overhead_shape, dtype=dtype).relu()
    args = capture_operator_args(block, x)
    if not args:
        return None
    calls = settings.overhead_calls

    def repeat(fn: Callable[..., Any], *call_args: Any) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                for _ in range(calls):
                    fn(*call_args)

        return run

    fns = {
        "block": repeat(block, x),
        "operator": repeat(ops.FORWARD, *args),
        "implementation": repeat(cpu_kernel, *args),
    }
    times = interleaved_times(fns, settings.rounds, settings.warmup, "cpu", settings.seed)
    per_call = {name: [t / calls for t in values] for name, values in times.items()}

    def median_us(values: Sequence[float]) -> float:
        return statistics.median(values) * 1e6

    def difference(a: str, b: str) -> list[float]:
        return [t - u for t, u in zip(per_call[a], per_call[b], strict=True)]

    return {
        "shape": list(settings.overhead_shape),
        "calls_per_sample": calls,
        "fused_kernels": native.library() is not None,
        "median_us": {name: median_us(values) for name, values in per_call.items()},
        "min_us": {name: min(values) * 1e6 for name, values in per_call.items()},
        "operator_overhead_us": median_us(difference("operator", "implementation")),
        "module_overhead_us": median_us(difference("block", "operator")),
        "operator_overhead_ratio": round_ratio(
            {"overhead": difference("operator", "implementation"), "block": per_call["block"]}, "overhead", "block"
        ),
    }


def machine_info(settings: Settings) -> dict[str, Any]:
    """The machine and versions behind a run."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "fused_kernels": settings.device == "cpu" and native.library() is not None,
    }
    with contextlib.suppress(ImportError):
        import timm

        info["timm"] = timm.__version__
    if settings.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["cuda_kernels"] = "triton" if "cuda" in ops.library.devices() else None
        with contextlib.suppress(ImportError):
            import triton

            info["triton"] = triton.__version__
    return info


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


@contextlib.contextmanager
def _threads(count: int, device: str) -> Iterator[None]:
    previous = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_benchmark(settings: Settings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run everything ``settings`` asks for; returns the results as a JSON-ready dict."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[settings.dtype]
    with _threads(settings.threads, settings.device):
        results: dict[str, Any] = {"settings": {k: v for k, v in asdict(settings).items() if k != "extra"}}
        results["settings"]["shapes"] = [list(s) for s in settings.shapes]
        results["settings"]["overhead_shape"] = list(settings.overhead_shape)
        results["settings"].update(settings.extra)
        results["machine"] = machine_info(settings)
        results["machine"]["heap"] = (keep_freed_memory() if settings.keep_heap else None) or "system default"
        results["baseline"] = BASELINE
        results["orders"] = ORDERS
        results["shapes"] = []
        for shape in settings.shapes:
            log(f"shape {tuple(shape)} ...")
            results["shapes"].append(measure_shape(settings, tuple(shape), dtype))
        if settings.inputs and settings.device == "cpu" and settings.dtype == "float32":
            log("other inputs (channels_last, strided, float16, bfloat16) ...")
            results["inputs"] = measure_inputs(settings.shapes, settings.inputs_rounds, settings.warmup, settings.seed)
        if settings.overhead:
            log(f"operator overhead at {tuple(settings.overhead_shape)} ...")
            results["overhead"] = measure_overhead(settings, dtype)
        if settings.network:
            log("resnet50 training step ...")
            results["network"] = measure_network(settings, dtype, log)
    return results
