"""Memory figures: the bytes autograd saves for backward, the peak memory of a step, page faults."""

from __future__ import annotations

import ctypes
import platform
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

__all__ = [
    "KEPT_HEAP",
    "counting_faults",
    "keep_freed_memory",
    "minor_faults",
    "peak_step_memory",
    "saved_tensor_bytes",
]


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


KEPT_HEAP = {"M_MMAP_THRESHOLD": 32 << 20, "M_TRIM_THRESHOLD": 1 << 30}
"""What :func:`keep_freed_memory` sets with glibc's ``mallopt``, in this order: serve requests under 32 MiB (glibc's
largest mmap threshold) from the heap, and keep up to 1 GiB free at its top instead of returning it to the system."""

_MALLOPT_PARAMETERS = {"M_TRIM_THRESHOLD": -1, "M_MMAP_THRESHOLD": -3}  # glibc's malloc.h


def keep_freed_memory() -> str | None:
    """Have glibc's allocator keep the memory the process frees, for reuse, for the rest of the process; returns what
    was set, or ``None`` where the C library is not glibc (nothing is changed).

    By default glibc returns the free memory at the top of its heap to the system once it exceeds a threshold (twice
    the largest mapped block freed so far), and the next allocations fault on every page of it again. Whether that
    happens depends on the heap's history: three 16 MiB tensors allocated and freed in a loop faulted on all their
    12,288 pages in every iteration in 2 of 10 new processes tried, and never in the other 8; a layer's training
    step alone in a loop faults in some processes, and inside a network it did not (the network figures). Both
    thresholds are set: setting the trim threshold alone also stops glibc from raising the mmap threshold, which
    then stays where it is (128 KiB in a new process), so that every larger tensor is mapped afresh and faults, each
    time.
    """
    if platform.libc_ver()[0] != "glibc":  # ("", "") off Linux
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    for name, value in KEPT_HEAP.items():  # the mmap threshold first: a failure then leaves the trim threshold alone
        if mallopt(_MALLOPT_PARAMETERS[name], value) != 1:
            return None
    return "glibc mallopt " + ", ".join(f"{name}={value}" for name, value in KEPT_HEAP.items())
