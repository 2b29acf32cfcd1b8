"""Deployment helpers: ONNX (both exporters), TorchScript and ``torch.export`` for the block or any model holding it.

* :func:`export_onnx` writes an ONNX file with either exporter: the TorchScript-based one (``dynamo=False``,
  opset 17 by default) or the ``torch.export``-based one (``dynamo=True``, opset 18 or later), with dynamic
  batch, height and width unless told otherwise.
* :func:`verify_onnx` runs the file in onnxruntime and compares every output with PyTorch's.
* :func:`export_torchscript` writes a **traced** TorchScript module, and :func:`verify_torchscript` checks it.
  Scripting (``torch.jit.script``) cannot compile the block: its forward is ordinary typed Python (PEP 604
  unions, ``tuple[Tensor, ...]``, argument validation with ``isinstance``, tensors or floats in one argument),
  which the TorchScript compiler does not accept. The block has no data-dependent control flow, so a trace
  records it exactly; the checks on the input's shape run once, at trace time.
* :func:`export_program` returns (and optionally saves) a ``torch.export.ExportedProgram``.

The graph never contains adaptive max pooling: the reference path pools with ``amax``, which exports as
``ReduceMax`` (:func:`onnx_op_types` lists the operators of a file). Every exporter sees the reference path.
Modules are exported in eval mode (the block behaves the same in both modes) and put back in the mode they
were in. ``onnx``, ``onnxruntime`` and ``onnxscript`` are imported only when needed: ``pip install
'cbam-dsa[export]'``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_bool, check_int

__all__ = [
    "BLOCK_OUTPUT_NAMES",
    "DYNAMO_MIN_OPSET",
    "LEGACY_DEFAULT_OPSET",
    "ExportError",
    "export_onnx",
    "export_program",
    "export_torchscript",
    "onnx_op_types",
    "output_names_for",
    "verify_onnx",
    "verify_torchscript",
]

LEGACY_DEFAULT_OPSET = 17
"""Default opset of the TorchScript-based exporter (``dynamo=False``)."""

DYNAMO_MIN_OPSET = 18
"""Lowest opset the ``torch.export``-based exporter (``dynamo=True``) writes; also its default here."""

BLOCK_OUTPUT_NAMES = ("out", "ca", "sa", "fusion_w", "router_w")
"""Output names of a block with ``return_maps=True`` (a block without maps has the single output ``out``)."""

# Axes of each block output that follow the input's batch (0), height (2) and width (3).
_BLOCK_OUTPUT_AXES = {"out": (0, 2, 3), "ca": (0,), "sa": (0, 2, 3), "fusion_w": (), "router_w": (0,)}
_AXIS_NAMES = {0: "batch", 2: "height", 3: "width"}


class ExportError(RuntimeError):
    """An export that failed, or a written file whose outputs do not match the PyTorch module's."""


