"""NaN and infinities spread through the compiled fast path exactly as through the reference path.

The block runs its C kernels by default on contiguous float32/float64 CPU inputs; the reference is
``functional.cbam_residual_dynamic_sa`` with the block's own parameters, differentiated by plain autograd. For a NaN,
+inf or -inf placed in one pixel, one whole channel or one whole sample, across configurations, both give the same
NaN positions and the same infinite positions in the output, in the input's gradient and in every parameter's
gradient, and the finite values agree within the fast path's tolerance.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from torch import Tensor

from cbam_dsa import CBAMResidualDynamicSA
from cbam_dsa import functional as FA
from cbam_dsa.ops.cpu import build, native
from helpers import TOLERANCES, randomize

INF, NAN = float("inf"), float("nan")
CONFIGS = {
    "softmax_sigmoid_relu": {},
    "hardsigmoid_gates": {"ca_gate": "hardsigmoid", "sa_gate": "hardsigmoid"},
    "silu_sum_fusion": {"ca_act": "silu", "ca_fusion": "sum"},
    "learnable_alpha": {"learnable_alpha": True, "alpha_init": 0.3},
    "no_residual": {"residual": False, "alpha_init": 1.0},
    "learnable_temperatures": {"learnable_temperature": True, "ca_temperature": 0.7, "sa_temperature": 1.5},
    "one_branch": {"sa_kernels": (3,), "sa_use_dilated": False},
    "kernel_5_dilated_3x3": {"sa_kernels": (5,), "sa_dilated_kernel": 3, "sa_dilated_d": 3, "sa_router_hidden": 3},
}
# (2, 8, 5, 5): each sample on one thread from start to end (pixels >= 2 * hidden); (2, 8, 2, 3): each stage over
# the whole batch. One thread (the fixture), so that the mode does not depend on the machine.
SIZES = [(2, 8, 5, 5), (2, 8, 2, 3)]
PLACES = {
    "pixel": lambda x, v: x[0, 1, 1, 1].fill_(v),
    "channel": lambda x, v: x[0, 2].fill_(v),
    "sample": lambda x, v: x[1].fill_(v),
}


class _Calls(Mapping):
    """The number of calls of each C entry point so far (:meth:`native.Library.calls`)."""

    def __init__(self, library: native.Library) -> None:
        self.library = library

    def __getitem__(self, entry: str) -> int:
        return self.library.calls(entry)

    def __iter__(self):
        return iter(native.ENTRIES)

    def __len__(self) -> int:
        return len(native.ENTRIES)


@pytest.fixture
def fused_calls(monkeypatch):
    """The library loaded (else a skip), and the count of its C entry points' calls."""
    monkeypatch.setenv("CBAM_DSA_NATIVE", "1")
    library = native.library()
    if library is None:
        pytest.skip(f"the C kernels are unavailable here: {build.why()}")
    return _Calls(library)


def reference(block: CBAMResidualDynamicSA, x: Tensor) -> Tensor:
    """The block's output by ``functional.cbam_residual_dynamic_sa`` from its own parameters."""
    ca, sa = block.ca, block.sa
    return FA.cbam_residual_dynamic_sa(
        x, ca.mlp_params(), ca.fusion_logits, *sa.branch_params(), sa.router_params(), block.alpha, ca.act, ca.gate,
        ca.effective_temperature(), sa.gate, sa.effective_temperature(),
    )[0]  # fmt: skip


def outputs_and_gradients(block: CBAMResidualDynamicSA, x: Tensor, forward) -> dict[str, Tensor | None]:
    block.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = forward(block, x)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=x.dtype).reshape(out.shape))
    found = {"output": out.detach(), "x.grad": x.grad}
    found.update({f"{name}.grad": p.grad for name, p in block.named_parameters()})
    return found


def expected_outputs_and_gradients(block: CBAMResidualDynamicSA, x: Tensor) -> dict[str, Tensor | None]:
    """:func:`outputs_and_gradients` of :func:`reference`, forward and backward on ATen's own convolution kernels.

    Zero padding is part of the spatial convolutions' math: ATen's convolution, like our kernels, multiplies each
    padded zero by the output gradient, so a NaN in that gradient reaches every weight tap, the taps that only ever
    meet padding included (0 x NaN = NaN). oneDNN's kernels skip the padded taps instead, and PyTorch picks oneDNN
    for float32 by the CPU and the shape: on an AVX-512 Xeon, at (2, 8, 2, 3), the 7x7 branch's weight gradient had
    NaN at the 30 taps that meet a pixel and 0 at the other 68, where ATen's kernels (and float64 everywhere) give
    NaN at all 98. So the reference runs with oneDNN off, the same on every CPU.
    """
    previous = torch.backends.mkldnn.enabled  # (not mkldnn.flags(), which warns about TF32 on Intel GPUs)
    torch.backends.mkldnn.enabled = False
    try:
        return outputs_and_gradients(block, x, reference)
    finally:
        torch.backends.mkldnn.enabled = previous


