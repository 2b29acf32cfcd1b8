"""Figures of what the block attends to, for any model containing it and any batch of images.

Maps are captured with :class:`cbam_dsa.maps.MapRecorder`. Matplotlib is imported inside the drawing functions
only (``pip install cbam-dsa[viz]``), and figures are built with ``matplotlib.figure.Figure`` rather than pyplot,
so drawing never changes the caller's backend or opens windows.

Example:
    >>> from cbam_dsa import viz
    >>> maps = viz.collect_maps(model, images)            # {block name: AttentionMaps}
    >>> viz.spatial_gallery(images, maps).savefig("gallery.png")
    >>> viz.draw_figures(model, images, "figures/")       # every figure at once
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .maps import AttentionMaps, MapRecorder, find_blocks

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "branch_names",
    "channel_maps_figure",
    "collect_maps",
    "draw_figures",
    "fusion_weights_figure",
    "learning_curves_figure",
    "router_weights_figure",
    "save_figure",
    "spatial_gallery",
]


def _check_images(images: object) -> Tensor:
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape (N, C, H, W), but got {type(images).__name__}")
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images must have shape (N, C, H, W) with N >= 1, but got shape {tuple(images.shape)}")
    return images


@torch.no_grad()
def collect_maps(model: nn.Module, images: Tensor, batch_size: int = 128) -> dict[str, AttentionMaps]:
    """Run ``model`` on ``images`` (eval mode, restored afterwards) and gather every block's maps, on CPU.

    Args:
        model (nn.Module): any model containing :class:`~cbam_dsa.CBAMResidualDynamicSA`.
        images (Tensor): inputs, moved batch by batch to the model's device.
        batch_size (int): images per forward pass. Default: ``128``.

    Returns:
        dict: block name -> :class:`~cbam_dsa.maps.AttentionMaps` over all images (``fusion_w`` is the
        same for every image; the last batch's copy is kept). Empty when the model holds no block.

    Shape:
        - images: :math:`(N, C, H, W)`
        - Output per block: ca :math:`(N, C_b, 1, 1)`, sa :math:`(N, 1, h_b, w_b)`, fusion_w :math:`(2,)`,
          router_w :math:`(N, K_b)`
    """
    images = _check_images(images)
    if not find_blocks(model):
        return {}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    gathered: dict[str, list[AttentionMaps]] = {}
    try:
        for start in range(0, images.shape[0], batch_size):
            with MapRecorder(model) as recorder:
                model(images[start : start + batch_size].to(device))
            for name, maps in recorder.maps.items():
                gathered.setdefault(name, []).append(maps)
    finally:
        model.train(was_training)
    return {
        name: AttentionMaps(
            ca=torch.cat([m.ca.cpu() for m in parts]),
            sa=torch.cat([m.sa.cpu() for m in parts]),
            fusion_w=parts[-1].fusion_w.cpu(),
            router_w=torch.cat([m.router_w.cpu() for m in parts]),
        )
        for name, parts in gathered.items()
    }


def branch_names(block: nn.Module) -> list[str]:
    """Readable names of a block's spatial branches, in router order: ``["3x3", "7x7", "7x7 d2"]``."""
    sa = block.sa
    names = [f"{k}x{k}" for k in sa.kernels]
    if sa.use_dilated:
        names.append(f"{sa.dilated_kernel}x{sa.dilated_kernel} d{sa.dilated_d}")
    return names


def _stage_label(name: str, maps: AttentionMaps) -> str:
    h, w = maps.sa.shape[-2:]
    return f"{name} ({h}x{w})"


def _image_for_display(image: Tensor) -> tuple[Any, str | None]:
    image = image.detach().float().cpu()
    if image.shape[0] == 1:
        return image[0].numpy(), "gray"
    if image.shape[0] >= 3:
        rgb = image[:3]
        low, high = rgb.min(), rgb.max()
        rgb = (rgb - low) / (high - low) if high > low else torch.zeros_like(rgb)
        return rgb.permute(1, 2, 0).numpy(), None
    return image.mean(0).numpy(), "gray"


def spatial_gallery(
    images: Tensor,
    maps: Mapping[str, AttentionMaps],
    boxes: Tensor | None = None,
    labels: Sequence[int] | Tensor | None = None,
    predictions: Sequence[int] | Tensor | None = None,
    classes: Sequence[str] | None = None,
    count: int = 6,
) -> Figure:
    """A grid of images (rows) with each stage's spatial map overlaid (columns), upsampled to the image size.

    Each overlay spans its own map's range (blue at its minimum, red at its maximum), written in its corner, so
    a map that varies little still shows where it is highest; the range says how much it varies.

    Args:
        images (Tensor): the images the maps were computed on.
        maps (Mapping): block name -> :class:`~cbam_dsa.maps.AttentionMaps` (from :func:`collect_maps`).
        boxes (Tensor, optional): ``(N, 4)`` ``(x0, y0, x1, y1)`` drawn as rectangles.
        labels, predictions (optional): per image, shown in the row title.
        classes (Sequence[str], optional): names for labels and predictions.
        count (int): number of images (the first ``count``). Default: ``6``.

    Shape:
        - images: :math:`(N, C, H, W)`; each ``maps[name].sa``: :math:`(N, 1, h, w)`
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    images = _check_images(images)
    if not maps:
        raise ValueError("maps is empty: the model holds no CBAMResidualDynamicSA block, so there is nothing to draw")
    count = max(1, min(count, images.shape[0]))
    names = list(maps)
    size = images.shape[-2:]
    fig = Figure(figsize=(2.2 * (len(names) + 1), 2.2 * count), layout="constrained")
    axes = fig.subplots(count, len(names) + 1, squeeze=False)
    for row in range(count):
        shown, cmap = _image_for_display(images[row])
        title = ""
        if labels is not None:
            label = int(labels[row])
            title = f"label {classes[label] if classes else label}"
        if predictions is not None:
            prediction = int(predictions[row])
            title += f"{', ' if title else ''}pred {classes[prediction] if classes else prediction}"
        for col in range(len(names) + 1):
            ax = axes[row, col]
            ax.imshow(shown, cmap=cmap)
            if col > 0:
                sa = maps[names[col - 1]].sa[row : row + 1].float()
                up = F.interpolate(sa, size=tuple(size), mode="bilinear", align_corners=False)[0, 0]
                low, high = float(sa.min()), float(sa.max())
                ax.imshow(up.numpy(), cmap="jet", alpha=0.5, vmin=low, vmax=max(high, low + 1e-6))
                ax.text(1, 1, f"{low:.2f}–{high:.2f}", color="white", fontsize=6, va="top",
                        bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "lw": 0})  # fmt: skip
                if row == 0:
                    ax.set_title(_stage_label(names[col - 1], maps[names[col - 1]]), fontsize=8)
            elif title:
                ax.set_title(title, fontsize=8)
            if boxes is not None:
                x0, y0, x1, y1 = (float(v) for v in boxes[row])
                ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="white", lw=1))
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(
        "Spatial attention per stage: each map from its own minimum (blue) to maximum (red), range in the corner",
        fontsize=9,
    )
    return fig


def router_weights_figure(
    maps: Mapping[str, AttentionMaps], names: Mapping[str, Sequence[str]] | None = None
) -> Figure:
    """Box plots of the router's weight for each branch across the images, one panel per stage.

    Args:
        maps (Mapping): block name -> :class:`~cbam_dsa.maps.AttentionMaps`.
        names (Mapping, optional): block name -> branch names (from :func:`branch_names`).
    """
    from matplotlib.figure import Figure

    if not maps:
        raise ValueError("maps is empty: the model holds no CBAMResidualDynamicSA block, so there is nothing to draw")
    stages = list(maps)
    fig = Figure(figsize=(3.2 * len(stages), 3.0), layout="constrained")
    axes = fig.subplots(1, len(stages), squeeze=False)[0]
    for ax, stage in zip(axes, stages, strict=True):
        weights = maps[stage].router_w.float().numpy()
        labels = list(names[stage]) if names and stage in names else [f"branch {k}" for k in range(weights.shape[1])]
        ax.boxplot([weights[:, k] for k in range(weights.shape[1])], showfliers=False)
        ax.set_xticks(range(1, weights.shape[1] + 1), labels, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(_stage_label(stage, maps[stage]), fontsize=8)
        ax.set_ylabel("router weight")
    fig.suptitle(f"Router weights per branch across {maps[stages[0]].router_w.shape[0]} images", fontsize=10)
    return fig


def fusion_weights_figure(maps: Mapping[str, AttentionMaps]) -> Figure:
    """Bars of the channel attention's avg/max fusion weights per stage (``[1, 1]`` means sum fusion)."""
    from matplotlib.figure import Figure

    if not maps:
        raise ValueError("maps is empty: the model holds no CBAMResidualDynamicSA block, so there is nothing to draw")
    stages = list(maps)
    weights = torch.stack([maps[s].fusion_w.float() for s in stages]).numpy()
    fig = Figure(figsize=(1.6 * len(stages) + 2.5, 3.0), layout="constrained")
    ax = fig.subplots()
    positions = torch.arange(len(stages)).numpy()
    ax.bar(positions - 0.2, weights[:, 0], width=0.4, label="avg descriptor")
    ax.bar(positions + 0.2, weights[:, 1], width=0.4, label="max descriptor")
    ax.set_xticks(positions, [_stage_label(s, maps[s]) for s in stages], fontsize=8)
    ax.set_ylabel("fusion weight")
    ax.legend(fontsize=8)
    ax.set_title("Channel attention: avg/max fusion weights", fontsize=10)
    return fig


def channel_maps_figure(maps: Mapping[str, AttentionMaps], count: int = 4) -> Figure:
    """Heat maps of the channel map of the first ``count`` images (rows) over channels (columns), per stage."""
    from matplotlib.figure import Figure

    if not maps:
        raise ValueError("maps is empty: the model holds no CBAMResidualDynamicSA block, so there is nothing to draw")
    stages = list(maps)
    fig = Figure(figsize=(3.6 * len(stages), 0.45 * count + 1.6), layout="constrained")
    axes = fig.subplots(1, len(stages), squeeze=False)[0]
    image = None
    for ax, stage in zip(axes, stages, strict=True):
        ca = maps[stage].ca[:count, :, 0, 0].float().numpy()
        image = ax.imshow(ca, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(_stage_label(stage, maps[stage]), fontsize=8)
        ax.set_xlabel("channel")
        ax.set_yticks(range(ca.shape[0]), [f"image {i}" for i in range(ca.shape[0])], fontsize=7)
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="channel gate")
    fig.suptitle("Channel attention maps", fontsize=10)
    return fig


def learning_curves_figure(histories: Mapping[str, Sequence[Sequence[Mapping[str, float]]]]) -> Figure:
    """Training loss and test accuracy per epoch for each run, averaged over seeds (shaded: min to max).

    Args:
        histories (Mapping): run name -> one history per seed; a history is a list of per-epoch dicts with
            ``"epoch"``, ``"train_loss"`` and optionally ``"test_accuracy"``.
    """
    from matplotlib.figure import Figure

    if not histories:
        raise ValueError("histories is empty: give at least one run's per-epoch records")
    fig = Figure(figsize=(9.0, 3.4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for name, runs in histories.items():
        for ax, key in ((loss_ax, "train_loss"), (acc_ax, "test_accuracy")):
            curves = [[r[key] for r in run if key in r] for run in runs]
            curves = [c for c in curves if c]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            values = torch.tensor([c[:length] for c in curves], dtype=torch.float64)
            epochs = list(range(1, length + 1))
            (line,) = ax.plot(epochs, values.mean(0).numpy(), marker="o", ms=3, label=name)
            if values.shape[0] > 1:
                ax.fill_between(epochs, values.min(0).values.numpy(), values.max(0).values.numpy(),
                                color=line.get_color(), alpha=0.2)  # fmt: skip
    loss_ax.set_title("training loss", fontsize=10)
    acc_ax.set_title("test accuracy", fontsize=10)
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=8)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 110) -> Path:
    """Write ``fig`` as PNG (parent folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def draw_figures(
    model: nn.Module,
    images: Tensor,
    out_dir: str | os.PathLike[str],
    boxes: Tensor | None = None,
    labels: Sequence[int] | Tensor | None = None,
    classes: Sequence[str] | None = None,
    prefix: str = "",
    count: int = 6,
) -> dict[str, Path]:
    """Draw every attention figure of ``model`` on ``images`` into ``out_dir``.

    Writes ``{prefix}gallery.png`` and ``{prefix}channels.png``, plus ``{prefix}router.png`` when some block has
    more than one spatial branch and ``{prefix}fusion.png`` when some block learns its fusion (softmax fusion).

    Args:
        model (nn.Module): any model containing the block.
        images (Tensor): a batch of inputs for ``model``.
        out_dir (str or PathLike): folder for the PNG files.
        boxes, labels, classes: optional annotations for the gallery.
        prefix (str): prepended to every file name. Default: ``""``.
        count (int): images in the gallery and the channel figure. Default: ``6``.

    Returns:
        dict: figure kind (``"gallery"``, ``"channels"``, ``"router"``, ``"fusion"``) -> path written.

    Raises:
        ValueError: the model holds no :class:`~cbam_dsa.CBAMResidualDynamicSA`.
    """
    images = _check_images(images)
    maps = collect_maps(model, images)
    if not maps:
        raise ValueError(
            f"{type(model).__name__} holds no CBAMResidualDynamicSA block, so there are no attention maps to draw"
        )
    with torch.no_grad():
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        logits = model(images[:count].to(device))
        model.train(was_training)
    predictions = logits.argmax(1).cpu() if isinstance(logits, Tensor) and logits.dim() == 2 else None
    blocks = find_blocks(model)
    out_dir = Path(out_dir)
    written = {
        "gallery": save_figure(
            spatial_gallery(images, maps, boxes, labels, predictions, classes, count), out_dir / f"{prefix}gallery.png"
        ),
        "channels": save_figure(channel_maps_figure(maps, count=count), out_dir / f"{prefix}channels.png"),
    }
    if any(m.router_w.shape[1] > 1 for m in maps.values()):
        names = {name: branch_names(block) for name, block in blocks.items()}
        written["router"] = save_figure(router_weights_figure(maps, names), out_dir / f"{prefix}router.png")
    if any(block.ca.fusion == "softmax" for block in blocks.values()):
        written["fusion"] = save_figure(fusion_weights_figure(maps), out_dir / f"{prefix}fusion.png")
    return written
