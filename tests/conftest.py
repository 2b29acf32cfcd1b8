"""Shared fixtures: deterministic seeds and small helpers for every test file."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def copy_weights(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Copy every parameter and buffer of ``src`` into ``dst`` by name (the architectures must match)."""
    dst.load_state_dict(src.state_dict())
