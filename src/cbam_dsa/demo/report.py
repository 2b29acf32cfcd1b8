"""The demo's report folder: ``report.md``, ``metrics.json``, PNG figures and the trained weights (safetensors)."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import save_checkpoint
from .alpha_figure import alpha_curves, alpha_figure
from .data import ImageSet
from .model import attention_kwargs
from .train import RunResult

__all__ = [
    "CHECKPOINT_FORMAT",
    "STAGE_STATS",
    "attention_definitions",
    "effective_verdict",
    "gallery_order",
    "learned_alpha_curves",
    "noise_margin",
    "paired_differences",
    "spread",
    "stage_table",
    "stage_title",
    "summarize",
    "verdict",
    "write_report",
]

CHECKPOINT_FORMAT = "cbam_dsa.demo/1"

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
            if diff > margin:
                word = "beats"
            elif diff >= -margin:
                word = "matches (within noise)"
            else:
                word = "is worse than"
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


def gallery_order(data: ImageSet, count: int) -> torch.Tensor:
    """Indices that put one image of each class first (round-robin over classes), then the rest in order."""
    firsts: list[int] = []
    seen: dict[int, int] = {}
    for index, label in enumerate(data.labels.tolist()):
        if len(firsts) >= count:
            break
        if seen.get(label, 0) == 0:
            seen[label] = 1
            firsts.append(index)
    chosen = set(firsts)
    rest = [i for i in range(len(data)) if i not in chosen]
    return torch.tensor(firsts + rest, dtype=torch.int64)


def _stages(summary: Mapping[str, Any]) -> list[str]:
    stages: list[str] = []
    for entry in summary.values():
        stages += [stage for stage in entry["lift"] or {} if stage not in stages]
    return stages


def _table(summary: Mapping[str, Any]) -> list[str]:
    seeds = max(len(entry["seeds"]) for entry in summary.values())
    accuracy_header = f"test accuracy % (mean ± std, {seeds} seed{'s' if seeds > 1 else ''})"
    header = ["variant", accuracy_header, "params", "train time (s)"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, entry in summary.items():
        acc = entry["accuracy"]
        cells = [
            f"`{variant}`",
            f"{100 * acc['mean']:.1f} ± {100 * acc['std']:.1f}",
            f"{entry['params']:,}",
            f"{entry['train_seconds']['mean']:.0f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _cell(entry: Mapping[str, Any], key: str, stage: str, digits: int = 2) -> str:
    value = (entry.get(key) or {}).get(stage)
    return "—" if value is None else f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"


def stage_table(summary: Mapping[str, Any]) -> list[str]:
    """Markdown rows, one per attention variant and stage: alpha, the spatial map and the effective factor."""
    stages = _stages(summary)
    if not stages:
        return []
    header = ["variant", "stage", "alpha", "mean sa", "lift on sa", "mean effective factor", "effective lift"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, entry in summary.items():
        if not entry["lift"]:
            continue
        for index, stage in enumerate(stages):
            alpha = _cell(entry, "alpha", stage, 3)
            if alpha == "—" and entry.get("attention") is not None and not entry["attention"].get("residual", True):
                alpha = "no blend (1)"
            cells = [
                f"`{variant}`",
                stage_title(stage, index),
                alpha,
                _cell(entry, "spatial_mean", stage),
                _cell(entry, "lift", stage),
                _cell(entry, "effective_mean", stage, 3),
                _cell(entry, "effective_lift", stage, 3),
            ]
            rows.append("| " + " | ".join(cells) + " |")
    return rows


def attention_definitions(data_info: Mapping[str, Any]) -> list[str]:
    """The report's definitions of the per-stage numbers: lift, mean map, alpha, effective factor and lift."""
    most = f" (about {data_info['max_lift']:.1f} here)" if data_info.get("max_lift") else ""
    return [
        "- **Lift on sa** (localisation lift) per attention stage: for each test image, the share of the spatial "
        "map's mass inside the digit's ink box divided by the box's share of the image, averaged over test images. "
        f"1.0 is chance (attention spread evenly); the most possible is 1 / box share{most}.",
        "- **Mean sa**: the spatial gate's average value over test images; near 1.0 the gate is open everywhere.",
        "- **alpha**: the blend weight of `out = x + alpha * (y - x)` at the end of training (learned, or fixed "
        "at its `alpha_init`); `cbam` has no blend (`out = y`, as alpha = 1).",
        "- **Effective factor**: the block computes `y = x * ca * sa`, so `out = x * ((1 - alpha) + alpha * ca * "
        "sa)`: feature `(c, h, w)` is multiplied by `(1 - alpha) + alpha * ca[c] * sa[h, w]`. The report gives "
        "this factor's mean over the channels, which is exactly `F = (1 - alpha) + alpha * mean_c(ca) * sa` (the "
        "factor is linear in `ca`; one value per image and position). With alpha = 0 it is 1 everywhere, whatever "
        "`sa` is; with alpha = 1 it is `sa` scaled by one number per image. It multiplies the stage's residual "
        "branch only; the shortcut is added after it.",
        "- **Effective lift**: the lift above computed on `F` instead of `sa`: the mean of `F` inside the box "
        "divided by its mean over the map, i.e. how much more the digit's features are kept than the average "
        "feature. alpha = 0 gives 1.0 for any `sa`; alpha = 1 gives the lift on `sa`; a negative alpha turns the "
        "map around (below 1.0 when `sa` favours the box). This, not the lift on `sa`, is what the attention "
        "does to the features.",
    ]


