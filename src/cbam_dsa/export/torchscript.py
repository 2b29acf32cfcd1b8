"""TorchScript: a **traced** module written to a file, and a check of the file against PyTorch.

Scripting (``torch.jit.script``) cannot compile the block: its forward is ordinary typed Python (PEP 604 unions,
``tuple[Tensor, ...]``, argument validation with ``isinstance``, tensors or floats in one argument), which the
TorchScript compiler does not accept. The block has no data-dependent control flow, so a trace records it exactly;
the checks on the input's shape run once, at trace time.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ._common import as_inputs, check_module_and_input, compare_runs, eval_mode, output_names_for

__all__ = ["export_torchscript", "verify_torchscript"]


def export_torchscript(
    module: nn.Module,
    path: str | os.PathLike[str],
    example_input: Tensor,
    *,
    check_inputs: Sequence[Tensor] | None = None,
) -> Path:
    """Trace ``module`` with ``torch.jit.trace`` and save it (the module docstring says why it is traced).

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
    check_module_and_input(module, example_input)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with eval_mode(module), warnings.catch_warnings():
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
    items = as_inputs(inputs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")  # any category
        loaded = torch.jit.load(str(path), map_location="cpu")
    return compare_runs("TorchScript", module, items, loaded, output_names_for(module, items[0]), atol, rtol)
