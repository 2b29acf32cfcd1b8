"""The benchmark behind ``cbam-dsa bench``: the block against timm's CBAM and SE, eager and compiled.

What it measures, for each input shape and contender (method: ``benchmarks/README.md``):

* forward time under ``torch.no_grad()`` and forward + backward time;
* bytes autograd saves for backward beyond the input (:func:`saved_tensor_bytes`);
* peak memory of one forward + backward step (:func:`peak_step_memory`): CUDA's allocator peak on GPU, the
  growth of the process's peak resident memory on Linux CPUs, not measured elsewhere;
* the time one training step of timm's ``resnet50`` takes with each attention layer, against the plain network.

Timings come from interleaved rounds: every round times each contender once, in an order drawn at random for
the round (seeded), so a slow spell of a shared machine hits all of them and no contender always runs after the
same other one. Each contender gets its minimum and median over rounds, and the
median over rounds of its ratio to timm's ``CbamModule`` in the same round. timm, torchvision and matplotlib
are imported only when the benchmark runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import json
import os
import platform
import random
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .block import CBAMResidualDynamicSA
from .ops.cpu import native

try:
    import resource
except ImportError:  # Windows: no page-fault counts
    resource = None  # type: ignore[assignment]

__all__ = [
    "QUICK_SHAPES",
    "SHAPES",
    "Settings",
    "build_contenders",
    "interleaved_times",
    "peak_step_memory",
    "render_markdown",
    "render_table",
    "render_targets",
    "run_benchmark",
    "saved_tensor_bytes",
    "write_chart",
    "write_outputs",
]

SHAPES: tuple[tuple[int, int, int, int], ...] = ((16, 64, 56, 56), (8, 256, 28, 28), (32, 512, 7, 7))
"""The ResNet stage shapes ``(B, C, H, W)`` of the issue's targets."""

QUICK_SHAPES: tuple[tuple[int, int, int, int], ...] = ((2, 16, 14, 14), (2, 32, 7, 7))
"""Tiny shapes for ``--quick`` (a check of the tool, not of the numbers)."""

BASELINE = "timm_cbam"
"""The contender every ratio is taken against."""

LABELS = {
    "timm_cbam": "timm CbamModule",
    "timm_se": "timm SEModule",
    "ours_reference": "ours, reference path",
    "ours_fast": "ours, fast path",
    "timm_cbam_compiled": "timm CbamModule + compile",
    "timm_se_compiled": "timm SEModule + compile",
    "ours_compiled": "ours + compile",
}
"""Display names. Under ``torch.compile`` the block runs its reference path (the compiler fuses the plain
math itself), so one compiled row stands for both of our paths."""

NETWORK_LABELS = {
    "plain": "resnet50, no attention",
    "se": "+ timm SEModule",
    "cbam": "+ timm CbamModule",
    "ours_fast": "+ ours, fast path",
    "ours_reference": "+ ours, reference path",
}


@dataclass
class Settings:
    """What to run.

    Args:
        shapes: input shapes ``(B, C, H, W)``.
        rounds: interleaved timing rounds per figure.
        warmup: untimed calls per contender before the rounds.
        compile: also time every contender under ``torch.compile``.
        network: also time the resnet50 training step.
        network_rounds: rounds of the network timing.
        network_batch, network_size: the network's input, ``(batch, 3, size, size)``.
        device: ``"cpu"`` or ``"cuda"``.
        dtype: ``"float32"`` or ``"bfloat16"`` (modules and inputs).
        threads: ``torch.set_num_threads`` for the run (CPU).
        seed: seed of weights, inputs and the order of the contenders in each round.
    """

    shapes: Sequence[tuple[int, int, int, int]] = SHAPES
    rounds: int = 15
    warmup: int = 2
    compile: bool = True
    network: bool = True
    network_rounds: int = 21
    network_batch: int = 8
    network_size: int = 160
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 2
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def quick(cls, **overrides: Any) -> Settings:
        """Tiny shapes, two rounds, no compilation, a small network step: seconds, for the test suite."""
        values = {
            "shapes": QUICK_SHAPES,
            "rounds": 2,
            "warmup": 1,
            "compile": False,
            "network_rounds": 1,
            "network_batch": 2,
            "network_size": 64,
        }
        values.update(overrides)
        return cls(**values)