def _markdown(
    summary: Mapping[str, Any], settings: Mapping[str, Any], data_info: Mapping[str, Any], figures: Mapping[str, str]
) -> str:
    train = settings["train"]
    lines = ["# cbam-dsa demo report", ""]
    lines += [f"Command: `{settings['command']}`", ""]
    lines += [
        f"Data: {data_info['description']}",
        "",
        f"Training: every variant trained from scratch with the same data, seeds ({settings['seeds']}), schedule "
        f"and budget: {train['epochs']} epochs, batch {train['batch_size']}, AdamW (peak lr {train['lr']:g}, "
        f"weight decay {train['weight_decay']:g}), linear warm-up over 20% of the steps, then cosine decay.",
        "",
        f"Run: {settings['device']}, {settings['processes']} process(es), {settings['threads']} thread(s) per "
        f"process, PyTorch {settings.get('torch', '?')}; wall time from start to report (data, training, "
        f"evaluation): {settings['wall_seconds']:.0f} s.",
        "",
        "## Results",
        "",
    ]
    lines += _table(summary)
    lines += [""]
    seeds = settings["seeds"]
    lines += [
        f"Seeds: {seeds} (0 to {seeds - 1}); the noise margins below combine the seed spreads"
        if seeds > 1
        else "Seeds: 1; the noise margins below count only the test set's sampling error",
        "(see *What was measured*).",
        "",
    ]
    stage_rows = stage_table(summary)
    if stage_rows:
        lines += ["### Attention per stage", "", *stage_rows, ""]
    if settings.get("quick"):
        lines += [
            "This was a `--quick` run: a smoke test far too short to learn the task, so its numbers compare "
            "nothing. Run `cbam-dsa demo` for the real comparison.",
            "",
        ]
    lines += [f"- {line}" for line in verdict(summary)]
    lines += [
        "",
        "## What was measured",
        "",
        "- **Test accuracy**: share of test images classified correctly after the last epoch; mean and sample "
        "standard deviation over seeds (0 with one seed).",
        "- **Noise margin** of a difference between two variants: the larger of `sqrt(std_a^2 + std_b^2)` (the "
        "seed spreads: how far two single runs of equal variants fall apart) and the combined test-set standard "
        "error `sqrt(p (1 - p) / n)` (in `metrics.json`). A variant *beats* another only by more than that margin. "
        "*Per seed* lists the differences of runs with the same seed, which share the backbone's initial weights "
        "and the batch order.",
        "- **Params**: trainable and fixed parameters of the whole network.",
        "- **Train time**: seconds spent in training steps (evaluation excluded), mean over seeds; on a shared "
        "machine this includes slow-down from other work.",
        *attention_definitions(data_info),
        "- Variants: `none` (no attention); `cbam`: classic CBAM, built as the block in its CBAM configuration "
        "(sum fusion, one 7x7 spatial branch, no router, sigmoid gates, T = 1, no residual blend; unlike timm's "
        "`CbamModule`, its MLP and 7x7 convolution carry biases instead of a BatchNorm); `dsa`: "
        "`CBAMResidualDynamicSA` with its defaults"
        + (f" plus {settings['attention']}" if settings.get("attention") else "")
        + "; `dsa-learnable-alpha`: the same with a learned blend weight; `dsa-zero-start`: the same with "
        "`alpha_init=0` and a learned blend weight, so it starts as the identity. The attention layer sits on each "
        "stage's residual branch, before the shortcut is added.",
        "",
    ]
    if figures:
        lines += ["## Figures", ""]
        for title, path in figures.items():
            lines += [f"### {title}", "", f"![{title}]({path})", ""]
    lines += ["Every number above is in `metrics.json`; trained weights (first seed) are in `weights/`.", ""]
    return "\n".join(lines)


