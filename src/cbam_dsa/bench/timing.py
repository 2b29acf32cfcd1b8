"""Timing in interleaved rounds, and the statistics taken over them (method: ``benchmarks/README.md``).

Every round times each function once, in an order drawn at random for the round (seeded), so a slow spell of a
shared machine hits all of them and no function always runs after the same other one. Ratios are taken round by
round, between times of the same round, and their median reported.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["interleaved_times", "paired_comparison", "round_ratio", "summarize", "timed_faults"]


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


def round_ratio(times: dict[str, list[float]], name: str, baseline: str) -> float | None:
    """The median over rounds of ``name``'s time / ``baseline``'s time in the same round (``None`` if either is
    missing)."""
    if name not in times or baseline not in times:
        return None
    return statistics.median(a / b for a, b in zip(times[name], times[baseline], strict=True))


def summarize(times: dict[str, list[float]], baseline: str) -> dict[str, dict[str, float | None]]:
    """Per function: ``min_ms``, ``median_ms`` and ``ratio`` (median over rounds of its time / the baseline's)."""
    return {
        name: {
            "min_ms": min(values) * 1e3,
            "median_ms": statistics.median(values) * 1e3,
            "ratio": round_ratio(times, name, baseline),
        }
        for name, values in times.items()
    }


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


def timed_faults(counts: Sequence[int], rounds: int) -> float | None:
    """The median of the last ``rounds`` counts (the timed calls, after the warm-up ones) of
    :func:`.memory.counting_faults`; ``None`` where nothing was counted."""
    timed = counts[-rounds:] if rounds else []
    return statistics.median(timed) if timed else None
