"""The gate temperature shared by both attention parts: a fixed buffer or a learned, positive value."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def register_temperature(
    module: nn.Module,
    value: float,
    learnable: bool,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> None:
    """Give ``module`` a ``temperature`` buffer and, if ``learnable``, a ``temperature_log_scale`` parameter.

    The effective temperature is ``temperature * exp(temperature_log_scale)``: always positive, and exactly
    ``value`` at initialisation because the log-scale starts at zero.
    """
    module.register_buffer("temperature", torch.tensor(value, device=device, dtype=dtype))
    log_scale = nn.Parameter(torch.zeros((), device=device, dtype=dtype)) if learnable else None
    module.register_parameter("temperature_log_scale", log_scale)


def effective_temperature(module: nn.Module) -> Tensor:
    """The temperature that divides the gate's input (a 0-d tensor)."""
    if module.temperature_log_scale is None:
        return module.temperature
    return module.temperature * torch.exp(module.temperature_log_scale)
