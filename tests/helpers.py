"""Helpers shared by the test files of the fast path (imported, not fixtures)."""

from __future__ import annotations

import torch

from cbam_dsa import CBAMResidualDynamicSA

TOLERANCES = {torch.float64: {"rtol": 1e-9, "atol": 1e-11}, torch.float32: {"rtol": 2e-4, "atol": 2e-5}}
"""How close the fast path must come to the reference path, per dtype."""


def randomize(block: CBAMResidualDynamicSA, scale: float = 0.5) -> CBAMResidualDynamicSA:
    """Perturb every parameter, so that no gate saturates and every learned path carries a gradient."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator).to(parameter))
    return block
