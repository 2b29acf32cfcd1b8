"""The demo's report folder: ``report.md``, ``metrics.json``, PNG figures and the trained weights (safetensors)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import save_checkpoint
from .alpha_figure import alpha_curves, alpha_figure
from .data import ImageSet
from .model import attention_kwargs
from .train import RunResult
from .verdicts import stage_title, summarize, verdict

__all__ = [
    "CHECKPOINT_FORMAT",
    "attention_definitions",
    "gallery_order",
    "learned_alpha_curves",
    "stage_table",
    "write_report",
]

CHECKPOINT_FORMAT = "cbam_dsa.demo/1"


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
