"""What the benchmark compares: the block on each of its paths against timm's CBAM and SE, eager and compiled."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..block import CBAMResidualDynamicSA

__all__ = [
    "BASELINE",
    "LABELS",
    "NO_COMPILER",
    "Contender",
    "build_contenders",
    "environment",
    "in_environment",
    "label",
    "training_step",
]

BASELINE = "timm_cbam"
"""The contender every ratio is taken against."""

LABELS = {
    "timm_cbam": "timm CbamModule",
    "timm_se": "timm SEModule",
    "ours_operator": "ours, operator (C kernels)",  # on CUDA: label()
    "ours_no_compiler": "ours, operator without C compiler",
    "ours_reference": "ours, reference path",
    "timm_cbam_compiled": "timm CbamModule + compile",
    "timm_se_compiled": "timm SEModule + compile",
    "ours_compiled": "ours + compile",
}
"""Display names, in the order of the tables."""

NO_COMPILER = {"CBAM_DSA_NATIVE": "0"}
"""The environment of the no-compiler path: the CPU operator runs its PyTorch implementation (``ops/pytorch.py``),
as on a machine where the C kernels cannot be built. The variable is read at each call."""


@dataclass
class Contender:
    """One row of the tables: a module, and the environment variables its calls run under (forward and backward)."""

    module: nn.Module
    env: Mapping[str, str] = field(default_factory=dict)

    def wrap(self, step: Callable[[], Any]) -> Callable[[], Any]:
        """``step`` run with :attr:`env` set, the previous values restored after (each call)."""
        return in_environment(step, self.env)


@contextlib.contextmanager
def environment(env: Mapping[str, str]) -> Iterator[None]:
    """Set ``env`` in ``os.environ`` for the block's duration; restore what was there (or its absence) after."""
    previous = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def in_environment(step: Callable[[], Any], env: Mapping[str, str]) -> Callable[[], Any]:
    """``step`` itself where ``env`` is empty, else ``step`` wrapped in :func:`environment`."""
    if not env:
        return step

    def run() -> Any:
        with environment(env):
            return step()

    return run


def training_step(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> Callable[[], None]:
    """One forward + backward of ``module`` on ``x`` (a leaf that requires grad) with ``grad_out``, the gradients of
    ``x`` and of the parameters cleared first, so that no step adds to the one before. The parameters are listed
    once, as an optimizer holds them (``zero_grad(set_to_none=True)``), not walked through the submodules at each
    step."""
    parameters = list(module.parameters())

    def run() -> None:
        x.grad = None
        for parameter in parameters:
            parameter.grad = None
        module(x).backward(grad_out)

    return run


def label(name: str, device: str) -> str:
    """The display name of contender ``name`` on ``device``: on CUDA the operator's row says what it runs."""
    if name == "ours_operator" and device == "cuda":
        from ..ops import library

        if "cuda" in library.devices():
            return "ours, operator (Triton kernels)"
        return "ours, operator (no CUDA implementation registered: the reference path)"
    return LABELS[name]


def build_contenders(channels: int, compile: bool, device: str, dtype: torch.dtype) -> dict[str, Contender]:
    """The contenders, keyed as in :data:`LABELS` (default configurations, random weights).

    ``ours_operator`` and ``ours_no_compiler`` share one block (the same weights); ``ours_reference`` is a block with
    ``fast_path = False``. With ``compile``, timm's modules and the operator's block also run under
    ``torch.compile(fullgraph=True)``, in which the block runs the operator (a graph break would be an error).
    ``ours_no_compiler`` (the CPU operator without its C kernels) is a CPU contender only.
    """
    from timm.layers.cbam import CbamModule
    from timm.layers.squeeze_excite import SEModule

    ours = CBAMResidualDynamicSA(channels).to(device=device, dtype=dtype)
    reference = CBAMResidualDynamicSA(channels).to(device=device, dtype=dtype)
    reference.fast_path = False
    timm_cbam = CbamModule(channels).to(device=device, dtype=dtype)
    timm_se = SEModule(channels).to(device=device, dtype=dtype)
    contenders = {
        "timm_cbam": Contender(timm_cbam),
        "timm_se": Contender(timm_se),
        "ours_operator": Contender(ours),
        "ours_no_compiler": Contender(ours, NO_COMPILER),
        "ours_reference": Contender(reference),
    }
    if device != "cpu":
        del contenders["ours_no_compiler"]
    if compile:
        for name, module in (("timm_cbam", timm_cbam), ("timm_se", timm_se), ("ours", ours)):
            contenders[f"{name}_compiled"] = Contender(torch.compile(module, fullgraph=True))
    return contenders
