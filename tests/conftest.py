"""Shared fixtures: deterministic seeds and small helpers for every test file.

The fixtures of the C library's build tests (a fake compiler, an empty cache) live in ``cpu_build_helpers.py``,
registered here as a plugin.
"""

from __future__ import annotations

import pytest
import torch

pytest_plugins = ["cpu_build_helpers"]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One CPU thread for the test: on a small shared machine, more threads per process only wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def deterministic():
    """``torch.use_deterministic_algorithms(True)`` for the test, the previous setting restored after."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)
