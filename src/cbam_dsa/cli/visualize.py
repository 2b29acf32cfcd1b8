"""``cbam-dsa visualize``: draw the attention figures of a checkpoint written by ``cbam-dsa demo``.

The checkpoint's config rebuilds the demo model and the data it was trained on; the figures are drawn on that
test data, or on a folder of your own images (``--images``). Heavy imports happen inside :func:`run`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

HELP = "draw spatial maps, router and fusion weights and channel maps of a checkpoint written by the demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``visualize`` subcommand's options."""
    parser.add_argument("checkpoint", help="a .safetensors file from the demo's weights/ folder")
    parser.add_argument("--out", help="folder for the PNG files (default: <checkpoint name>-figures next to it)")
    parser.add_argument(
        "--images",
        help="a folder of images (files, or one subfolder per class) to draw on, instead of the demo's test data",
    )
    parser.add_argument("--count", type=int, default=6, help="images in the gallery (default: 6)")
    parser.add_argument("--max-images", type=int, default=512, help="images for the router statistics (default: 512)")


def _load_model(path: Path) -> tuple[Any, dict[str, Any]]:
    from ..checkpoint import CheckpointError, load_checkpoint
    from ..demo.model import build_model
    from ..demo.report import CHECKPOINT_FORMAT
    from .errors import UserError

    try:
        state, config = load_checkpoint(path)
    except CheckpointError as error:
        raise UserError(str(error)) from error
    if not config or config.get("format") != CHECKPOINT_FORMAT:
        raise UserError(
            f"checkpoint {str(path)!r} was not written by `cbam-dsa demo` (no demo model config); for your own "
            "model, draw the figures in Python with cbam_dsa.viz.draw_figures(model, images, out_dir)"
        )
    try:
        model = build_model(config["model"])
        model.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise UserError(f"checkpoint {str(path)!r} does not rebuild a demo model: {error}") from error
    return model.eval(), config


def _folder_images(folder: Path, size: int, in_channels: int, limit: int) -> Any:
    from ..demo.data import list_images, read_images
    from .errors import UserError

    if not folder.is_dir():
        raise UserError(f"--images {str(folder)!r} is not a folder")
    paths = list_images(folder)
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        paths += list_images(sub)
    if not paths:
        raise UserError(f"--images {str(folder)!r} holds no image files (png, jpg, bmp, gif, tif or webp)")
    try:
        images = read_images(paths[:limit], size)
    except ValueError as error:
        raise UserError(str(error)) from error
    return images.mean(dim=1, keepdim=True) if in_channels == 1 else images


def _demo_test_data(config: dict[str, Any], limit: int) -> tuple[Any, Any, Any]:
    from ..demo.data import ClutteredDigitsConfig, load_image_folder, make_cluttered_digits
    from ..demo.report import gallery_order
    from .errors import UserError

    data = dict(config.get("data") or {})
    try:
        if "folder" in data:
            _, test = load_image_folder(data["folder"], size=data["size"], seed=data.get("seed", 0))
        else:
            max_scans = data.pop("max_scans", None)
            _, test = make_cluttered_digits(ClutteredDigitsConfig(**data), max_scans=max_scans)
    except (TypeError, ValueError) as error:
        raise UserError(f"could not rebuild the checkpoint's test data ({error}); pass --images DIR") from error
    order = gallery_order(test, 10)[:limit]
    boxes = None if test.boxes is None else test.boxes[order]
    return test.images[order], boxes, test.labels[order]


def run(args: argparse.Namespace) -> int:
    """Draw the figures; returns the exit code."""
    from .errors import UserError

    if args.count < 1:
        raise UserError(f"--count must be an integer >= 1, but got {args.count}")
    if args.max_images < 1:
        raise UserError(f"--max-images must be an integer >= 1, but got {args.max_images}")
    path = Path(args.checkpoint)
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist or is not a file")
    out = Path(args.out) if args.out else path.with_name(f"{path.stem}-figures")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} exists and is not a folder")

    from .. import viz
    from ..maps import find_blocks

    model, config = _load_model(path)
    if not find_blocks(model):
        raise UserError(
            f"checkpoint {str(path)!r} holds the {config['model']['variant']!r} variant, which has no attention "
            "block to draw; pick another file from the weights/ folder"
        )
    model_config = config["model"]
    if args.images:
        size = int(config.get("data", {}).get("canvas") or config.get("data", {}).get("size") or 64)
        images = _folder_images(Path(args.images), size, model_config["in_channels"], args.max_images)
        boxes, labels = None, None
    else:
        images, boxes, labels = _demo_test_data(config, args.max_images)
    try:
        written = viz.draw_figures(
            model, images, out, boxes=boxes, labels=labels, classes=config.get("classes"), count=args.count
        )
    except OSError as error:
        raise UserError(f"could not write figures to {str(out)!r}: {error}") from error
    for kind, figure in written.items():
        print(f"{kind}: {figure}", file=sys.stdout)
    return 0