def assert_same_non_finite(fast: dict, expected: dict, dtype: torch.dtype, case: str) -> None:
    assert fast.keys() == expected.keys()
    for name, want in expected.items():
        got = fast[name]
        assert (got is None) == (want is None), f"{case}: {name} is None in one path only"
        if want is None:
            continue
        for kind, mask in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
            assert torch.equal(mask(got), mask(want)), (
                f"{case}: {name} has {kind} at {int(mask(got).sum())} positions, the reference at "
                f"{int(mask(want).sum())} (of {want.numel()})"
            )
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[finite], want[finite], **TOLERANCES[dtype], msg=f"{case}: {name}")


def check(
    config: str, size, place: str, value: float, dtype: torch.dtype, fused_calls, alpha_init=0.5, layout="contiguous"
) -> None:
    options = {"alpha_init": alpha_init, **CONFIGS[config]}
    block = randomize(CBAMResidualDynamicSA(size[1], dtype=dtype, **options))
    x = torch.randn(size, dtype=dtype)
    if place == "+inf_and_-inf":  # inf - inf inside the sums and the blend
        x[0, 1, 0, 0], x[0, 1, 0, 1] = INF, -INF
    else:
        PLACES[place](x, value)
    x = x.contiguous(memory_format=LAYOUTS[layout])
    before = dict(fused_calls) if fused_calls is not None else None
    fast = outputs_and_gradients(block, x, lambda b, x: b(x))
    if before is not None:
        assert fused_calls["block_forward"] == before["block_forward"] + 1, "the fused kernels must run"
        assert fused_calls["block_backward"] == before["block_backward"] + 1, "the fused backward must run"
    expected = expected_outputs_and_gradients(block, x)
    case = f"{config} {tuple(size)} {layout} {place}={value} {dtype}"
    assert_same_non_finite(fast, expected, dtype, case)


VALUES = {"nan": NAN, "+inf": INF, "-inf": -INF}
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}  # the C kernels read both


def check_all(config: str, cases, fused_calls, alpha_init: float = 0.5) -> None:
    """:func:`check` over ``cases`` (place, value) x :data:`SIZES` x both dtypes x :data:`LAYOUTS`; every mismatch
    reported."""
    failures = []
    for place, value in cases:
        for size in SIZES:
            for dtype in (torch.float32, torch.float64):
                for layout in LAYOUTS:
                    try:
                        check(config, size, place, value, dtype, fused_calls, alpha_init, layout)
                    except AssertionError as error:
                        failures.append(str(error).splitlines()[0])
    assert not failures, f"{len(failures)} cases differ from the reference:\n" + "\n".join(failures)


@pytest.mark.parametrize("value", [*VALUES, "+inf_and_-inf"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_non_finite_inputs_give_the_references_non_finite_outputs_and_gradients(config, value, fused_calls, one_thread):
    """One value at each place (a pixel, a channel, a sample), or +inf and -inf side by side in one channel."""
    cases = [("+inf_and_-inf", INF)] if value == "+inf_and_-inf" else [(place, VALUES[value]) for place in PLACES]
    check_all(config, cases, fused_calls)


def test_a_nan_input_with_the_default_block(fused_calls, one_thread):
    """The default block (a fixed alpha of 1, which the fast path drops from the blend) spreads NaN as the
    reference does."""
    check_all("softmax_sigmoid_relu", [(place, NAN) for place in PLACES], fused_calls, alpha_init=1.0)


def test_an_infinite_input_with_a_fixed_alpha_of_one(fused_calls, one_thread):
    block = CBAMResidualDynamicSA(8, sa_kernels=(3,), sa_use_dilated=False, dtype=torch.float64)
    with torch.no_grad():  # positive weights: z = +inf, so ca = 1; the logit near the pixel +inf, so sa = 1
        for parameter in block.parameters():
            parameter.copy_(parameter.abs() + 0.1)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    x[0, 1, 2, 2] = INF
    fast = outputs_and_gradients(block, x, lambda b, x: b(x))
    assert_same_non_finite(fast, expected_outputs_and_gradients(block, x), torch.float64, "alpha = 1, x = inf")