def _require(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(
            f"{name} is needed for ONNX export and verification; install it with: pip install 'cbam-dsa[export]'"
        ) from error


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode for the duration, then back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def _check_module_and_input(module: object, example_input: object) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, but got {type(module).__name__}")
    if not isinstance(example_input, Tensor):
        raise TypeError(f"example_input must be a torch.Tensor, but got {type(example_input).__name__}")
    if example_input.dim() != 4:
        raise ValueError(
            f"example_input must have shape (B, C, H, W), but got shape {tuple(example_input.shape)} "
            f"({example_input.dim()}-D)"
        )


def _dynamic_axes(example_input: Tensor, batch: bool, height: bool, width: bool) -> tuple[int, ...]:
    """The dynamic axes of the input; each needs a size >= 2 in the example (size 1 is specialised away)."""
    wanted = {
        0: check_bool("dynamic_batch", batch),
        2: check_bool("dynamic_height", height),
        3: check_bool("dynamic_width", width),
    }
    axes = tuple(axis for axis, dynamic in wanted.items() if dynamic)
    for axis in axes:
        if example_input.shape[axis] < 2:
            raise ValueError(
                f"example_input has {_AXIS_NAMES[axis]} {example_input.shape[axis]} (shape "
                f"{tuple(example_input.shape)}), but a dynamic {_AXIS_NAMES[axis]} needs an example of size >= 2: "
                "exporters treat a size of 1 as a constant; give a larger example or make that axis static"
            )
    return axes


def _as_tuple(outputs: Any) -> tuple[Tensor, ...]:
    if isinstance(outputs, Tensor):
        return (outputs,)
    if isinstance(outputs, (tuple, list)) and all(isinstance(t, Tensor) for t in outputs):
        return tuple(outputs)
    raise ExportError(f"the module must return a tensor or a tuple of tensors, but returned {type(outputs).__name__}")


def output_names_for(module: nn.Module, example_input: Tensor) -> list[str]:
    """Names of the module's outputs: ``out`` (and the maps' names for a block with ``return_maps=True``).

    Any other module returning ``n > 1`` tensors gets ``out_0 ... out_{n-1}``.
    """
    with _eval_mode(module), torch.no_grad():
        count = len(_as_tuple(module(example_input)))
    if count == 1:
        return ["out"]
    if count == len(BLOCK_OUTPUT_NAMES):
        from .block import CBAMResidualDynamicSA

        if isinstance(module, CBAMResidualDynamicSA):
            return list(BLOCK_OUTPUT_NAMES)
    return [f"out_{i}" for i in range(count)]


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
    _check_module_and_input(module, example_input)
    dynamo = check_bool("dynamo", dynamo)
    if opset is None:
        opset = DYNAMO_MIN_OPSET if dynamo else LEGACY_DEFAULT_OPSET
    opset = check_int("opset", opset, minimum=7)
    if dynamo and opset < DYNAMO_MIN_OPSET:
        raise ValueError(
            f"opset must be >= {DYNAMO_MIN_OPSET} with dynamo=True (the torch.export-based exporter writes no lower "
            f"opset), but got {opset}; use dynamo=False for opsets below {DYNAMO_MIN_OPSET}"
        )
    axes = _dynamic_axes(example_input, dynamic_batch, dynamic_height, dynamic_width)
    if output_names is None:
        output_names = output_names_for(module, example_input)
    output_names = list(output_names)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _require("onnx")
    if dynamo:
        _require("onnxscript")
    with _eval_mode(module), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"cbam_dsa\._checks")
        # dynamo=False is chosen on purpose (opset 17 for older runtimes); its deprecation notice is not news here.
        warnings.filterwarnings(
            "ignore", message=r".*legacy TorchScript-based ONNX export", category=DeprecationWarning
        )
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx\._internal")
        try:
            if dynamo:
                dims = {axis: torch.export.Dim(_AXIS_NAMES[axis], min=1) for axis in axes}
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
                dynamic_axes = {input_name: {axis: _AXIS_NAMES[axis] for axis in axes}} if axes else None
                if dynamic_axes is not None:
                    for name in output_names:
                        out_axes = [a for a in _BLOCK_OUTPUT_AXES.get(name, ()) if a in axes]
                        if out_axes:
                            dynamic_axes[name] = {a: _AXIS_NAMES[a] for a in out_axes}
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


def _as_inputs(inputs: Tensor | Sequence[Tensor]) -> list[Tensor]:
    items = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    if not items or not all(isinstance(t, Tensor) for t in items):
        raise TypeError("inputs must be a tensor or a non-empty sequence of tensors")
    return items


def _compare(
    what: str, names: Sequence[str], expected: Sequence[Tensor], got: Sequence[Tensor], atol: float, rtol: float
) -> float:
    """Largest absolute difference between ``got`` and ``expected``; raises if any exceeds ``atol + rtol*|e|``."""
    if len(got) != len(expected):
        raise ExportError(f"{what} gives {len(got)} outputs where PyTorch gives {len(expected)}")
    worst = 0.0
    for name, e, g in zip(names, expected, got, strict=True):
        e = e.detach().to("cpu", torch.float64)
        g = g.detach().to("cpu", torch.float64)
        if g.shape != e.shape:
            raise ExportError(
                f"{what}: output {name!r} has shape {tuple(g.shape)} where PyTorch gives {tuple(e.shape)}"
            )
        diff = (g - e).abs()
        bad = ~(diff <= atol + rtol * e.abs())  # NaN counts as bad
        if bool(bad.any()):
            largest = float(diff.nan_to_num(float("inf")).max())
            raise ExportError(
                f"{what}: output {name!r} differs from PyTorch by up to {largest:.3g} "
                f"(allowed: {atol:g} + {rtol:g} * |expected|)"
            )
        if diff.numel():
            worst = max(worst, float(diff.max()))
    return worst


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
    items = _as_inputs(inputs)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    worst = 0.0
    with _eval_mode(module), torch.no_grad():
        for x in items:
            expected = _as_tuple(module(x))
            got = [torch.from_numpy(a) for a in session.run(None, {input_name: x.detach().cpu().numpy()})]
            what = f"onnxruntime on input {tuple(x.shape)}"
            worst = max(worst, _compare(what, names, expected, got, atol, rtol))
    return worst


