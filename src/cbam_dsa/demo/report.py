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
from .data import ImageSet
from .model import attention_kwargs
from .train import RunResult

__all__ = ["CHECKPOINT_FORMAT", "gallery_order", "stage_title", "summarize", "verdict", "write_report"]

CHECKPOINT_FORMAT = "cbam_dsa.demo/1"


def _spread(values: Sequence[float]) -> dict[str, Any]:
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
            "accuracy": _spread(accuracies),
            "accuracy_standard_error": math.sqrt(
                max(statistics.fmean(accuracies) * (1 - statistics.fmean(accuracies)), 0.0) / max(1, test_size)
            ),
            "params": runs[0].params,
            "train_seconds": _spread([r.train_seconds for r in runs]),
            "lift": None,
            "seeds": [r.seed for r in runs],
            "attention": _attention_settings(variant, runs),
        }
        if runs[0].lift:
            entry["lift"] = {stage: _spread([r.lift[stage] for r in runs]) for stage in runs[0].lift}
        if runs[0].map_stats:
            entry["spatial_mean"] = {
                stage: _spread([r.map_stats["spatial_mean"][stage] for r in runs])
                for stage in runs[0].map_stats["spatial_mean"]
            }
        summary[variant] = entry
    return summary


def _noise(summary: Mapping[str, Any], a: str, b: str) -> float:
    """The accuracy difference two variants need to count as different: the larger of the seed spreads and the
    test-set standard errors, combined."""
    ea, eb = summary[a], summary[b]
    spread = math.hypot(ea["accuracy"]["std"], eb["accuracy"]["std"])
    standard_error = math.hypot(ea["accuracy_standard_error"], eb["accuracy_standard_error"])
    return max(spread, standard_error)


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
            margin = _noise(summary, variant, baseline)
            if diff > margin:
                word = "beats"
            elif diff >= -margin:
                word = "matches (within noise)"
            else:
                word = "is worse than"
            lines.append(
                f"`{variant}` {word} {label}: {100 * diff:+.1f} points (noise margin {100 * margin:.1f} points)."
            )
    if "cbam" in summary and "none" in summary:
        diff = summary["cbam"]["accuracy"]["mean"] - summary["none"]["accuracy"]["mean"]
        margin = _noise(summary, "cbam", "none")
        relation = "above" if diff > margin else ("below" if diff < -margin else "within noise of")
        lines.append(f"Classic CBAM is {relation} no attention: {100 * diff:+.1f} points (margin {100 * margin:.1f}).")
    attention = [v for v in summary if v != "none"]
    if "none" in summary and attention:
        helps = any(
            summary[v]["accuracy"]["mean"] - summary["none"]["accuracy"]["mean"] > _noise(summary, v, "none")
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


def _table(summary: Mapping[str, Any]) -> list[str]:
    stages: list[str] = []
    for entry in summary.values():
        for stage in entry["lift"] or {}:
            if stage not in stages:
                stages.append(stage)
    seeds = max(len(entry["seeds"]) for entry in summary.values())
    accuracy_header = f"test accuracy % (mean ± std, {seeds} seed{'s' if seeds > 1 else ''})"
    header = ["variant", accuracy_header, "params", "train time (s)"] + [
        f"lift {stage_title(s, i)}" for i, s in enumerate(stages)
    ]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, entry in summary.items():
        acc = entry["accuracy"]
        cells = [
            f"`{variant}`",
            f"{100 * acc['mean']:.1f} ± {100 * acc['std']:.1f}",
            f"{entry['params']:,}",
            f"{entry['train_seconds']['mean']:.0f}",
        ]
        for stage in stages:
            lift = (entry["lift"] or {}).get(stage)
            cells.append("—" if lift is None else f"{lift['mean']:.2f} ± {lift['std']:.2f}")
        rows.append("| " + " | ".join(cells) + " |")
    return rows


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
        "standard deviation over seeds (0 with one seed). With one seed the test-set standard error "
        "(`sqrt(p (1 - p) / n)`, in `metrics.json`) is the noise margin used above.",
        "- **Params**: trainable and fixed parameters of the whole network.",
        "- **Train time**: seconds spent in training steps (evaluation excluded), mean over seeds; on a shared "
        "machine this includes slow-down from other work.",
        "- **Localisation lift** per attention stage: for each test image, the share of the spatial map's mass "
        "inside the digit's ink box divided by the box's share of the image, averaged over test images. 1.0 is "
        "chance (attention spread evenly); the most possible is 1 / box share"
        + (f" (about {data_info['max_lift']:.1f} here)." if data_info.get("max_lift") else "."),
        "- **Mean spatial map** (in the notes under the table and in `metrics.json`): the spatial gate's average "
        "value over test images per stage; near 1.0 the gate is open everywhere and the stage does not localise.",
        "- Variants: `none` (no attention); `cbam`: classic CBAM, built as the block in its CBAM configuration "
        "(sum fusion, one 7x7 spatial branch, no router, sigmoid gates, T = 1, no residual blend; unlike timm's "
        "`CbamModule`, its MLP and 7x7 convolution carry biases instead of a BatchNorm); `dsa`: "
        "`CBAMResidualDynamicSA` with its defaults"
        + (f" plus {settings['attention']}" if settings.get("attention") else "")
        + "; `dsa-learnable-alpha`: the same with a learned blend weight. The attention layer sits on each "
        "stage's residual branch, before the shortcut is added.",
        "",
    ]
    if figures:
        lines += ["## Figures", ""]
        for title, path in figures.items():
            lines += [f"### {title}", "", f"![{title}]({path})", ""]
    lines += ["Every number above is in `metrics.json`; trained weights (first seed) are in `weights/`.", ""]
    return "\n".join(lines)


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
