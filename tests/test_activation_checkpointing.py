"""Activation checkpointing (``torch.utils.checkpoint``) over the block: the operator runs in the forward pass and
again in the recomputation, and the gradients equal those of a plain training step, in eager mode and compiled."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from cbam_dsa import CBAMResidualDynamicSA
from cbam_dsa.ops.cpu import build, native


class _Checkpointed(nn.Module):
    """A convolution, then the block under ``checkpoint`` (as a memory-bound training script wraps its stages)."""

    def __init__(self, use_reentrant: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.block = CBAMResidualDynamicSA(12, learnable_alpha=True, alpha_init=0.6, learnable_temperature=True)
        self.use_reentrant = use_reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.block, self.conv(x), use_reentrant=self.use_reentrant)


def _step(model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    forward(x).square().mean().backward()
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize(
    ("use_reentrant", "compiled"),
    [(False, False), (True, False), (False, True)],
    ids=["eager", "reentrant", "compiled"],
)
def test_checkpointed_block_recomputes_with_the_operator_and_equals_a_plain_step(monkeypatch, use_reentrant, compiled):
    monkeypatch.setenv("CBAM_DSA_NATIVE", "1")
    library = native.library()
    if library is None:
        pytest.skip(f"the C kernels are unavailable here: {build.why()}")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Checkpointed(use_reentrant)
    x = torch.randn(2, 3, 10, 9)
    forward = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
    before = library.calls("block_forward"), library.calls("block_backward")
    got = _step(model, forward, x)
    calls = library.calls("block_forward") - before[0], library.calls("block_backward") - before[1]
    assert calls == (2, 1)  # the forward, its recomputation in the backward pass, one backward
    expected = _step(model, lambda t: model.block(model.conv(t)), x)  # the plain step, no checkpoint
    assert all(g is not None for g in got) and len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
