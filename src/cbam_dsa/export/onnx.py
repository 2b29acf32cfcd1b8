"""ONNX: write a module with either exporter, list a file's operators, and check a file against PyTorch.

* :func:`export_onnx` writes the file with the TorchScript-based exporter (``dynamo=False``, opset 17 by default)
  or the ``torch.export``-based one (``dynamo=True``, opset 18 or later), with dynamic batch, height and width
  unless told otherwise, and gives every graph output its name.
* :func:`onnx_op_types` lists the operators of a file (the block's graph has ``ReduceMax``, never adaptive max
  pooling).
* :func:`verify_onnx` runs the file in onnxruntime and compares every output with PyTorch's.

``onnx``, ``onnxruntime`` and ``onnxscript`` are imported only when needed: ``pip install 'cbam-dsa[export]'``.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_bool, check_int
from ._common import (
    AXIS_NAMES,
    ExportError,
    as_inputs,
    check_module_and_input,
    compare_runs,
    dynamic_input_axes,
    eval_mode,
    output_names_for,
)

__all__ = ["DYNAMO_MIN_OPSET", "LEGACY_DEFAULT_OPSET", "export_onnx", "onnx_op_types", "verify_onnx"]

LEGACY_DEFAULT_OPSET = 17
"""Default opset of the TorchScript-based exporter (``dynamo=False``)."""

DYNAMO_MIN_OPSET = 18
"""Lowest opset the ``torch.export``-based exporter (``dynamo=True``) writes; also its default here."""

# Axes of each block output that follow the input's batch (0), height (2) and width (3).
_BLOCK_OUTPUT_AXES = {"out": (0, 2, 3), "ca": (0,), "sa": (0, 2, 3), "fusion_w": (), "router_w": (0,)}


def _require(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(
            f"{name} is needed for ONNX export and verification; install it with: pip install 'cbam-dsa[export]'"
        ) from error


def export_onnx(
    module: nn.Module,
    path: str | os.PathLike[str],
    example_input: Tensor,
    *,
    dynamo: bool = False,
    opset: int | None = None,
    dynamic_batch: bool = True,
    dynamic_height: bool = True,
    dynamic_width: bool = True,
    input_name: str = "x",
    output_names: Sequence[str] | None = None,
) -> Path:
    """Write ``module`` as an ONNX file (weights inside the file, no external data).

    Args:
        module (nn.Module): the block, or any model holding it, taking one ``(B, C, H, W)`` tensor.
        path (str or PathLike): the file to write; parent folders are created.
        example_input (Tensor): an input to trace with; every dynamic axis needs a size >= 2 here.
        dynamo (bool): use the ``torch.export``-based exporter instead of the TorchScript-based one.
            Default: ``False``.
        opset (int, optional): the ONNX opset. Default: ``17`` for ``dynamo=False``, ``18`` for ``dynamo=True``
            (which cannot write an opset below 18).
        dynamic_batch, dynamic_height, dynamic_width (bool): leave that input axis free in the file.
            Default: ``True``.
        input_name (str): name of the graph input. Default: ``"x"``.
        output_names (Sequence[str], optional): names of the graph outputs. Default: :func:`output_names_for`.

    Returns:
        Path: the path written.

    Raises:
        ImportError: onnx or onnxscript is missing (``pip install 'cbam-dsa[export]'``).
        ValueError: an opset the chosen exporter cannot write, or an example too small for a dynamic axis.
        ExportError: the exporter failed.

    Shape:
        - example_input: :math:`(B, C, H, W)`

    Example:
        >>> block = CBAMResidualDynamicSA(64)
        >>> path = export_onnx(block, "block.onnx", torch.randn(2, 64, 32, 32))
        >>> verify_onnx(path, block, torch.randn(3, 64, 17, 23)) < 1e-4
        True
    """
    check_module_and_input(module, example_input)
    dynamo = check_bool("dynamo", dynamo)
    if opset is None:
        opset = DYNAMO_MIN_OPSET if dynamo else LEGACY_DEFAULT_OPSET
    opset = check_int("opset", opset, minimum=7)
    if dynamo and opset < DYNAMO_MIN_OPSET:
        raise ValueError(
            f"opset must be >= {DYNAMO_MIN_OPSET} with dynamo=True (the torch.export-based exporter writes no lower "
            f"opset), but got {opset}; use dynamo=False for opsets below {DYNAMO_MIN_OPSET}"
        )
    axes = dynamic_input_axes(example_input, dynamic_batch, dynamic_height, dynamic_width)
    if output_names is None:
        output_names = output_names_for(module, example_input)
    output_names = list(output_names)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _require("onnx")
    if dynamo:
        _require("onnxscript")
    with eval_mode(module), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"cbam_dsa\._checks")
        # dynamo=False is chosen on purpose (opset 17 for older runtimes); its deprecation notice is not news here.
        warnings.filterwarnings(
            "ignore", message=r".*legacy TorchScript-based ONNX export", category=DeprecationWarning
        )
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx\._internal")
        try:
            if dynamo:
                dims = {axis: torch.export.Dim(AXIS_NAMES[axis], min=1) for axis in axes}
                torch.onnx.export(
                    module,
                    (example_input,),
                    str(path),
                    dynamo=True,
                    opset_version=opset,
                    input_names=[input_name],
                    output_names=output_names,
                    dynamic_shapes=((dims,) if dims else None),
                    external_data=False,
                    verbose=False,
                )
            else:
                dynamic_axes = {input_name: {axis: AXIS_NAMES[axis] for axis in axes}} if axes else None
                if dynamic_axes is not None:
                    for name in output_names:
                        out_axes = [a for a in _BLOCK_OUTPUT_AXES.get(name, ()) if a in axes]
                        if out_axes:
                            dynamic_axes[name] = {a: AXIS_NAMES[a] for a in out_axes}
                torch.onnx.export(
                    module,
                    (example_input,),
                    str(path),
                    dynamo=False,
                    opset_version=opset,
                    input_names=[input_name],
                    output_names=output_names,
                    dynamic_axes=dynamic_axes,
                )
        except Exception as error:  # exporters raise many kinds of errors; report them as one
            raise ExportError(f"ONNX export (dynamo={dynamo}, opset {opset}) failed: {_first_line(error)}") from error
    written = _name_outputs(path, output_names)
    if written != opset:
        raise ExportError(f"ONNX export asked for opset {opset}, but the exporter wrote opset {written} to {path}")
    return path


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else '(no message)'}"


def _name_outputs(path: Path, output_names: Sequence[str]) -> int:
    """Give every graph output its name; returns the file's opset.

    The TorchScript-based exporter folds an output that depends on weights alone (``fusion_w`` in eval mode) into
    an initializer and keeps the initializer's name for it; an ``Identity`` node restores the name asked for.
    """
    onnx = _require("onnx")
    model = onnx.load(str(path))
    renamed = False
    for output, name in zip(model.graph.output, output_names, strict=False):
        if output.name != name:
            model.graph.node.append(onnx.helper.make_node("Identity", [output.name], [name]))
            output.name = name
            renamed = True
    if renamed:
        onnx.save(model, str(path))
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def onnx_op_types(path: str | os.PathLike[str]) -> set[str]:
    """The operator types in an ONNX file, including those inside local functions and subgraphs."""
    onnx = _require("onnx")
    model = onnx.load(str(path), load_external_data=False)
    types: set[str] = set()

    def visit(nodes: Any) -> None:
        for node in nodes:
            types.add(node.op_type)
            for attribute in node.attribute:
                if attribute.g is not None:
                    visit(attribute.g.node)
                for graph in attribute.graphs:
                    visit(graph.node)

    visit(model.graph.node)
    for function in model.functions:
        visit(function.node)
    return types


def verify_onnx(
    path: str | os.PathLike[str],
    module: nn.Module,
    inputs: Tensor | Sequence[Tensor],
    *,
    atol: float = 1e-4,
    rtol: float = 0.0,
) -> float:
    """Run an ONNX file in onnxruntime (CPU) and compare every output with ``module``'s (in eval mode).

    Args:
        path (str or PathLike): the ONNX file.
        module (nn.Module): the PyTorch module it was exported from.
        inputs (Tensor or Sequence[Tensor]): inputs to compare on; use shapes other than the export example's to
            check the dynamic axes.
        atol (float): allowed absolute difference. Default: ``1e-4``.
        rtol (float): allowed difference relative to PyTorch's value, added to ``atol``. Default: ``0``.

    Returns:
        float: the largest absolute difference seen.

    Raises:
        ImportError: onnxruntime is missing.
        ExportError: an output differs by more than allowed, or has another shape or count.

    Shape:
        - inputs: :math:`(B, C, H, W)` each
    """
    ort = _require("onnxruntime")
    items = as_inputs(inputs)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]

    def run(x: Tensor) -> list[Tensor]:
        return [torch.from_numpy(a) for a in session.run(None, {input_name: x.detach().cpu().numpy()})]

    return compare_runs("onnxruntime", module, items, run, names, atol, rtol)