def learned_alpha_curves(
    results: Mapping[str, Sequence[RunResult]], summary: Mapping[str, Any]
) -> dict[str, dict[str, torch.Tensor]]:
    """:func:`~cbam_dsa.demo.alpha_figure.alpha_curves` of every variant whose blocks learn ``alpha``."""
    curves = {}
    for variant, runs in results.items():
        kwargs = summary[variant].get("attention") or {}
        if kwargs.get("learnable_alpha"):
            per_stage = alpha_curves([r.history for r in runs], float(kwargs.get("alpha_init", 1.0)))
            if per_stage:
                curves[variant] = per_stage
    return curves


def write_report(
    out_dir: str | Path,
    results: Mapping[str, Sequence[RunResult]],
    test: ImageSet,
    settings: Mapping[str, Any],
    data_info: Mapping[str, Any],
    figures: bool = True,
    gallery_count: int = 6,
) -> dict[str, Path]:
    """Write the report folder and return the paths of what was written.

    Args:
        out_dir (str or Path): the folder (created if needed).
        results (Mapping): variant -> runs (rank 0's :class:`RunResult`, with models).
        test (ImageSet): the test data (for figures).
        settings (Mapping): the run's settings (``command``, ``seeds``, ``train``, ``device``, ...).
        data_info (Mapping): ``description``, ``config`` (to rebuild the data), ``classes``, ``max_lift``.
        figures (bool): draw the PNG figures. Default: ``True``.
        gallery_count (int): images in the gallery. Default: ``6``.
    """
    from .. import viz

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(results, len(test))
    written: dict[str, Path] = {}
    for variant, runs in results.items():
        model = runs[0].model
        config = {
            "format": CHECKPOINT_FORMAT,
            "model": model.get_config(),
            "data": dict(data_info["config"]),
            "classes": list(test.classes),
            "seed": runs[0].seed,
        }
        written[f"weights/{variant}"] = save_checkpoint(out / "weights" / f"{variant}.safetensors", model, config)
    shown: dict[str, str] = {}
    if figures:
        histories = {variant: [r.history for r in runs] for variant, runs in results.items()}
        path = viz.save_figure(viz.learning_curves_figure(histories), out / "learning_curves.png")
        written["learning_curves"], shown["Learning curves"] = path, path.name
        curves = learned_alpha_curves(results, summary)
        if curves:
            path = viz.save_figure(alpha_figure(curves), out / "alpha_per_stage.png")
            written["alpha_per_stage"], shown["Learned alpha per stage over training"] = path, path.name
        order = gallery_order(test, gallery_count)
        ordered = ImageSet(
            test.images[order],
            test.labels[order],
            test.classes,
            None if test.boxes is None else test.boxes[order],
        )
        for variant, runs in results.items():
            if attention_kwargs(variant) is None:
                continue
            paths = viz.draw_figures(
                runs[0].model,
                ordered.images,
                out,
                boxes=ordered.boxes,
                labels=ordered.labels,
                classes=test.classes,
                prefix=f"{variant}_",
                count=gallery_count,
            )
            titles = {
                "gallery": "spatial maps per stage",
                "router": "router weights per branch across the test set",
                "fusion": "fusion weights",
                "channels": "channel maps of a few test images",
            }
            for kind, path in paths.items():
                written[f"{variant}_{kind}"] = path
                shown[f"`{variant}`: {titles[kind]}"] = path.name
    metrics = {"settings": dict(settings), "data": dict(data_info), "variants": summary}
    metrics["histories"] = {variant: [r.history for r in runs] for variant, runs in results.items()}
    metrics["verdict"] = verdict(summary)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    written["metrics"] = out / "metrics.json"
    (out / "report.md").write_text(_markdown(summary, settings, data_info, shown))
    written["report"] = out / "report.md"
    return written
