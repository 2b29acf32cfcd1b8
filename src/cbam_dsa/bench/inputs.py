"""The block on other inputs than contiguous float32: channels_last, a strided view, float16 and bfloat16.

For each, timm's ``CbamModule`` (in the input's dtype) and the block's two CPU implementations, timed side by side
in interleaved rounds, forward + backward:

* ``ours_operator``: the block as users get it. The C kernels read float32 (or float64), contiguous or channels_last,
  as it is; for the other inputs the operator converts the input (and the output's gradient) to contiguous float32
  for them and converts the results back;
* ``ours_no_compiler``: the PyTorch implementation (``CBAM_DSA_NATIVE=0``), which converts them the same way for its
  full-size passes (where that measured faster than running on the input as it is: ``ops/pytorch.py``).

``operator_vs_pytorch`` is the median over rounds of the first's time over the second's: below 1, the C kernels after
the conversion are the faster of the two.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..block import CBAMResidualDynamicSA
from .contenders import BASELINE, LABELS, NO_COMPILER, Contender, training_step
from .timing import interleaved_times, round_ratio, summarize

__all__ = ["INPUT_KINDS", "make_input", "measure_inputs"]

INPUT_KINDS = ("channels_last", "strided", "float16", "bfloat16")
"""The inputs measured besides contiguous float32: ``strided`` is every other column of a twice-as-wide tensor."""

CONTENDERS = ("timm_cbam", "ours_operator", "ours_no_compiler")


def make_input(kind: str, shape: Sequence[int], generator: torch.Generator | None = None) -> Tensor:
    """An input of ``shape`` (features after a ReLU, ties included) of one of :data:`INPUT_KINDS`, on the CPU.

    Shape:
        - Output: :math:`(B, C, H, W)`, channels_last, strided (a view) or in float16/bfloat16 as ``kind`` says
    """
    if kind not in INPUT_KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, INPUT_KINDS))}, but got {kind!r}")
    b, c, h, w = shape
    if kind == "strided":
        return torch.randn(b, c, h, 2 * w, generator=generator).relu()[..., ::2]
    x = torch.randn(b, c, h, w, generator=generator).relu()
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    return x.to(getattr(torch, kind))


def measure_inputs(
    shapes: Sequence[tuple[int, int, int, int]], rounds: int, warmup: int, seed: int
) -> list[dict[str, Any]]:
    """The forward + backward figures of every shape and kind of :data:`INPUT_KINDS` (see the module docstring)."""
    from timm.layers.cbam import CbamModule

    found = []
    for shape in shapes:
        for kind in INPUT_KINDS:
            torch.manual_seed(seed)
            x = make_input(kind, shape)
            dtype = x.dtype
            ours = CBAMResidualDynamicSA(shape[1]).to(dtype=dtype)
            contenders = {
                "timm_cbam": Contender(CbamModule(shape[1]).to(dtype=dtype)),
                "ours_operator": Contender(ours),
                "ours_no_compiler": Contender(ours, NO_COMPILER),
            }
            x.requires_grad_()  # a leaf of its own layout (the strided one a view of its base)
            grad_out = torch.randn(shape, dtype=dtype)
            fns = {name: c.wrap(training_step(c.module, x, grad_out)) for name, c in contenders.items()}
            times = interleaved_times(fns, rounds, warmup, "cpu", seed)
            summary = summarize(times, BASELINE)
            found.append(
                {
                    "shape": list(shape),
                    "kind": kind,
                    "dtype": str(dtype).removeprefix("torch."),
                    "contenders": {
                        name: {"label": LABELS[name], "forward_backward": summary[name]} for name in CONTENDERS
                    },
                    "operator_vs_pytorch": round_ratio(times, "ours_operator", "ours_no_compiler"),
                }
            )
    return found
