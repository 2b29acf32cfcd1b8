"""Memory figures: the bytes autograd saves for backward, the peak memory of a step, page faults."""

from __future__ import annotations

import ctypes
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

try:
    import resource
except ImportError:  # Windows: no page-fault counts
    resource = None  # type: ignore[assignment]

__all__ = ["counting_faults", "minor_faults", "peak_step_memory", "saved_tensor_bytes"]


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


def minor_faults() -> int | None:
    """The process's minor page faults so far (``None`` where ``resource`` is missing: Windows)."""
    return None if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def counting_faults(fn: Callable[[], Any], counts: list[int]) -> Callable[[], Any]:
    """``fn``, appending the minor page faults of each of its calls to ``counts`` (``fn`` itself where they cannot be
    counted: Windows).

    A minor fault is a page the process touches for the first time since the system mapped it: glibc's allocator
    returns freed memory to the system when the top of its heap holds enough of it, and the next call that needs the
    memory faults on every page of it again (``benchmarks/README.md``)."""
    if resource is None:
        return fn

    def run() -> Any:
        before = minor_faults()
        result = fn()
        counts.append(minor_faults() - before)
        return result

    return run
