"""``torch.export``: an ``ExportedProgram`` of the block, or any model holding it, with dynamic batch, height and width.

The program is taken in eval mode and can be saved with ``torch.export.save`` (a ``.pt2`` file).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ._common import AXIS_NAMES, check_module_and_input, dynamic_input_axes, eval_mode

__all__ = ["export_program"]


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
    check_module_and_input(module, example_input)
    axes = dynamic_input_axes(example_input, dynamic_batch, dynamic_height, dynamic_width)
    dims = {axis: torch.export.Dim(AXIS_NAMES[axis], min=1) for axis in axes}
    with eval_mode(module):
        program = torch.export.export(module, (example_input,), dynamic_shapes=((dims,) if dims else None))
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, str(path))
    return program
