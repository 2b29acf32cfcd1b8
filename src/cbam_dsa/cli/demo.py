"""``cbam-dsa demo``: train every variant on Cluttered Digits (or your images) and write a report folder.

Runs on one process, or under ``torchrun --nproc_per_node=N -m cbam_dsa.cli demo ...`` with DDP (only rank 0
writes). Heavy imports happen inside :func:`run`, so ``cbam-dsa demo --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

HELP = "train no attention, classic CBAM and the block on Cluttered Digits and write a report with figures"

# The same as demo.model.VARIANTS, kept here so that `cbam-dsa demo --help` does not import torch.
VARIANT_CHOICES = ("none", "cbam", "dsa", "dsa-learnable-alpha", "dsa-zero-start")

# Defaults of a full run, and of --quick (which any explicit option overrides).
DEFAULTS: dict[str, Any] = {
    "epochs": 6,
    "seeds": 1,
    "train_per_scan": 2,
    "test_per_scan": 3,
    "max_scans": None,
    "finetune_epochs": 3,
}
QUICK: dict[str, Any] = {
    "epochs": 3,
    "seeds": 1,
    "train_per_scan": 2,
    "test_per_scan": 1,
    "max_scans": 200,
    "finetune_epochs": 1,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``demo`` subcommand's options."""
    parser.add_argument("--quick", action="store_true", help="a tiny run (fewer scans and epochs), under a minute")
    parser.add_argument("--out", default="demo-output", help="report folder (default: demo-output)")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANT_CHOICES),
        choices=VARIANT_CHOICES,
        metavar="VARIANT",
        help=f"variants to train, from {', '.join(VARIANT_CHOICES)} (default: all)",
    )
    parser.add_argument("--seeds", type=int, help=f"runs per variant, seeds 0..N-1 (default: {DEFAULTS['seeds']})")
    parser.add_argument(
        "--epochs", type=int, help=f"epochs per run (default: {DEFAULTS['epochs']}, quick: {QUICK['epochs']})"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size (default: 64)")
    parser.add_argument("--lr", type=float, default=4e-3, help="peak learning rate of AdamW (default: 4e-3)")
    parser.add_argument("--data", help="a folder of your images, one subfolder per class, instead of Cluttered Digits")
    data = parser.add_argument_group("Cluttered Digits")
    data.add_argument("--canvas", type=int, default=64, help="canvas side in pixels (default: 64)")
    data.add_argument("--digit-scale", type=int, default=3, help="upscaling of the 8x8 scans (default: 3)")
    data.add_argument("--clutter", type=int, default=8, help="clutter fragments per canvas (default: 8)")
    data.add_argument("--train-per-scan", type=int, help="canvases per training scan (default: 2)")
    data.add_argument("--test-per-scan", type=int, help="canvases per test scan (default: 3, quick: 1)")
    data.add_argument("--max-scans", type=int, help="use only N scans of each split (default: all, quick: 200)")
    data.add_argument("--data-seed", type=int, default=0, help="seed of the split and the canvases (default: 0)")
    block = parser.add_argument_group("the block (dsa variants only)")
    block.add_argument(
        "--alpha-init",
        type=float,
        help="initial residual blend weight of dsa and dsa-learnable-alpha (block default: 1.0; dsa-zero-start "
        "always starts at 0)",
    )
    block.add_argument("--sa-temperature", type=float, help="spatial gate temperature (block default: 1.0)")
    block.add_argument("--learnable-temperature", action="store_true", help="learn both gate temperatures")
    retrofit = parser.add_argument_group("retrofit: add the block to a trained network")
    retrofit.add_argument(
        "--retrofit",
        action="store_true",
        help="train the plain network, insert the block with alpha 0 into every stage (outputs unchanged), "
        "fine-tune it, and compare with fine-tuning the plain network alike",
    )
    retrofit.add_argument(
        "--finetune-epochs",
        type=int,
        help=f"fine-tuning epochs of --retrofit (default: {DEFAULTS['finetune_epochs']}, "
        f"quick: {QUICK['finetune_epochs']})",
    )
    retrofit.add_argument("--finetune-lr", type=float, help="peak learning rate of the fine-tuning (default: --lr)")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: auto")
    runtime.add_argument("--threads", type=int, help="CPU threads per process (default: idle cores / processes)")
    runtime.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    runtime.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _resolve(args: argparse.Namespace) -> dict[str, Any]:
    from .errors import UserError

    base = QUICK if args.quick else DEFAULTS
    options = {
        key: getattr(args, key) if getattr(args, key, None) is not None else value for key, value in base.items()
    }
    names = ("seeds", "epochs", "train_per_scan", "test_per_scan", "batch_size", "canvas", "digit_scale")
    for name in (*names, "finetune_epochs"):
        value = options.get(name, getattr(args, name, None))
        if value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be an integer >= 1, but got {value}")
    if options["max_scans"] is not None and options["max_scans"] < 2:
        raise UserError(f"--max-scans must be an integer >= 2, but got {options['max_scans']}")
    if args.clutter < 0:
        raise UserError(f"--clutter must be an integer >= 0, but got {args.clutter}")
    if args.data_seed < 0:
        raise UserError(f"--data-seed must be an integer >= 0, but got {args.data_seed}")
    if not args.lr > 0 or args.lr != args.lr or args.lr == float("inf"):
        raise UserError(f"--lr must be a finite number > 0, but got {args.lr}")
    finetune_lr = args.lr if args.finetune_lr is None else args.finetune_lr
    if not finetune_lr > 0 or finetune_lr != finetune_lr or finetune_lr == float("inf"):
        raise UserError(f"--finetune-lr must be a finite number > 0, but got {finetune_lr}")
    options["finetune_lr"] = finetune_lr
    if args.retrofit and list(args.variants) != list(VARIANT_CHOICES):
        raise UserError("--variants does not apply with --retrofit (it compares `none` with `dsa-zero-start`)")
    if args.retrofit and args.alpha_init is not None:
        raise UserError("--alpha-init does not apply with --retrofit: the block is inserted at alpha 0")
    if not args.retrofit and (args.finetune_epochs is not None or args.finetune_lr is not None):
        raise UserError("--finetune-epochs and --finetune-lr apply only with --retrofit")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be an integer >= 1, but got {args.threads}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} exists and is not a folder")
    if args.data is not None and not Path(args.data).is_dir():
        raise UserError(f"--data {args.data!r} is not a folder (expected one subfolder of images per class)")
    options["variants"] = list(dict.fromkeys(args.variants))
    return options


