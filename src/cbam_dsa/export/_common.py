"""What the exporters share: argument checks, eval mode, dynamic axes, output names, and comparing outputs.

Used by the ONNX (:mod:`.onnx`), TorchScript (:mod:`.torchscript`) and ``torch.export`` (:mod:`.program`) modules;
nothing here imports an optional dependency.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_bool

__all__ = [
    "AXIS_NAMES",
    "BLOCK_OUTPUT_NAMES",
    "ExportError",
    "as_inputs",
    "as_tuple",
    "check_module_and_input",
    "compare",
    "compare_runs",
    "dynamic_input_axes",
    "eval_mode",
    "output_names_for",
]

BLOCK_OUTPUT_NAMES = ("out", "ca", "sa", "fusion_w", "router_w")
"""Output names of a block with ``return_maps=True`` (a block without maps has the single output ``out``)."""

AXIS_NAMES = {0: "batch", 2: "height", 3: "width"}
"""Names of the input axes that can be dynamic: batch (0), height (2) and width (3)."""


class ExportError(RuntimeError):
    """An export that failed, or a written file whose outputs do not match the PyTorch module's."""


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode for the duration, then back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def check_module_and_input(module: object, example_input: object) -> None:
    """Refuse anything but a module and one ``(B, C, H, W)`` tensor, naming what was given."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, but got {type(module).__name__}")
    if not isinstance(example_input, Tensor):
        raise TypeError(f"example_input must be a torch.Tensor, but got {type(example_input).__name__}")
    if example_input.dim() != 4:
        raise ValueError(
            f"example_input must have shape (B, C, H, W), but got shape {tuple(example_input.shape)} "
            f"({example_input.dim()}-D)"
        )


def dynamic_input_axes(example_input: Tensor, batch: bool, height: bool, width: bool) -> tuple[int, ...]:
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
                f"example_input has {AXIS_NAMES[axis]} {example_input.shape[axis]} (shape "
                f"{tuple(example_input.shape)}), but a dynamic {AXIS_NAMES[axis]} needs an example of size >= 2: "
                "exporters treat a size of 1 as a constant; give a larger example or make that axis static"
            )
    return axes


def as_tuple(outputs: Any) -> tuple[Tensor, ...]:
    """A module's outputs as a tuple of tensors (one tensor becomes a 1-tuple)."""
    if isinstance(outputs, Tensor):
        return (outputs,)
    if isinstance(outputs, (tuple, list)) and all(isinstance(t, Tensor) for t in outputs):
        return tuple(outputs)
    raise ExportError(f"the module must return a tensor or a tuple of tensors, but returned {type(outputs).__name__}")


def output_names_for(module: nn.Module, example_input: Tensor) -> list[str]:
    """Names of the module's outputs: ``out`` (and the maps' names for a block with ``return_maps=True``).

    Any other module returning ``n > 1`` tensors gets ``out_0 ... out_{n-1}``.
    """
    with eval_mode(module), torch.no_grad():
        count = len(as_tuple(module(example_input)))
    if count == 1:
        return ["out"]
    if count == len(BLOCK_OUTPUT_NAMES):
        from ..block import CBAMResidualDynamicSA

        if isinstance(module, CBAMResidualDynamicSA):
            return list(BLOCK_OUTPUT_NAMES)
    return [f"out_{i}" for i in range(count)]


def as_inputs(inputs: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """The inputs to verify on as a non-empty list of tensors."""
    items = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    if not items or not all(isinstance(t, Tensor) for t in items):
        raise TypeError("inputs must be a tensor or a non-empty sequence of tensors")
    return items


def compare(
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


def compare_runs(
    label: str,
    module: nn.Module,
    items: Sequence[Tensor],
    run: Callable[[Tensor], Any],
    names: Sequence[str],
    atol: float,
    rtol: float,
) -> float:
    """Largest absolute difference between ``run(x)`` (an exported file's runner) and ``module(x)`` (in eval mode)
    over ``items``, by :func:`compare` on each input; ``label`` names the runner in the errors."""
    worst = 0.0
    with eval_mode(module), torch.no_grad():
        for x in items:
            expected = as_tuple(module(x))
            got = as_tuple(run(x))
            worst = max(worst, compare(f"{label} on input {tuple(x.shape)}", names, expected, got, atol, rtol))
    return worst
