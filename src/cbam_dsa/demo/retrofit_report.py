"""The retrofit experiment's report folder: ``report.md``, ``metrics.json``, figures and the weights."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..checkpoint import save_checkpoint
from .alpha_figure import alpha_figure
from .data import ImageSet
from .report import CHECKPOINT_FORMAT, attention_definitions, gallery_order, learned_alpha_curves, stage_table
from .retrofit import RETROFIT_VARIANT, RetrofitResult
from .verdicts import comparison_word, effective_verdict, noise_margin, paired_differences, spread, summarize

__all__ = ["retrofit_summary", "retrofit_verdict", "write_retrofit_report"]


def retrofit_summary(results: Sequence[RetrofitResult], test_size: int) -> dict[str, Any]:
    """The numbers of the report: the fine-tuned networks as :func:`~cbam_dsa.demo.verdicts.summarize` gives them
    (``"none"``: the plain network fine-tuned; ``"dsa-zero-start"``: the retrofitted one), the pretrained
    network's accuracy and the exactness check per seed.

    Args:
        results (Sequence): one :class:`~cbam_dsa.demo.retrofit.RetrofitResult` per seed.
        test_size (int): number of test images.
    """
    if not results:
        raise ValueError("results is empty: give at least one seed's RetrofitResult")
    finetuned = summarize(
        {"none": [r.plain for r in results], RETROFIT_VARIANT: [r.retrofit for r in results]}, test_size
    )
    return {
        "finetuned": finetuned,
        "pretrained_accuracy": spread([r.pretrained.test_accuracy for r in results]),
        "pretrained_train_seconds": spread([r.pretrained.train_seconds for r in results]),
        "exact": [r.exact for r in results],
        "seeds": [r.seed for r in results],
    }


def retrofit_verdict(summary: Mapping[str, Any]) -> list[str]:
    """Plain sentences: is the retrofit safe (step 2 exact), and does it beat fine-tuning the plain network?"""
    finetuned = summary["finetuned"]
    exact = summary["exact"]
    seeds = len(exact)
    lines = []
    if all(exact):
        lines.append(
            f"Inserting the block with alpha = 0 left the test logits exactly unchanged (`torch.equal`) on "
            f"{seeds} of {seeds} seed{'s' if seeds > 1 else ''}: the retrofit starts from the trained network."
        )
    else:
        lines.append(
            f"Inserting the block with alpha = 0 changed the test logits on {exact.count(False)} of {seeds} seeds: "
            "the retrofit does not start from the trained network (a bug)."
        )
    retro, plain = finetuned[RETROFIT_VARIANT]["accuracy"]["mean"], finetuned["none"]["accuracy"]["mean"]
    diff, margin = retro - plain, noise_margin(finetuned, RETROFIT_VARIANT, "none")
    word = comparison_word(diff, margin)
    lines.append(
        f"Retrofitted and fine-tuned {word} the plain network fine-tuned alike: {100 * diff:+.1f} points (noise "
        f"margin {100 * margin:.1f} points){paired_differences(finetuned, RETROFIT_VARIANT, 'none')}."
    )
    pretrained = summary["pretrained_accuracy"]["mean"]
    lines.append(
        f"Fine-tuning itself moved the plain network from {100 * pretrained:.1f} to {100 * plain:.1f} and the "
        f"retrofitted one from {100 * pretrained:.1f} to {100 * retro:.1f} (means over seeds)."
    )
    if seeds == 1:
        lines.append(
            "One seed: the margin counts only the test set's sampling error; repeat with `--seeds 3` before "
            "trusting a gap of a few points."
        )
    lines += effective_verdict({RETROFIT_VARIANT: finetuned[RETROFIT_VARIANT]})
    return lines


def _table(summary: Mapping[str, Any]) -> list[str]:
    finetuned = summary["finetuned"]
    seeds = len(summary["seeds"])
    rows = [
        f"| network | test accuracy % (mean ± std, {seeds} seed{'s' if seeds > 1 else ''}) | params | "
        "training time (s) |",
        "|---|---|---|---|",
    ]
    pre = summary["pretrained_accuracy"]
    rows.append(
        f"| `none`, trained (step 1) | {100 * pre['mean']:.1f} ± {100 * pre['std']:.1f} | "
        f"{finetuned['none']['params']:,} | {summary['pretrained_train_seconds']['mean']:.0f} |"
    )
    for variant, label in (
        ("none", "`none`, fine-tuned (step 4)"),
        (RETROFIT_VARIANT, "retrofit, fine-tuned (step 3)"),
    ):
        entry = finetuned[variant]
        acc = entry["accuracy"]
        rows.append(
            f"| {label} | {100 * acc['mean']:.1f} ± {100 * acc['std']:.1f} | {entry['params']:,} | "
            f"{entry['train_seconds']['mean']:.0f} |"
        )
    return rows


def _markdown(
    summary: Mapping[str, Any], settings: Mapping[str, Any], data_info: Mapping[str, Any], figures: Mapping[str, str]
) -> str:
    train, finetune = settings["train"], settings["finetune"]
    lines = ["# cbam-dsa demo report: retrofit", "", f"Command: `{settings['command']}`", ""]
    lines += [
        f"Data: {data_info['description']}",
        "",
        "Procedure, per seed (seeds 0 to " + f"{len(summary['seeds']) - 1}):",
        "",
        f"1. Train the plain network (`none`) from scratch: {train['epochs']} epochs, batch {train['batch_size']}, "
        f"AdamW (peak lr {train['lr']:g}, weight decay {train['weight_decay']:g}), linear warm-up over 20% of the "
        "steps, then cosine decay.",
        "2. Insert `CBAMResidualDynamicSA` (its defaults, with `alpha_init=0` and a learned alpha: the "
        "`dsa-zero-start` block) on the residual branch of every stage. With alpha = 0 the block returns its input.",
        f"3. Fine-tune the retrofitted network: {finetune['epochs']} epochs, peak lr {finetune['lr']:g}, a fresh "
        "AdamW and the same warm-up and cosine schedule.",
        "4. Fine-tune a copy of the plain network from step 1 in exactly the same way (same data, batch order, "
        "schedule and budget): the control.",
        "",
        f"Run: {settings['device']}, {settings['processes']} process(es), {settings['threads']} thread(s) per "
        f"process, PyTorch {settings.get('torch', '?')}; wall time {settings['wall_seconds']:.0f} s.",
        "",
        "## Results",
        "",
        *_table(summary),
        "",
    ]
    rows = stage_table({RETROFIT_VARIANT: summary["finetuned"][RETROFIT_VARIANT]})
    if rows:
        lines += ["### The inserted block per stage, after fine-tuning", "", *rows, ""]
    if settings.get("quick"):
        lines += [
            "This was a `--quick` run: a smoke test far too short to learn the task, so its numbers compare "
            "nothing. Run `cbam-dsa demo --retrofit` for the real comparison.",
            "",
        ]
    lines += [f"- {line}" for line in retrofit_verdict(summary)]
    lines += [
        "",
        "## What was measured",
        "",
        "- **Test accuracy**: share of test images classified correctly at the end of the step; mean and sample "
        "standard deviation over seeds.",
        "- **Noise margin**: the larger of `sqrt(std_a^2 + std_b^2)` over seeds and the combined test-set "
        "standard error `sqrt(p (1 - p) / n)`. *Per seed* lists the differences of the two fine-tuned networks "
        "that share a seed (the same pretrained network and batch order).",
        "- **Exactly unchanged**: `torch.equal` of the plain and the retrofitted network's logits on every test "
        "image, both in eval mode, before any fine-tuning step.",
        "- **Training time**: seconds in training steps of step 1, or of the fine-tuning for the other rows.",
        *attention_definitions(data_info),
        "",
    ]
    if figures:
        lines += ["## Figures", ""]
        for title, path in figures.items():
            lines += [f"### {title}", "", f"![{title}]({path})", ""]
    lines += ["Every number above is in `metrics.json`; the first seed's weights are in `weights/`.", ""]
    return "\n".join(lines)


def write_retrofit_report(
    out_dir: str | Path,
    results: Sequence[RetrofitResult],
    test: ImageSet,
    settings: Mapping[str, Any],
    data_info: Mapping[str, Any],
    figures: bool = True,
    gallery_count: int = 6,
) -> dict[str, Path]:
    """Write the retrofit report folder and return the paths of what was written.

    Args:
        out_dir (str or Path): the folder (created if needed).
        results (Sequence): one :class:`~cbam_dsa.demo.retrofit.RetrofitResult` per seed (rank 0's).
        test (ImageSet): the test data (for the figures).
        settings (Mapping): the run's settings (``command``, ``train``, ``finetune``, ``device``, ...).
        data_info (Mapping): ``description``, ``config``, ``classes``, ``max_lift``.
        figures (bool): draw the PNG figures. Default: ``True``.
        gallery_count (int): images in the gallery. Default: ``6``.
    """
    from .. import viz

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = retrofit_summary(results, len(test))
    written: dict[str, Path] = {}
    first = results[0]
    for name, run in (("none-pretrained", first.pretrained), ("none-finetuned", first.plain), (
        f"{RETROFIT_VARIANT}-retrofit", first.retrofit)):  # fmt: skip
        config = {
            "format": CHECKPOINT_FORMAT,
            "model": run.model.get_config(),
            "data": dict(data_info["config"]),
            "classes": list(test.classes),
            "seed": first.seed,
        }
        written[f"weights/{name}"] = save_checkpoint(out / "weights" / f"{name}.safetensors", run.model, config)
    shown: dict[str, str] = {}
    runs = {"none": [r.plain for r in results], RETROFIT_VARIANT: [r.retrofit for r in results]}
    if figures:
        histories = {
            "none, fine-tuned": [r.history for r in runs["none"]],
            "retrofit, fine-tuned": [r.history for r in runs[RETROFIT_VARIANT]],
        }
        path = viz.save_figure(viz.learning_curves_figure(histories), out / "finetune_curves.png")
        written["finetune_curves"], shown["Fine-tuning curves"] = path, path.name
        curves = learned_alpha_curves({RETROFIT_VARIANT: runs[RETROFIT_VARIANT]}, summary["finetuned"])
        if curves:
            path = viz.save_figure(alpha_figure(curves), out / "alpha_per_stage.png")
            written["alpha_per_stage"], shown["Learned alpha per stage over fine-tuning"] = path, path.name
        order = gallery_order(test, gallery_count)
        boxes = None if test.boxes is None else test.boxes[order]
        paths = viz.draw_figures(
            first.retrofit.model,
            test.images[order],
            out,
            boxes=boxes,
            labels=test.labels[order],
            classes=test.classes,
            prefix="retrofit_",
            count=gallery_count,
        )
        if "gallery" in paths:
            written["retrofit_gallery"] = paths["gallery"]
            shown["The inserted block: spatial maps per stage"] = paths["gallery"].name
        for kind, path in paths.items():
            written.setdefault(f"retrofit_{kind}", path)
    metrics = {
        "settings": dict(settings),
        "data": dict(data_info),
        "retrofit": summary,
        "histories": {
            "pretrained": [r.pretrained.history for r in results],
            "none": [r.history for r in runs["none"]],
            RETROFIT_VARIANT: [r.history for r in runs[RETROFIT_VARIANT]],
        },
        "verdict": retrofit_verdict(summary),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    written["metrics"] = out / "metrics.json"
    (out / "report.md").write_text(_markdown(summary, settings, data_info, shown))
    written["report"] = out / "report.md"
    return written
