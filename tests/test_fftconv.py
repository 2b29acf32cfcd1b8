"""``cbam_dsa._fftconv``: the FFT convolution equals the plain per-sample ``F.conv2d`` loop, outputs and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cbam_dsa import _fftconv
from cbam_dsa._fftconv import FFTConv, fft_branch_logit, fft_size, mixed_kernel

KERNEL_SIZES = (1, 3, 5, 7, 13)
DILATIONS = (1, 2, 3)
MAPS = ((1, 1), (3, 5), (7, 7), (13, 9), (28, 28))
pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-4, 2e-5)}


def reference_conv(s: torch.Tensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:
    """The plain math: per sample, a 'same' ``F.conv2d`` with that sample's kernel, summed over channels."""
    padding = (weight.shape[-1] // 2) * dilation
    return torch.cat(
        [F.conv2d(s[i : i + 1], weight[i : i + 1], padding=padding, dilation=dilation) for i in range(s.shape[0])]
    )


def make_case(b: int, c: int, h: int, w: int, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Descriptors and kernels scaled so that outputs are of magnitude about 1."""
    s = torch.randn(b, c, h, w, dtype=torch.float64)
    weight = torch.randn(b, c, k, k, dtype=torch.float64) / (c * k * k) ** 0.5
    return s.to(dtype), weight.to(dtype)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Relative tolerance per dtype; the absolute one scales with the magnitude of ``expected``."""
    rtol, atol = TOLERANCES[dtype]
    scale = max(1.0, float(expected.detach().abs().max()))
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale)


def test_fft_size_is_the_smallest_5_smooth_length() -> None:
    def smooth(m: int) -> bool:
        for prime in (2, 3, 5):
            while m % prime == 0:
                m //= prime
        return m == 1

    for n in range(1, 300):
        size = fft_size(n)
        assert size >= n and smooth(size)
        assert not any(smooth(m) for m in range(n, size))


@pytest.mark.parametrize("n", [0, -3])
def test_fft_size_refuses_non_positive(n: int) -> None:
    with pytest.raises(ValueError, match=f"n must be an integer >= 1, but got {n}"):
        fft_size(n)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch, channels", [(1, 1), (5, 2)])
@pytest.mark.parametrize("height, width", MAPS)
@pytest.mark.parametrize("dilation", DILATIONS)
@pytest.mark.parametrize("k", KERNEL_SIZES)
def test_equals_per_sample_conv(
    k: int, dilation: int, height: int, width: int, batch: int, channels: int, dtype: torch.dtype
) -> None:
    # includes maps smaller than the kernel's reach, where taps fall outside the map on both sides; the plain
    # math runs in float64 on the same values
    s, weight = make_case(batch, channels, height, width, k, dtype)
    s.requires_grad_()
    weight.requires_grad_()
    out = FFTConv.apply(s, weight, dilation)
    s64, weight64 = s.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    expected = reference_conv(s64, weight64, dilation)
    assert out.shape == (batch, 1, height, width) and out.dtype == dtype
    assert_close(out.double(), expected, dtype)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (s, weight), grad_out)
    expected_grads = torch.autograd.grad(expected, (s64, weight64), grad_out.double())
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert grad.dtype == dtype
        assert_close(grad.double(), expected_grad, dtype)


class _CallCounter:
    """Counts the calls of one function of ``torch.fft`` while patched in."""

    def __init__(self, function):
        self.function = function
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


@pytest.mark.parametrize("wanted", ["s", "weight", "both"])
def test_backward_computes_only_the_gradients_asked_for(wanted: str, monkeypatch: pytest.MonkeyPatch) -> None:
    s, weight = make_case(3, 2, 9, 11, 5, torch.float64)
    s.requires_grad_(wanted in ("s", "both"))
    weight.requires_grad_(wanted in ("weight", "both"))
    out = FFTConv.apply(s, weight, 2)
    grad_out = torch.randn_like(out)
    inputs = [t for t in (s, weight) if t.requires_grad]
    expected = torch.autograd.grad(reference_conv(s, weight, 2), inputs, grad_out)
    inverse = _CallCounter(torch.fft.irfft2)
    forward = _CallCounter(torch.fft.rfft2)
    monkeypatch.setattr(torch.fft, "irfft2", inverse)
    monkeypatch.setattr(torch.fft, "rfft2", forward)
    grads = torch.autograd.grad(out, inputs, grad_out)
    # one inverse transform per gradient; the gradient's transform plus one per gradient (kernels or s)
    assert inverse.calls == len(inputs)
    assert forward.calls == 1 + len(inputs)
    for grad, expected_grad in zip(grads, expected, strict=True):
        assert_close(grad, expected_grad, torch.float64)