def export_torchscript(
    module: nn.Module,
    path: str | os.PathLike[str],
    example_input: Tensor,
    *,
    check_inputs: Sequence[Tensor] | None = None,
) -> Path:
    """Trace ``module`` with ``torch.jit.trace`` and save it (see the module docstring for why it is traced).

    The trace is taken in eval mode. TorchScript is deprecated upstream in favour of ``torch.export``
    (:func:`export_program`); it stays useful for C++ (libtorch) deployment.

    Args:
        module (nn.Module): the block, or any model holding it.
        path (str or PathLike): the file to write (``.pt``); parent folders are created.
        example_input (Tensor): the input to trace with.
        check_inputs (Sequence[Tensor], optional): further inputs the tracer re-traces and compares on.

    Returns:
        Path: the path written; load it with ``torch.jit.load(path)``.

    Shape:
        - example_input: :math:`(B, C, H, W)`
    """
    _check_module_and_input(module, example_input)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _eval_mode(module), warnings.catch_warnings():
        # Shape checks compare sizes with Python ints: they are meant to run once, at trace time.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"cbam_dsa\._checks")
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")  # any category
        checks = [(t,) for t in check_inputs] if check_inputs else None
        traced = torch.jit.trace(module, (example_input,), check_inputs=checks)
        traced.save(str(path))
    return path


def verify_torchscript(
    path: str | os.PathLike[str],
    module: nn.Module,
    inputs: Tensor | Sequence[Tensor],
    *,
    atol: float = 1e-4,
    rtol: float = 0.0,
) -> float:
    """Load a TorchScript file and compare its outputs with ``module``'s (in eval mode), as :func:`verify_onnx`.

    Only load TorchScript files you trust: a TorchScript file holds a program, not just weights.
    """
    items = _as_inputs(inputs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")  # any category
        loaded = torch.jit.load(str(path), map_location="cpu")
    names: list[str] = []
    worst = 0.0
    with _eval_mode(module), torch.no_grad():
        for x in items:
            expected = _as_tuple(module(x))
            got = _as_tuple(loaded(x))
            names = names or output_names_for(module, x)
            worst = max(worst, _compare(f"TorchScript on input {tuple(x.shape)}", names, expected, got, atol, rtol))
    return worst


def export_program(
    module: nn.Module,
    example_input: Tensor,
    *,
    dynamic_batch: bool = True,
    dynamic_height: bool = True,
    dynamic_width: bool = True,
    path: str | os.PathLike[str] | None = None,
) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``module`` (in eval mode) with dynamic batch, height and width.

    Args:
        module (nn.Module): the block, or any model holding it.
        example_input (Tensor): an input to export with; every dynamic axis needs a size >= 2 here.
        dynamic_batch, dynamic_height, dynamic_width (bool): leave that input axis free. Default: ``True``.
        path (str or PathLike, optional): also save the program there with ``torch.export.save`` (``.pt2``).

    Returns:
        ExportedProgram: call ``program.module()(x)`` to run it.

    Shape:
        - example_input: :math:`(B, C, H, W)`
    """
    _check_module_and_input(module, example_input)
    axes = _dynamic_axes(example_input, dynamic_batch, dynamic_height, dynamic_width)
    dims = {axis: torch.export.Dim(_AXIS_NAMES[axis], min=1) for axis in axes}
    with _eval_mode(module):
        program = torch.export.export(module, (example_input,), dynamic_shapes=((dims,) if dims else None))
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, str(path))
    return program