def default_threads(processes: int) -> int:
    """CPU threads per process: the idle cores (cores minus the 1-minute load) shared among the processes.

    Busy cores are left alone because PyTorch's CPU kernels synchronise their threads often: on a loaded
    machine two threads per process can run several times slower than one.
    """
    cores = os.cpu_count() or 1
    try:
        busy = round(os.getloadavg()[0])
    except (AttributeError, OSError):  # no load average on this platform
        busy = 0
    return max(1, (cores - busy) // max(1, processes))


def command_line(args: argparse.Namespace) -> str:
    """The ``cbam-dsa demo ...`` command that repeats this run: the options that differ from their defaults."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = vars(parser.parse_args([]))
    words = ["cbam-dsa", "demo"]
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest, None)
        if value == defaults.get(action.dest) or value is None:
            continue
        flag = action.option_strings[-1]
        if value is True:
            words.append(flag)
        elif isinstance(value, list):
            words += [flag, *map(str, value)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def _attention_overrides(args: argparse.Namespace) -> dict[str, Any]:
    from .errors import UserError

    overrides: dict[str, Any] = {}
    if args.alpha_init is not None:
        overrides["alpha_init"] = args.alpha_init
    if args.sa_temperature is not None:
        if not args.sa_temperature > 0:
            raise UserError(f"--sa-temperature must be a number > 0, but got {args.sa_temperature}")
        overrides["sa_temperature"] = args.sa_temperature
    if args.learnable_temperature:
        overrides["learnable_temperature"] = True
    return overrides


def _load_data(args: argparse.Namespace, options: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    from ..demo.data import ClutteredDigitsConfig, load_image_folder, make_cluttered_digits
    from .errors import UserError

    try:
        if args.data is not None:
            train, test = load_image_folder(args.data, size=args.canvas, seed=args.data_seed)
            info = {
                "description": f"{len(train)} training and {len(test)} test images from {args.data!r} "
                f"({len(train.classes)} classes: {', '.join(train.classes)}), resized to {args.canvas}x{args.canvas}; "
                "split by file, per class. No boxes, so no localisation lift.",
                "config": {"folder": str(Path(args.data).resolve()), "size": args.canvas, "seed": args.data_seed},
                "classes": train.classes,
            }
            return train, test, info
        config = ClutteredDigitsConfig(
            canvas=args.canvas,
            digit_scale=args.digit_scale,
            clutter=args.clutter,
            train_per_scan=options["train_per_scan"],
            test_per_scan=options["test_per_scan"],
            seed=args.data_seed,
        )
        train, test = make_cluttered_digits(config, max_scans=options["max_scans"])
    except ValueError as error:
        raise UserError(str(error)) from error
    boxes = test.boxes.double()
    box_share = float(((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).mean()) / config.canvas**2
    train_scans, test_scans = len(set(train.scan_ids.tolist())), len(set(test.scan_ids.tolist()))
    info = {
        "description": f"Cluttered Digits: {len(train)} training canvases from {train_scans} scans and {len(test)} "
        f"test canvases from {test_scans} other scans of `sklearn.datasets.load_digits` (no scan in both splits); "
        f"{config.canvas}x{config.canvas} canvas, digit {config.digit_size}x{config.digit_size} px, "
        f"{config.clutter} clutter fragments of {config.fragment_size}x{config.fragment_size} px; the digit's "
        f"box covers {100 * box_share:.1f}% of the canvas on average.",
        "config": config.to_dict() | {"max_scans": options["max_scans"]},
        "classes": train.classes,
        "train_images": len(train),
        "test_images": len(test),
        "train_scans": train_scans,
        "test_scans": test_scans,
        "box_share": box_share,
        "max_lift": 1.0 / box_share,
    }
    return train, test, info


def run(args: argparse.Namespace) -> int:
    """Train the chosen variants and write the report; returns the exit code."""
    from .errors import UserError

    options = _resolve(args)
    overrides = _attention_overrides(args)

    import torch

    from ..demo.distributed import setup_distributed, teardown_distributed
    from ..demo.model import DemoNet
    from ..demo.report import write_report
    from ..demo.retrofit import retrofit_experiment
    from ..demo.retrofit_report import write_retrofit_report
    from ..demo.train import TrainConfig, train_variant

    try:
        ctx = setup_distributed(args.device)
    except ValueError as error:
        raise UserError(str(error)) from error
    threads = args.threads or default_threads(ctx.world_size)
    torch.set_num_threads(threads)
    started = time.perf_counter()
    try:
        train, test, data_info = _load_data(args, options)
        train_config = TrainConfig(epochs=options["epochs"], batch_size=args.batch_size, lr=args.lr)
        if args.batch_size < ctx.world_size:
            raise UserError(f"--batch-size {args.batch_size} is smaller than the number of processes {ctx.world_size}")
        in_channels, num_classes = int(train.images.shape[1]), len(train.classes)
        if ctx.is_main:
            what = (
                f"retrofit (none, then dsa-zero-start inserted; {options['finetune_epochs']} fine-tuning epochs)"
                if args.retrofit
                else f"variants {', '.join(options['variants'])}"
            )
            print(
                f"cbam-dsa demo: {len(train)} training / {len(test)} test images, {what}, "
                f"{options['seeds']} seed(s), {options['epochs']} epochs, "
                f"{ctx.device} x {ctx.world_size} process(es), {threads} thread(s) each",
                file=sys.stderr,
            )
        settings: dict[str, Any] = {
            "command": command_line(args),
            "seeds": options["seeds"],
            "train": train_config.to_dict(),
            "attention": overrides,
            "device": str(ctx.device),
            "processes": ctx.world_size,
            "threads": threads,
            "torch": torch.__version__,
            "quick": bool(args.quick),
        }
        if args.retrofit:
            try:
                DemoNet("dsa-zero-start", num_classes, in_channels, attention=overrides)
            except (TypeError, ValueError) as error:
                raise UserError(f"the block refuses these options: {error}") from error
            finetune = TrainConfig(
                epochs=options["finetune_epochs"], batch_size=args.batch_size, lr=options["finetune_lr"]
            )
            settings["finetune"] = finetune.to_dict()
            outcome: Any = [
                retrofit_experiment(
                    train, test, train_config, finetune, seed, ctx, num_classes, in_channels, overrides,
                    progress=not args.no_progress,
                )
                for seed in range(options["seeds"])
            ]  # fmt: skip
            writer: Any = write_retrofit_report
        else:
            outcome = {}
            for variant in options["variants"]:
                try:
                    model_config = DemoNet(variant, num_classes, in_channels, attention=overrides).get_config()
                except (TypeError, ValueError) as error:
                    raise UserError(f"the block refuses these options: {error}") from error
                outcome[variant] = [
                    train_variant(model_config, train, test, train_config, seed, ctx, progress=not args.no_progress)
                    for seed in range(options["seeds"])
                ]
            settings["variants"] = options["variants"]
            writer = write_report
        if ctx.is_main:
            settings["wall_seconds"] = time.perf_counter() - started
            try:
                written = writer(args.out, outcome, test, settings, data_info, figures=not args.no_figures)
            except OSError as error:
                raise UserError(f"could not write the report to {args.out!r}: {error}") from error
            wall = time.perf_counter() - started
            print(f"cbam-dsa demo: wrote {written['report']} in {wall:.0f} s", file=sys.stderr)
    finally:
        teardown_distributed(ctx)
    return 0
