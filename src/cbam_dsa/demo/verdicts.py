"""The report's numbers and sentences: per-variant statistics over seeds, noise margins and the verdicts."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from .model import attention_kwargs
from .train import RunResult

__all__ = [
    "STAGE_STATS",
    "comparison_word",
    "effective_verdict",
    "noise_margin",
    "paired_differences",
    "spread",
    "stage_title",
    "summarize",
    "verdict",
]

# Per-stage numbers of :func:`~cbam_dsa.demo.train.attention_stats` summarised over seeds.
STAGE_STATS = ("spatial_mean", "alpha", "effective_mean", "effective_min", "effective_lift")


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value), min, max and the values themselves."""
    values = [float(v) for v in values]
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "per_seed": values,
    }


def stage_title(name: str, index: int) -> str:
    """``"stages.1.attention"`` -> ``"stage 2"`` (1-based, for tables); other names are kept."""
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "stages" and parts[1].isdigit():
        return f"stage {int(parts[1]) + 1}"
    return name or f"block {index + 1}"


def _attention_settings(variant: str, runs: Sequence[RunResult]) -> dict[str, Any] | None:
    model = runs[0].model
    overrides = model.get_config()["attention"] if model is not None and hasattr(model, "get_config") else None
    return attention_kwargs(variant, overrides)


def summarize(results: Mapping[str, Sequence[RunResult]], test_size: int) -> dict[str, Any]:
    """Every number of the report's table, per variant: accuracy, parameters, training time and lift per stage.

    Args:
        results (Mapping): variant -> its runs, one per seed.
        test_size (int): number of test images (gives the standard error of one accuracy).
    """
    summary: dict[str, Any] = {}
    for variant, runs in results.items():
        accuracies = [r.test_accuracy for r in runs]
        entry: dict[str, Any] = {
            "accuracy": spread(accuracies),
            "accuracy_standard_error": math.sqrt(
                max(statistics.fmean(accuracies) * (1 - statistics.fmean(accuracies)), 0.0) / max(1, test_size)
            ),
            "params": runs[0].params,
            "train_seconds": spread([r.train_seconds for r in runs]),
            "lift": None,
            "seeds": [r.seed for r in runs],
            "attention": _attention_settings(variant, runs),
        }
        if runs[0].lift:
            entry["lift"] = {stage: spread([r.lift[stage] for r in runs]) for stage in runs[0].lift}
        if runs[0].map_stats:
            for key in STAGE_STATS:
                per_stage = runs[0].map_stats.get(key) or {}
                values = {stage: [(r.map_stats.get(key) or {}).get(stage) for r in runs] for stage in per_stage}
                values = {stage: v for stage, v in values.items() if all(x is not None for x in v)}
                if values:
                    entry[key] = {stage: spread(v) for stage, v in values.items()}
        summary[variant] = entry
    return summary


def noise_margin(summary: Mapping[str, Any], a: str, b: str) -> float:
    """The accuracy difference two variants need to count as different: the larger of the seed spreads and the
    test-set standard errors, combined."""
    ea, eb = summary[a], summary[b]
    seed_spread = math.hypot(ea["accuracy"]["std"], eb["accuracy"]["std"])
    standard_error = math.hypot(ea["accuracy_standard_error"], eb["accuracy_standard_error"])
    return max(seed_spread, standard_error)


def comparison_word(diff: float, margin: float) -> str:
    """How one accuracy compares with another, ``diff`` points apart, against the noise ``margin``."""
    if diff > margin:
        return "beats"
    if diff >= -margin:
        return "matches (within noise)"
    return "is worse than"


def paired_differences(summary: Mapping[str, Any], a: str, b: str) -> str:
    """``"; per seed +0.3, -1.2, +0.8 (ahead on 2 of 3)"``: the differences of runs that share a seed (the same
    backbone initialisation and batch order), or ``""`` with one seed."""
    seeds_a, seeds_b = summary[a]["seeds"], summary[b]["seeds"]
    shared = [seed for seed in seeds_a if seed in seeds_b]
    if len(shared) < 2:
        return ""
    accuracy_a = dict(zip(seeds_a, summary[a]["accuracy"]["per_seed"], strict=True))
    accuracy_b = dict(zip(seeds_b, summary[b]["accuracy"]["per_seed"], strict=True))
    diffs = [100 * (accuracy_a[seed] - accuracy_b[seed]) for seed in shared]
    ahead = sum(d > 0 for d in diffs)
    return f"; per seed {', '.join(f'{d:+.1f}' for d in diffs)} (ahead on {ahead} of {len(diffs)})"


