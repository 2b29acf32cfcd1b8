"""``cbam-dsa export``: write a block as ONNX (and TorchScript), verified against PyTorch before success is reported.

The block comes from a configuration (``--channels 64 --set sa_kernels=3,7 --set ca_gate=hardsigmoid``; every
constructor argument can be given with ``--set``) or from a checkpoint written by
:func:`cbam_dsa.checkpoint.save_checkpoint` (``--checkpoint FILE``). The written files are run on an input of
another shape (onnxruntime for ONNX, ``torch.jit.load`` for TorchScript) and compared with the PyTorch block;
a file that does not match is not written and the command fails.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

HELP = "Export a block (configuration or checkpoint) to ONNX and TorchScript, verified with onnxruntime."

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--channels", type=int, metavar="C", help="build a block for C channels")
    source.add_argument("--checkpoint", metavar="FILE", help="load the block from a checkpoint (.safetensors or .pt)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=(
            "a constructor argument of CBAMResidualDynamicSA, e.g. sa_kernels=3,7 ca_gate=hardsigmoid "
            "learnable_alpha=true (repeatable; lists are comma-separated, booleans true/false)"
        ),
    )
    parser.add_argument("-o", "--output", required=True, metavar="FILE.onnx", help="the ONNX file to write")
    parser.add_argument("--torchscript", metavar="FILE.pt", help="also write a traced TorchScript file")
    parser.add_argument("--dynamo", action="store_true", help="use the torch.export-based ONNX exporter (opset >= 18)")
    parser.add_argument("--opset", type=int, help="ONNX opset (default: 17, or 18 with --dynamo)")
    parser.add_argument("--static", action="store_true", help="fix batch, height and width to the example's")
    parser.add_argument("--batch", type=int, default=2, help="example batch size (default: 2)")
    parser.add_argument("--height", type=int, default=32, help="example height (default: 32)")
    parser.add_argument("--width", type=int, default=32, help="example width (default: 32)")
    parser.add_argument("--atol", type=float, default=1e-4, help="allowed difference from PyTorch (default: 1e-4)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the weights of a new block and the inputs")


def _parse_bool(key: str, text: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise ValueError(f"{key} takes true or false, but got {text!r}")


def _parse_ints(key: str, text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",")] if text.strip() else []
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"{key} takes comma-separated integers such as 3,7, but got {text!r}") from None


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """Turn ``["KEY=VALUE", ...]`` into constructor keywords, typed after the constructor's defaults.

    Raises:
        UserError: a malformed pair, an unknown or repeated key, or a value of the wrong kind.
    """
    import inspect

    from ..block import CBAMResidualDynamicSA
    from .errors import UserError

    parameters = inspect.signature(CBAMResidualDynamicSA).parameters
    defaults = {
        name: p.default
        for name, p in parameters.items()
        if name not in ("channels", "device", "dtype") and p.default is not inspect.Parameter.empty
    }
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set takes KEY=VALUE, but got {pair!r}")
        if key == "channels":
            raise UserError("give the channel count with --channels, not --set channels=...")
        if key not in defaults:
            raise UserError(f"--set {key}: unknown argument; the block takes {', '.join(sorted(defaults))}")
        if key in settings:
            raise UserError(f"--set {key} is given more than once")
        default = defaults[key]
        try:
            if isinstance(default, bool):
                value: Any = _parse_bool(key, text.strip())
            elif isinstance(default, int):
                value = int(text)
            elif isinstance(default, float):
                value = float(text)
            elif isinstance(default, tuple):
                value = _parse_ints(key, text)
            else:
                value = text.strip()
        except ValueError as error:
            kind = "an integer" if isinstance(default, int) and not isinstance(default, bool) else "a number"
            detail = str(error) if isinstance(default, (bool, tuple)) else f"{key} takes {kind}, but got {text!r}"
            raise UserError(f"--set {key}={text}: {detail}") from None
        settings[key] = value
    return settings


def _build_block(args: argparse.Namespace) -> Any:
    from ..block import CBAMResidualDynamicSA
    from ..checkpoint import CheckpointError, load_block
    from .errors import UserError

    settings = parse_settings(args.set)
    if args.checkpoint is not None:
        try:
            return load_block(args.checkpoint, **settings)
        except CheckpointError as error:
            raise UserError(str(error)) from None
    import torch

    torch.manual_seed(args.seed)
    try:
        return CBAMResidualDynamicSA(args.channels, **settings)
    except (TypeError, ValueError) as error:
        raise UserError(f"the block refuses this configuration: {error}") from None


def _check_paths(args: argparse.Namespace) -> tuple[Path, Path | None]:
    from .errors import UserError

    onnx_path = Path(args.output)
    ts_path = Path(args.torchscript) if args.torchscript else None
    for path in (onnx_path, ts_path):
        if path is not None and path.is_dir():
            raise UserError(f"{str(path)!r} is a folder; give a file name")
    if ts_path is not None and ts_path.resolve() == onnx_path.resolve():
        raise UserError("--output and --torchscript name the same file")
    return onnx_path, ts_path


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..export import (
        DYNAMO_MIN_OPSET,
        LEGACY_DEFAULT_OPSET,
        ExportError,
        export_onnx,
        export_torchscript,
        verify_onnx,
        verify_torchscript,
    )
    from .errors import UserError

    for name in ("batch", "height", "width"):
        size = getattr(args, name)
        if size < 1:
            raise UserError(f"--{name} must be >= 1, but got {size}")
        if size < 2 and not args.static:
            raise UserError(
                f"--{name} {size}: a dynamic {name} needs an example of size >= 2 (exporters treat 1 as a constant); "
                f"give --{name} 2 or more, or --static"
            )
    if args.channels is not None and args.channels < 1:
        raise UserError(f"--channels must be >= 1, but got {args.channels}")
    if not args.atol >= 0:
        raise UserError(f"--atol must be >= 0, but got {args.atol}")
    onnx_path, ts_path = _check_paths(args)
    block = _build_block(args).eval()

    generator = torch.Generator().manual_seed(args.seed)
    example = torch.randn(args.batch, block.channels, args.height, args.width, generator=generator)
    if args.static:
        second_shape = tuple(example.shape)
    else:
        second_shape = (args.batch + 1, block.channels, args.height + 7, args.width + 5)
    checks = [torch.randn(*second_shape, generator=generator), torch.randn(*example.shape, generator=generator)]
    dynamic = not args.static
    # Write to temporary names and move them into place only once verified: a failed run leaves no bad file
    # behind and keeps any earlier file of the same name.
    pending = {onnx_path: _partial(onnx_path)}
    if ts_path is not None:
        pending[ts_path] = _partial(ts_path)
    try:
        export_onnx(
            block,
            pending[onnx_path],
            example,
            dynamo=args.dynamo,
            opset=args.opset,
            dynamic_batch=dynamic,
            dynamic_height=dynamic,
            dynamic_width=dynamic,
        )
        onnx_diff = verify_onnx(pending[onnx_path], block, checks, atol=args.atol)
        if ts_path is not None:
            export_torchscript(block, pending[ts_path], example)
            ts_diff = verify_torchscript(pending[ts_path], block, checks, atol=args.atol)
        for final, partial in pending.items():
            os.replace(partial, final)
    except (ExportError, ImportError, TypeError, ValueError, OSError) as error:
        message = " ".join(f"{error}".split())
        raise UserError(f"{message} (nothing was written)") from None
    finally:
        for partial in pending.values():
            partial.unlink(missing_ok=True)

    exporter = "torch.export-based exporter" if args.dynamo else "TorchScript-based exporter"
    opset = args.opset if args.opset is not None else (DYNAMO_MIN_OPSET if args.dynamo else LEGACY_DEFAULT_OPSET)
    axes = "static shape" if args.static else "dynamic batch, height and width"
    shapes = " and ".join(str(tuple(x.shape)) for x in checks[: 1 if args.static else 2])
    print(
        f"wrote {onnx_path} ({exporter}, opset {opset}, {axes}); onnxruntime matches PyTorch on {shapes}: "
        f"max abs diff {onnx_diff:.2g} <= {args.atol:g}"
    )
    if ts_path is not None:
        print(f"wrote {ts_path} (TorchScript, traced); matches PyTorch on {shapes}: max abs diff {ts_diff:.2g}")
    return 0
