"""The report's numbers from hand-made results: seed-spread verdicts, paired differences, the per-stage table."""

from __future__ import annotations

import pytest
import torch

from cbam_dsa.demo.alpha_figure import alpha_curves, alpha_figure
from cbam_dsa.demo.report import stage_table
from cbam_dsa.demo.train import RunResult
from cbam_dsa.demo.verdicts import summarize, verdict

STAGES = ("stages.0.attention", "stages.1.attention")


def _run(variant: str, seed: int, accuracy: float, alpha: float | None = None) -> RunResult:
    stats = None
    if variant != "none":
        stats = {
            "spatial_mean": dict.fromkeys(STAGES, 0.5),
            "lift": dict.fromkeys(STAGES, 1.4),
            "effective_mean": dict.fromkeys(STAGES, 0.9),
            "effective_min": dict.fromkeys(STAGES, 0.8),
            "effective_lift": dict.fromkeys(STAGES, 1.1),
            "alpha": dict.fromkeys(STAGES, alpha),
        }
    history = [{"epoch": 1, "train_loss": 1.0}]
    lift = None if stats is None else stats["lift"]
    return RunResult(variant, seed, 100, 1.0, accuracy, history, lift, None, stats)


def _summary(accuracies: dict[str, list[float]], alphas: dict[str, float | None] | None = None) -> dict:
    alphas = alphas or {}
    results = {
        variant: [_run(variant, seed, a, alphas.get(variant, 1.0)) for seed, a in enumerate(values)]
        for variant, values in accuracies.items()
    }
    return summarize(results, test_size=100_000)  # a large test set: the seed spread sets the margin


def test_a_gap_inside_the_seed_spread_is_within_noise():
    summary = _summary({"none": [0.90, 0.94, 0.92], "dsa": [0.95, 0.91, 0.93]})
    lines = verdict(summary)
    assert any(line.startswith("`dsa` matches (within noise) no attention: +1.0 points") for line in lines)
    assert any("per seed +5.0, -3.0, +1.0 (ahead on 2 of 3)" in line for line in lines)


def test_a_gap_beyond_the_seed_spread_beats_and_a_drop_is_worse():
    summary = _summary({"none": [0.900, 0.901, 0.899], "dsa": [0.950, 0.951, 0.949], "cbam": [0.8, 0.81, 0.79]})
    lines = verdict(summary)
    assert any(line.startswith("`dsa` beats no attention: +5.0 points") for line in lines)
    assert any(line.startswith("`dsa` beats classic CBAM") for line in lines)
    assert any(line.startswith("Classic CBAM is below no attention") for line in lines)
    assert not any("no attention variant improves" in line for line in lines)


def test_the_effective_lift_sentence_names_alpha_and_both_lifts():
    summary = _summary({"none": [0.9], "dsa-zero-start": [0.9]}, alphas={"dsa-zero-start": 0.125})
    lines = verdict(summary)
    expected = "`dsa-zero-start`: effective lift stage 1 1.100 (alpha 0.125, lift on sa 1.40)"
    assert any(line.startswith(expected) for line in lines)
    assert not any("alpha is negative" in line for line in lines)


def test_a_negative_alpha_is_called_out():
    summary = _summary({"none": [0.9], "dsa-zero-start": [0.9]}, alphas={"dsa-zero-start": -0.3})
    lines = verdict(summary)
    assert any(line.startswith("`dsa-zero-start`: alpha is negative at stage 1, stage 2.") for line in lines)


def test_stage_table_rows():
    summary = _summary({"none": [0.9], "cbam": [0.9], "dsa-zero-start": [0.9]}, {"cbam": None, "dsa-zero-start": 0.25})
    rows = stage_table(summary)
    assert len(rows) == 2 + 2 * 2  # header, rule, two stages of the two attention variants
    assert rows[0].startswith("| variant | stage | alpha | mean sa | lift on sa |")
    assert "| `cbam` | stage 1 | no blend (1) | 0.50 ± 0.00 | 1.40 ± 0.00 | 0.900 ± 0.000 | 1.100 ± 0.000 |" in rows
    assert "| `dsa-zero-start` | stage 2 | 0.250 ± 0.000 |" in rows[-1]
    assert stage_table(_summary({"none": [0.9]})) == []


def test_alpha_curves_start_at_alpha_init_and_stop_at_the_shortest_history():
    runs = [
        [{"alpha": {"a": 0.1}}, {"alpha": {"a": 0.2}}, {"alpha": {"a": 0.3}}],
        [{"alpha": {"a": -0.1}}, {"alpha": {"a": 0.0}}],
    ]
    curves = alpha_curves(runs, start=0.0)
    torch.testing.assert_close(curves["a"], torch.tensor([[0.0, 0.1, 0.2], [0.0, -0.1, 0.0]], dtype=torch.float64))
    assert alpha_curves([[{"epoch": 1}]], start=1.0) == {}


def test_alpha_figure_draws_one_panel_per_stage_and_refuses_nothing_to_draw():
    curves = {"v": {"a": torch.zeros(2, 3, dtype=torch.float64), "b": torch.ones(1, 3, dtype=torch.float64)}}
    figure = alpha_figure(curves)
    assert len(figure.axes) == 2
    with pytest.raises(ValueError, match="curves holds no alpha"):
        alpha_figure({"v": {}})