def test_gradcheck_and_gradgradcheck() -> None:
    s, weight = make_case(2, 2, 5, 4, 3, torch.float64)
    s.requires_grad_()
    weight.requires_grad_()
    assert torch.autograd.gradcheck(FFTConv.apply, (s, weight, 2))
    assert torch.autograd.gradgradcheck(FFTConv.apply, (s, weight, 2))
    weights = [torch.randn(1, 2, k, k, dtype=torch.float64, requires_grad=True) for k in (3, 3)]
    router = torch.rand(2, 2, dtype=torch.float64, requires_grad=True)
    biases = [torch.zeros(1, dtype=torch.float64)] * 2
    logit = lambda s, r, *w: fft_branch_logit(s, list(w), biases, [1, 2], r)  # noqa: E731
    assert torch.autograd.gradgradcheck(logit, (s, router, *weights))


def test_double_backward_equals_the_plain_math() -> None:
    s, weight = make_case(2, 2, 6, 7, 5, torch.float64)
    s.requires_grad_()
    weight.requires_grad_()
    grad_out = torch.randn(2, 1, 6, 7, dtype=torch.float64)

    def second_order(out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        grad_s, grad_weight = torch.autograd.grad(out, (s, weight), grad_out, create_graph=True)
        return torch.autograd.grad((grad_s**2).sum() + (grad_weight**3).sum(), (s, weight))

    for actual, expected in zip(
        second_order(FFTConv.apply(s, weight, 2)), second_order(reference_conv(s, weight, 2)), strict=True
    ):
        assert_close(actual, expected, torch.float64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_compute_in_float32(dtype: torch.dtype) -> None:
    s, weight = make_case(3, 2, 10, 12, 7, dtype)
    s.requires_grad_()
    weight.requires_grad_()
    out = FFTConv.apply(s, weight, 2)
    assert out.dtype == torch.float32
    s32 = s.detach().float().requires_grad_()
    weight32 = weight.detach().float().requires_grad_()
    expected = reference_conv(s32, weight32, 2)
    assert_close(out, expected, torch.float32)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (s, weight), grad_out)
    expected_grads = torch.autograd.grad(expected, (s32, weight32), grad_out)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert grad.dtype == dtype
        # the gradient is rounded to the input's dtype
        torch.testing.assert_close(grad.float(), expected_grad, rtol=1e-2, atol=1e-2)


def test_under_cpu_autocast() -> None:
    s, weight = make_case(2, 2, 9, 9, 5, torch.float32)
    expected = reference_conv(s, weight, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = FFTConv.apply(s.bfloat16(), weight, 1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)


def test_leaves_the_callers_tensors_unchanged() -> None:
    s, weight = make_case(2, 2, 8, 8, 7, torch.float32)
    s.requires_grad_()
    weight.requires_grad_()
    s_before, weight_before = s.detach().clone(), weight.detach().clone()
    grad_out = torch.randn(2, 1, 8, 8)
    grad_before = grad_out.clone()
    FFTConv.apply(s, weight, 3).backward(grad_out)
    assert torch.equal(s, s_before) and torch.equal(weight, weight_before) and torch.equal(grad_out, grad_before)


def test_saves_only_the_inputs() -> None:
    s, weight = make_case(2, 2, 20, 20, 13, torch.float32)
    s.requires_grad_()
    weight.requires_grad_()
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        FFTConv.apply(s, weight, 1)
    assert len(saved) == 2 and {t.data_ptr() for t in saved} == {s.data_ptr(), weight.data_ptr()}


def test_deterministic_mode_gives_bitwise_equal_results() -> None:
    s, weight = make_case(3, 2, 14, 14, 13, torch.float32)
    results = []
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            s_run, weight_run = s.clone().requires_grad_(), weight.clone().requires_grad_()
            out = FFTConv.apply(s_run, weight_run, 1)
            out.backward(torch.ones_like(out))
            results.append((out.detach(), s_run.grad, weight_run.grad))
    finally:
        torch.use_deterministic_algorithms(previous)
    for first, second in zip(*results, strict=True):
        assert torch.equal(first, second)


def test_index_cached_in_inference_mode_serves_autograd_later() -> None:
    _fftconv._tap_index.cache_clear()
    s, weight = make_case(1, 2, 11, 6, 5, torch.float64)
    with torch.inference_mode():
        FFTConv.apply(s, weight, 3)
    s.requires_grad_()
    weight.requires_grad_()
    out = FFTConv.apply(s, weight, 3)
    grad = torch.autograd.grad(out.sum(), weight)[0]
    expected = torch.autograd.grad(reference_conv(s, weight, 3).sum(), weight)[0]
    assert_close(grad, expected, torch.float64)


@pytest.mark.parametrize("shape", [(2, 3, 5, 5), (2, 2, 4, 4), (2, 2, 5, 3), (2, 2, 5)])
def test_refuses_kernels_that_do_not_fit(shape: tuple[int, ...]) -> None:
    s = torch.randn(2, 2, 8, 8)
    with pytest.raises(ValueError, match=r"weight must have shape \(B, C, k, k\) = \(2, 2, k, k\) with odd k"):
        FFTConv.apply(s, torch.randn(shape), 1)


@pytest.mark.parametrize("dilation", [0, 1.5])
def test_refuses_a_bad_dilation(dilation: object) -> None:
    with pytest.raises((TypeError, ValueError), match="dilation must be an integer >= 1"):
        FFTConv.apply(torch.randn(1, 2, 5, 5), torch.randn(1, 2, 3, 3), dilation)


def test_mixed_kernel_gives_the_routed_convolution_at_dilation_1() -> None:
    weights = [torch.randn(1, 2, k, k, dtype=torch.float64) for k in (3, 5, 1)]
    dilations = [3, 2, 4]
    router = torch.rand(3, 3, dtype=torch.float64)
    kernel = mixed_kernel(weights, dilations, router)
    assert kernel.shape == (3, 2, 9, 9)
    s = torch.randn(3, 2, 12, 10, dtype=torch.float64)
    for i in range(3):
        merged = F.conv2d(s[i : i + 1], kernel[i : i + 1], padding=4)
        direct = sum(
            router[i, j] * F.conv2d(s[i : i + 1], weight, padding=(weight.shape[-1] // 2) * dilation, dilation=dilation)
            for j, (weight, dilation) in enumerate(zip(weights, dilations, strict=True))
        )
        torch.testing.assert_close(merged, direct, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "sizes, dilations", [((3, 7, 7), (1, 1, 2)), ((5,), (1,)), ((3, 3), (2, 3)), ((7, 3, 5), (1, 1, 1))]
)
def test_fft_branch_logit_equals_the_routed_branches(
    sizes: tuple[int, ...], dilations: tuple[int, ...], dtype: torch.dtype
) -> None:
    b = 4
    s = torch.randn(b, 2, 15, 12, dtype=dtype, requires_grad=True)
    weights = [(torch.randn(1, 2, k, k, dtype=dtype) / (2 * k * k) ** 0.5).requires_grad_() for k in sizes]
    biases = [torch.randn(1, dtype=dtype, requires_grad=True) for _ in sizes]
    router = torch.softmax(torch.randn(b, len(sizes), dtype=dtype), dim=1).requires_grad_()
    out = fft_branch_logit(s, weights, biases, list(dilations), router)
    expected = sum(
        router[:, i].view(b, 1, 1, 1)
        * F.conv2d(s, weight, bias, padding=(weight.shape[-1] // 2) * dilation, dilation=dilation)
        for i, (weight, bias, dilation) in enumerate(zip(weights, biases, dilations, strict=True))
    )
    assert_close(out, expected, dtype)
    inputs = (s, router, *weights, *biases)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    for grad, expected_grad in zip(grads, torch.autograd.grad(expected, inputs, grad_out), strict=True):
        assert_close(grad, expected_grad, dtype)