# ----------------------------------------------------------------------------------------------------------
# Contenders and measurements.


def build_contenders(channels: int, compile: bool, device: str, dtype: torch.dtype) -> dict[str, nn.Module]:
    """The modules to compare, keyed as in :data:`LABELS` (default configurations, random weights)."""
    from timm.layers.cbam import CbamModule
    from timm.layers.squeeze_excite import SEModule

    reference = CBAMResidualDynamicSA(channels)
    reference.fast_path = False
    eager = {
        "timm_cbam": CbamModule(channels),
        "timm_se": SEModule(channels),
        "ours_reference": reference,
        "ours_fast": CBAMResidualDynamicSA(channels),
    }
    modules = {name: module.to(device=device, dtype=dtype) for name, module in eager.items()}
    if compile:
        for name in ("timm_cbam", "timm_se", "ours_fast"):
            compiled_name = "ours_compiled" if name == "ours_fast" else f"{name}_compiled"
            modules[compiled_name] = torch.compile(modules[name], dynamic=True)
    return modules


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: str) -> float:
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def interleaved_times(
    fns: dict[str, Callable[[], Any]], rounds: int, warmup: int, device: str = "cpu", seed: int = 0
) -> dict[str, list[float]]:
    """Seconds per call of each function: ``warmup`` untimed calls each, then ``rounds`` rounds that call every
    function once, each round in an order drawn at random (from ``seed``).

    A fixed or rotating order would let one function run right after the same other one in most rounds, and what
    a call leaves behind (the caches, the allocator's heap) can shift the next call's time."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    order = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for name in order.sample(names, len(names)):
            times[name].append(_timed(fns[name], device))
    return times


def summarize(times: dict[str, list[float]], baseline: str) -> dict[str, dict[str, float | None]]:
    """Per function: ``min_ms``, ``median_ms`` and ``ratio`` (median over rounds of its time / the baseline's)."""
    summary = {}
    for name, values in times.items():
        ratio = None
        if baseline in times:
            ratio = statistics.median(a / b for a, b in zip(values, times[baseline], strict=True))
        summary[name] = {"min_ms": min(values) * 1e3, "median_ms": statistics.median(values) * 1e3, "ratio": ratio}
    return summary


def saved_tensor_bytes(module: nn.Module, x: Tensor) -> int:
    """Bytes autograd saves for backward in one forward of ``module(x)``, beyond the input and the module's own
    parameters and buffers.

    Every tensor autograd packs is seen through :func:`torch.autograd.graph.saved_tensors_hooks`; tensors that
    share a storage count once, and storages shared with ``x`` (the input, or views of it) or with the
    module's parameters and buffers do not count.
    """
    excluded = {x.untyped_storage().data_ptr()}
    excluded.update(t.untyped_storage().data_ptr() for t in module.parameters())
    excluded.update(t.untyped_storage().data_ptr() for t in module.buffers())
    seen: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded and storage.nbytes() > 0:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = module(x)
    total = sum(seen.values())
    del out
    return total


def _rss_bytes(field_name: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"{field_name}:\s+(\d+) kB", text)
    if match is None:
        raise OSError(f"{field_name} not found in /proc/self/status")
    return int(match.group(1)) * 1024


def peak_step_memory(step: Callable[[], Any], device: str) -> tuple[int | None, str]:
    """Peak memory one call of ``step`` adds, and how it was measured.

    CUDA: ``torch.cuda.max_memory_allocated`` over the step, minus the memory allocated before it. Linux CPU:
    after freeing the C allocator's cached memory (``malloc_trim``) and resetting the peak resident set size
    (``/proc/self/clear_refs``), the growth of the peak resident memory (``VmHWM``) during the step, which
    counts every page the step touches (page granularity, allocator overheads included). Elsewhere:
    ``(None, "not measured")``.
    """
    step()
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, "cuda max_memory_allocated"
    if not sys.platform.startswith("linux"):
        return None, "not measured"
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        before = _rss_bytes("VmRSS")
        step()
        return _rss_bytes("VmHWM") - before, "linux peak RSS growth"
    except OSError:
        return None, "not measured"


def _zero_grads(module: nn.Module, x: Tensor) -> None:
    x.grad = None
    for parameter in module.parameters():
        parameter.grad = None


def measure_shape(settings: Settings, shape: tuple[int, int, int, int], dtype: torch.dtype) -> dict[str, Any]:
    """Every figure of one input shape (see the module docstring)."""
    device = settings.device
    torch.manual_seed(settings.seed)
    modules = build_contenders(shape[1], settings.compile, device, dtype)
    x = torch.randn(shape, device=device, dtype=dtype).relu()  # features after a ReLU, ties included
    x_grad = x.detach().clone().requires_grad_()
    grad_out = torch.randn_like(x)

    def forward(module: nn.Module) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return module(x)

        return run

    def train(module: nn.Module) -> Callable[[], None]:
        def run() -> None:
            _zero_grads(module, x_grad)
            module(x_grad).backward(grad_out)

        return run

    errors: dict[str, str] = {}
    for name in list(modules):
        try:  # a compiler missing on this machine drops the compiled rows, not the run
            forward(modules[name])()
            train(modules[name])()
        except Exception as error:  # reported in the results
            if not name.endswith("_compiled"):
                raise
            errors[name] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            del modules[name]
    fns = {n: forward(m) for n, m in modules.items()}
    forward_times = interleaved_times(fns, settings.rounds, settings.warmup, device, settings.seed)
    fns = {n: train(m) for n, m in modules.items()}
    train_times = interleaved_times(fns, settings.rounds, settings.warmup, device, settings.seed)
    forward_summary = summarize(forward_times, BASELINE)
    train_summary = summarize(train_times, BASELINE)
    input_bytes = x.numel() * x.element_size()
    results: dict[str, Any] = {}
    memory_method = "not measured"
    for name, module in modules.items():
        saved = None
        if not name.endswith("_compiled"):
            saved = saved_tensor_bytes(module, x_grad)
        peak, memory_method = peak_step_memory(train(module), device)
        results[name] = {
            "label": LABELS[name],
            "forward": forward_summary[name],
            "forward_backward": train_summary[name],
            "saved_bytes": saved,
            "saved_ratio": None if saved is None else saved / input_bytes,
            "peak_bytes": peak,
        }
    return {
        "shape": list(shape),
        "input_bytes": input_bytes,
        "contenders": results,
        "errors": errors,
        "peak_memory_method": memory_method,
    }


def _network(attn: Any, num_classes: int, device: str, dtype: torch.dtype) -> nn.Module:
    import timm

    block_args = {} if attn is None else {"block_args": {"attn_layer": attn}}
    model = timm.create_model("resnet50", pretrained=False, num_classes=num_classes, **block_args)
    return model.to(device=device, dtype=dtype).train()


def measure_network(settings: Settings, dtype: torch.dtype) -> dict[str, Any]:
    """The time of one training step (forward, cross-entropy, backward, SGD step) of timm's resnet50 with each
    attention layer, and each one's overhead over the plain network: the median over rounds of
    ``time / plain time - 1``."""
    device = settings.device
    torch.manual_seed(settings.seed)
    variants: dict[str, nn.Module] = {
        "plain": _network(None, 10, device, dtype),
        "se": _network("se", 10, device, dtype),
        "cbam": _network("cbam", 10, device, dtype),
        "ours_fast": _network(CBAMResidualDynamicSA, 10, device, dtype),
        "ours_reference": _network(CBAMResidualDynamicSA, 10, device, dtype),
    }
    for module in variants["ours_reference"].modules():
        if isinstance(module, CBAMResidualDynamicSA):
            module.fast_path = False
    size = settings.network_size
    images = torch.randn(settings.network_batch, 3, size, size, device=device, dtype=dtype)
    targets = torch.randint(0, 10, (settings.network_batch,), device=device)

    faults: dict[str, list[int]] = {name: [] for name in variants}

    def step(name: str, model: nn.Module) -> Callable[[], None]:
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

        def run() -> None:
            before = _minor_faults()
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(images), targets).backward()
            optimizer.step()
            if before is not None:
                faults[name].append(_minor_faults() - before)

        return run

    fns = {name: step(name, model) for name, model in variants.items()}
    times = interleaved_times(fns, settings.network_rounds, 1, device, settings.seed)
    summary = summarize(times, "plain")
    results = {}
    for name, values in summary.items():
        timed = faults[name][1:]  # after the warm-up step
        results[name] = {
            "label": NETWORK_LABELS[name],
            "step": {"min_ms": values["min_ms"], "median_ms": values["median_ms"]},
            "overhead": None if name == "plain" else values["ratio"] - 1.0,
            "parameters": sum(p.numel() for p in variants[name].parameters()),
            "page_faults": statistics.median(timed) if timed else None,
        }
    return {
        "model": "timm resnet50, num_classes=10",
        "input": [settings.network_batch, 3, size, size],
        "variants": results,
        "ours_vs_se": paired_comparison(times["ours_fast"], times["se"]),
    }


