"""The figure of the learned blend weight ``alpha`` per stage over training (mean over seeds, shaded min to max)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["alpha_curves", "alpha_figure"]


def alpha_curves(runs: Sequence[Sequence[Mapping[str, Any]]], start: float) -> dict[str, torch.Tensor]:
    """Per stage, ``alpha`` at the start and after each epoch, one row per seed.

    Args:
        runs (Sequence): one history per seed; each epoch's record holds ``"alpha"``: ``{block: float}``.
        start (float): ``alpha`` before the first step (the block's ``alpha_init``).

    Returns:
        dict: block name -> float64 tensor; epochs beyond the shortest history are dropped.

    Shape:
        - Output per block: :math:`(seeds, 1 + epochs)`
    """
    records = [[r["alpha"] for r in run if "alpha" in r] for run in runs]
    records = [run for run in records if run]
    if not records:
        return {}
    length = min(len(run) for run in records)
    return {
        name: torch.tensor([[start] + [run[e][name] for e in range(length)] for run in records], dtype=torch.float64)
        for name in records[0][0]
    }


def alpha_figure(curves: Mapping[str, Mapping[str, torch.Tensor]]) -> Figure:
    """One panel per stage: ``alpha`` over the epochs for each run (mean over seeds, shaded min to max).

    Args:
        curves (Mapping): run name -> :func:`alpha_curves` of that run.

    Raises:
        ValueError: if no run recorded ``alpha``.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from .verdicts import stage_title

    stages: list[str] = []
    for per_stage in curves.values():
        stages += [name for name in per_stage if name not in stages]
    if not stages:
        raise ValueError("curves holds no alpha: give at least one run whose blocks learn alpha")
    fig = Figure(figsize=(3.2 * len(stages), 3.2), layout="constrained")
    axes = fig.subplots(1, len(stages), squeeze=False, sharey=True)[0]
    for index, (ax, stage) in enumerate(zip(axes, stages, strict=True)):
        for run, per_stage in curves.items():
            if stage not in per_stage:
                continue
            values = per_stage[stage]
            epochs = list(range(values.shape[1]))
            (line,) = ax.plot(epochs, values.mean(0).numpy(), marker="o", ms=3, label=run)
            if values.shape[0] > 1:
                low, high = values.min(0).values.numpy(), values.max(0).values.numpy()
                ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2)
        ax.axhline(0.0, color="gray", lw=0.6)
        ax.set_title(stage_title(stage, index), fontsize=10)
        ax.set_xlabel("epoch (0 = start)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("alpha (blend weight)")
    axes[-1].legend(fontsize=8)
    fig.suptitle("Learned alpha per stage over training", fontsize=10)
    return fig
