"""Timing in interleaved rounds, and the statistics taken over them (method: ``benchmarks/README.md``).

Every round times each function once, so a slow spell of a shared machine hits all of them. The rounds' orders
come from a sequentially balanced design (:func:`balanced_orders`): over each block of rounds every function runs
right after every other one equally often, because what a call leaves behind can shift the next call's time by
more than the differences measured. Ratios are taken round by round, between times of the same round, and their
median reported.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "ORDERS",
    "balanced_orders",
    "interleaved_times",
    "paired_comparison",
    "round_ratio",
    "summarize",
    "timed_faults",
]


ORDERS = "balanced"
"""How :func:`interleaved_times` orders its rounds (:func:`balanced_orders`), as the results record it."""


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: str) -> float:
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def balanced_orders(count: int, rounds: int, seed: int = 0) -> list[list[int]]:
    """``rounds`` orders of ``range(count)``, one per round, from a Williams design: in each block of ``count``
    rounds (``2 * count`` where ``count`` is odd) every index comes right after every other index equally often
    (once; twice for an odd count) and takes every position equally often. Each block gets its labels and the order
    of its rows drawn at random from ``seed``. A last, partial block is balanced only in part.

    Orders drawn at random per round balance the predecessors only on average: over 80 rounds of the benchmark's
    eight contenders, one seed put the compiled block right after the two slowest contenders (timm's CBAM and the
    reference path, eager) in 40% of its rounds and the eager block in 20%, and either block could take about
    twice its usual time right after one of them."""
    if count < 1 or rounds < 0:
        raise ValueError(f"count must be at least 1 and rounds at least 0, got count={count}, rounds={rounds}")
    first, low, high = [0], 1, count - 1  # 0, 1, n - 1, 2, n - 2, ...: every difference once
    while len(first) < count:
        if len(first) % 2:
            first.append(low)
            low += 1
        else:
            first.append(high)
            high -= 1
    rows = [[(value + shift) % count for value in first] for shift in range(count)]
    if count % 2:  # an odd count needs the mirrored rows too
        rows += [row[::-1] for row in rows]
    draw = random.Random(seed)
    orders: list[list[int]] = []
    while len(orders) < rounds:
        labels = draw.sample(range(count), count)
        orders.extend([labels[value] for value in row] for row in draw.sample(rows, len(rows)))
    return orders[:rounds]


def interleaved_times(
    fns: dict[str, Callable[[], Any]], rounds: int, warmup: int, device: str = "cpu", seed: int = 0
) -> dict[str, list[float]]:
    """Seconds per call of each function: ``warmup`` untimed calls each, then ``rounds`` rounds that call every
    function once, in the orders of :func:`balanced_orders` (from ``seed``).

    What a call leaves behind (the caches, the allocator's heap, the threads' state) can shift the next call's
    time, so no function may run after the same other one more often than the others do."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for order in balanced_orders(len(names), rounds, seed):
        for index in order:
            times[names[index]].append(_timed(fns[names[index]], device))
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