def _minor_faults() -> int | None:
    """The process's minor page faults so far (``None`` where ``resource`` is missing: Windows)."""
    return None if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def paired_comparison(ours: Sequence[float], other: Sequence[float]) -> dict[str, float | int]:
    """Round by round, ``ours`` against ``other`` (times of the same rounds): the median of ``ours / other - 1``, the
    median difference in ms, and in how many rounds ``ours`` was faster."""
    pairs = list(zip(ours, other, strict=True))
    return {
        "median_ratio": statistics.median(a / b for a, b in pairs) - 1.0,
        "median_diff_ms": statistics.median(a - b for a, b in pairs) * 1e3,
        "faster_rounds": sum(a < b for a, b in pairs),
        "rounds": len(pairs),
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
        results["settings"].update(settings.extra)
        results["machine"] = machine_info(settings)
        results["baseline"] = BASELINE
        results["shapes"] = []
        for shape in settings.shapes:
            log(f"shape {tuple(shape)} ...")
            results["shapes"].append(measure_shape(settings, tuple(shape), dtype))
        if settings.network:
            log("resnet50 training step ...")
            results["network"] = measure_network(settings, dtype)
    return results


# ----------------------------------------------------------------------------------------------------------
# Reports: a text table, Markdown, JSON and a chart.


def _ms(summary: dict[str, Any]) -> str:
    return f"{summary['min_ms']:.2f} / {summary['median_ms']:.2f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.2f}"


def _rows(entry: dict[str, Any]) -> list[list[str]]:
    rows = []
    for result in entry["contenders"].values():
        saved = (
            "-" if result["saved_bytes"] is None else f"{_mib(result['saved_bytes'])} ({result['saved_ratio']:.3f}x)"
        )
        rows.append(
            [
                result["label"],
                _ms(result["forward"]),
                _ratio(result["forward"]["ratio"]),
                _ms(result["forward_backward"]),
                _ratio(result["forward_backward"]["ratio"]),
                saved,
                _mib(result["peak_bytes"]),
            ]
        )
    return rows


SHAPE_HEADER = [
    "contender",
    "forward ms (min / median)",
    "vs CBAM",
    "fwd+bwd ms (min / median)",
    "vs CBAM",
    "saved MiB (x input)",
    "peak MiB",
]
NETWORK_HEADER = ["network", "step ms (min / median)", "overhead vs plain", "parameters", "page faults / step"]


def _network_rows(network: dict[str, Any]) -> list[list[str]]:
    rows = []
    for result in network["variants"].values():
        overhead = "-" if result["overhead"] is None else f"{100 * result['overhead']:+.1f}%"
        faults = result.get("page_faults")  # absent in results written before it was measured
        parameters, faults = f"{result['parameters'] / 1e6:.2f} M", "-" if faults is None else f"{faults:,.0f}"
        rows.append([result["label"], _ms(result["step"]), overhead, parameters, faults])
    return rows


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _title(results: dict[str, Any]) -> str:
    settings, machine = results["settings"], results["machine"]
    threads = f"{machine['threads']} thread" + ("s" if machine["threads"] != 1 else "")
    where = machine.get("gpu") if settings["device"] == "cuda" else f"{machine['cpu']}, {threads}"
    return f"{settings['device'].upper()} {settings['dtype']} ({where})"


def render_table(results: dict[str, Any]) -> str:
    """The results as plain-text tables (what ``cbam-dsa bench`` prints)."""
    parts = [_title(results)]
    for entry in results["shapes"]:
        parts.append(f"\nshape {tuple(entry['shape'])}, input {_mib(entry['input_bytes'])} MiB")
        parts.append(_text_table(SHAPE_HEADER, _rows(entry)))
        parts += [f"  {name}: skipped ({error})" for name, error in entry["errors"].items()]
    if "network" in results:
        network = results["network"]
        parts.append(f"\n{network['model']}, one training step on {tuple(network['input'])}")
        parts.append(_text_table(NETWORK_HEADER, _network_rows(network)))
    return "\n".join(parts) + "\n"


def _markdown_section(results: dict[str, Any]) -> str:
    machine, settings = results["machine"], results["settings"]
    versions = f"torch {machine['torch']}, timm {machine.get('timm', '?')}, Python {machine['python']}"
    if settings["device"] == "cuda":
        versions += f", CUDA {machine.get('cuda')}"
    command = settings.get("command", "cbam-dsa bench")
    parts = [
        f"## {_title(results)}",
        "",
        f"Measured {machine['date']} with `{command}`: {settings['rounds']} interleaved rounds, "
        f"{machine['cpu_count']} CPUs, {versions}, {machine['platform']}.",
    ]
    if settings["device"] == "cpu" and "fused_kernels" in machine:
        parts[-1] += (
            " The fast path ran on the fused C kernels."
            if machine["fused_kernels"]
            else " The fast path ran without the fused C kernels (PyTorch operations only)."
        )
    targets = render_targets(results)
    if targets:
        parts += ["", targets]
    if settings["device"] == "cuda":
        parts += [
            "",
            "At these sizes one GPU call takes about a millisecond, so kernel launches and Python dispatch dominate"
            " the times: they count operations more than memory traffic.",
        ]
    for entry in results["shapes"]:
        parts += ["", f"### Input {tuple(entry['shape'])} ({_mib(entry['input_bytes'])} MiB)", ""]
        parts.append(_markdown_table(SHAPE_HEADER, _rows(entry)))
        parts += [f"\n{LABELS[name]}: skipped ({error})" for name, error in entry["errors"].items()]
    if results["shapes"]:
        parts += ["", f"Peak memory: {results['shapes'][0]['peak_memory_method']}."]
    if "network" in results:
        network = results["network"]
        parts += ["", f"### {network['model']}, one training step on {tuple(network['input'])}", ""]
        parts.append(_markdown_table(NETWORK_HEADER, _network_rows(network)))
    return "\n".join(parts)


TARGET_TIME_RATIO = 0.8
TARGET_SAVED_RATIO = 0.05


def _check(value: float | None, ok: bool) -> str:
    return "-" if value is None else f"{value:.3f} {'(met)' if ok else '(missed)'}"


def render_targets(results: dict[str, Any]) -> str | None:
    """The targets of issue 3 against a run: time ratios <= 0.8 of timm CbamModule, saved bytes <= 0.05 of the
    input, resnet50 overhead <= SE's. ``None`` for runs the targets are not about (they are set for CPU float32)."""
    settings = results["settings"]
    if settings["device"] != "cpu" or settings["dtype"] != "float32":
        return None
    rows = []
    for entry in results["shapes"]:
        fast = entry["contenders"].get("ours_fast")
        if fast is None:
            continue
        forward, train = fast["forward"]["ratio"], fast["forward_backward"]["ratio"]
        saved = fast["saved_ratio"]
        rows.append(
            [
                "x".join(str(v) for v in entry["shape"]),
                _check(forward, forward is not None and forward <= TARGET_TIME_RATIO),
                _check(train, train is not None and train <= TARGET_TIME_RATIO),
                _check(saved, saved is not None and saved <= TARGET_SAVED_RATIO),
            ]
        )
    header = ["input", "forward vs CBAM (<= 0.8)", "fwd+bwd vs CBAM (<= 0.8)", "saved / input (<= 0.05)"]
    parts = ["### Targets of issue 3 (fast path, this run)", "", _markdown_table(header, rows)]
    if "network" in results:
        variants = results["network"]["variants"]
        ours, se = variants["ours_fast"]["overhead"], variants["se"]["overhead"]
        verdict = "met" if ours <= se else "missed"
        parts += ["", f"resnet50 overhead: ours {100 * ours:+.1f}% against SE {100 * se:+.1f}% ({verdict})."]
        paired = results["network"].get("ours_vs_se")
        if paired:
            parts[-1] += (
                f" Round by round, ours against SE: {100 * paired['median_ratio']:+.1f}% (median), ours faster in"
                f" {paired['faster_rounds']} of {paired['rounds']} rounds."
            )
    return "\n".join(parts)


def render_markdown(runs: Sequence[dict[str, Any]]) -> str:
    """``docs/BENCHMARKS.md``: one section per run (for example a CPU run and GPU runs)."""
    intro = (
        "# Benchmarks\n\n"
        "The block's default configuration against timm's `CbamModule` and `SEModule`, written by `cbam-dsa bench`"
        " (method: [benchmarks/README.md](../benchmarks/README.md); raw results: `benchmarks/results-*.json`).\n"
        "Times are min / median over interleaved rounds; *vs CBAM* is the median over rounds of the time divided"
        " by timm `CbamModule`'s in the same round. *Saved* counts the tensors autograd keeps for backward beyond"
        " the input and the parameters (not measured under torch.compile). Under torch.compile the block runs its"
        " reference path, so one compiled row stands for both paths.\n"
    )
    return intro + "\n" + "\n\n".join(_markdown_section(run) for run in runs) + "\n"


def write_chart(results: dict[str, Any], path: Path) -> None:
    """A bar chart of the time ratios to timm's ``CbamModule`` (forward, forward + backward) per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = results["shapes"]
    names = list(shapes[0]["contenders"]) if shapes else []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    width = 0.8 / max(len(names), 1)
    for ax, key, title in zip(
        axes, ("forward", "forward_backward"), ("forward (no_grad)", "forward + backward"), strict=True
    ):
        for i, name in enumerate(names):
            values = [entry["contenders"].get(name, {}).get(key, {}).get("ratio") or 0.0 for entry in shapes]
            positions = [s + (i - (len(names) - 1) / 2) * width for s in range(len(shapes))]
            ax.bar(positions, values, width=width, label=LABELS[name])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(0.8, color="gray", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(shapes)), ["x".join(str(v) for v in entry["shape"]) for entry in shapes])
        ax.set_title(title)
        ax.set_ylabel("time / timm CbamModule (median of rounds)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"cbam-dsa bench: {_title(results)}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write ``results-<device>-<dtype>.json``, ``.txt`` (the table) and ``.png`` (the chart) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    stem = f"results-{results['settings']['device']}-{results['settings']['dtype']}"
    paths = {"json": out / f"{stem}.json", "table": out / f"{stem}.txt", "chart": out / f"{stem}.png"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    paths["table"].write_text(render_table(results))
    write_chart(results, paths["chart"])
    return paths