def verdict(summary: Mapping[str, Any]) -> list[str]:
    """Plain sentences comparing the variants, computed from the numbers (no claim without its margin)."""
    lines = []
    for variant in summary:
        if variant in ("none", "cbam"):
            continue
        acc = summary[variant]["accuracy"]["mean"]
        for baseline, label in (("none", "no attention"), ("cbam", "classic CBAM")):
            if baseline not in summary:
                continue
            diff = acc - summary[baseline]["accuracy"]["mean"]
            margin = noise_margin(summary, variant, baseline)
            word = comparison_word(diff, margin)
            lines.append(
                f"`{variant}` {word} {label}: {100 * diff:+.1f} points (noise margin {100 * margin:.1f} points)"
                + paired_differences(summary, variant, baseline)
                + "."
            )
    if "cbam" in summary and "none" in summary:
        diff = summary["cbam"]["accuracy"]["mean"] - summary["none"]["accuracy"]["mean"]
        margin = noise_margin(summary, "cbam", "none")
        relation = "above" if diff > margin else ("below" if diff < -margin else "within noise of")
        lines.append(f"Classic CBAM is {relation} no attention: {100 * diff:+.1f} points (margin {100 * margin:.1f}).")
    attention = [v for v in summary if v != "none"]
    if "none" in summary and attention:
        helps = any(
            summary[v]["accuracy"]["mean"] - summary["none"]["accuracy"]["mean"] > noise_margin(summary, v, "none")
            for v in attention
        )
        if not helps:
            lines.append("On this run, no attention variant improves accuracy over the plain network beyond the noise.")
    seeds = max(len(entry["seeds"]) for entry in summary.values())
    if seeds == 1 and len(summary) > 1:
        lines.append(
            "One seed: the noise margins above count only the test set's sampling error, not the run-to-run "
            "variation of training; repeat with `--seeds 3` (or more) before trusting a gap of a few points."
        )
    for variant in attention:
        means = summary[variant].get("spatial_mean")
        if means:
            names = list(means)
            text = ", ".join(f"{means[s]['mean']:.2f} at {stage_title(s, names.index(s))}" for s in names)
            open_stages = [stage_title(s, names.index(s)) for s in names if means[s]["mean"] > 0.97]
            note = ""
            if open_stages:
                pronoun = "it" if len(open_stages) == 1 else "they"
                note = (
                    f"; the gate is almost fully open at {' and '.join(open_stages)}, so features pass there nearly "
                    f"unchanged and {pronoun} cannot localise"
                )
            lines.append(f"`{variant}`: mean spatial map {text} (1.0 = gate fully open){note}.")
    for variant in attention:
        lift = summary[variant]["lift"]
        if not lift:
            continue
        best_stage, best = max(lift.items(), key=lambda item: item[1]["mean"])
        names = list(lift)
        status = "above" if best["mean"] > 1.5 else "not above"
        lines.append(
            f"`{variant}`: highest localisation lift {best['mean']:.2f} at "
            f"{stage_title(best_stage, names.index(best_stage))} ({status} the 1.5 aim; 1.0 = chance)."
        )
    lines += effective_verdict(summary)
    return lines


def effective_verdict(summary: Mapping[str, Any]) -> list[str]:
    """Sentences on what the attention does to the features: the learned alpha and the effective lift per stage."""
    lines = []
    for variant, entry in summary.items():
        effective = entry.get("effective_lift")
        if not effective:
            continue
        alphas = entry.get("alpha") or {}
        names = list(effective)
        parts = []
        for index, stage in enumerate(names):
            alpha = f"alpha {alphas[stage]['mean']:.3f}, " if stage in alphas else ""
            parts.append(
                f"{stage_title(stage, index)} {effective[stage]['mean']:.3f} ({alpha}lift on sa "
                f"{entry['lift'][stage]['mean']:.2f})"
            )
        best = max(effective.values(), key=lambda item: item["mean"])["mean"]
        status = "above" if best > 1.5 else "not above"
        lines.append(f"`{variant}`: effective lift {'; '.join(parts)}; {status} the 1.5 aim.")
        negative = [stage_title(s, names.index(s)) for s in names if s in alphas and alphas[s]["mean"] < 0]
        if negative:
            lines.append(
                f"`{variant}`: alpha is negative at {', '.join(negative)}. There `F = 1 + |alpha| (1 - mean_c(ca) "
                "sa)`: the block keeps features most where `sa` is *low*, so its spatial map works inverted and "
                "the lift on `sa` alone reads the wrong way round."
            )
    return lines
