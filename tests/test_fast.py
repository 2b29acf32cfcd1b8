"""The fast path (``cbam_dsa._fast``) equals the reference path: outputs and every gradient, in every setting.

The reference is the same block with ``_fast_path = False`` (the plain functions of ``functional.py``, under
ordinary autograd). Ties in the max pools are built in on purpose: the fast path must split their gradient
evenly, as ``torch.amax`` does.
"""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cbam_dsa import CBAMResidualDynamicSA, _fast
from helpers import TOLERANCES, randomize


def make_input(shape: tuple[int, ...], kind: str, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """``normal`` values, ``relu`` features with all-zero channels and pixels (ties in both max pools), or small
    ``integers`` (exact ties inside channels)."""
    x = torch.randn(shape, dtype=torch.float64)
    if kind == "relu":
        x = x.relu()
        x[:, ::2] = 0.0
        x[..., ::3, :] = 0.0
    elif kind == "integers":
        x = torch.randint(-2, 3, shape).to(torch.float64)
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def run(block: CBAMResidualDynamicSA, x: torch.Tensor, fast: bool, grad_seed: int = 2):
    """``(outputs, grad_x, {name: grad})`` of one forward and backward on the chosen path."""
    block._fast_path = fast
    block.zero_grad(set_to_none=True)
    x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    outputs = block(x)
    generator = torch.Generator().manual_seed(grad_seed)
    loss = sum(
        (out * torch.randn(out.shape, generator=generator).to(out)).sum() for out in outputs if out.requires_grad
    )
    loss.backward()
    grads = {name: p.grad for name, p in block.named_parameters()}
    return outputs, x.grad, grads


def assert_paths_agree(block: CBAMResidualDynamicSA, x: torch.Tensor, **tolerance: float) -> None:
    tolerance = tolerance or TOLERANCES[x.dtype]
    block.return_maps = True
    fast_out, fast_gx, fast_grads = run(block, x, fast=True)
    ref_out, ref_gx, ref_grads = run(block, x, fast=False)
    for name, got, expected in zip(("out", "ca", "sa", "fusion_w", "router_w"), fast_out, ref_out, strict=True):
        torch.testing.assert_close(got, expected, **tolerance, msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(fast_gx, ref_gx, **tolerance, msg=lambda m: f"grad x: {m}")
    assert fast_grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        if grad is None:
            assert fast_grads[name] is None, name
        else:
            torch.testing.assert_close(fast_grads[name], grad, **tolerance, msg=lambda m, n=name: f"grad {n}: {m}")


# ----------------------------------------------------------------------------------------------------------
# Equality with the reference.


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 3),
    channels=st.integers(1, 9),
    height=st.integers(1, 9),
    width=st.integers(1, 9),
    fusion=st.sampled_from(["sum", "softmax"]),
    ca_gate=st.sampled_from(["sigmoid", "hardsigmoid"]),
    sa_gate=st.sampled_from(["sigmoid", "hardsigmoid"]),
    act=st.sampled_from(["relu", "silu"]),
    temperatures=st.tuples(st.floats(0.3, 3.0), st.floats(0.3, 3.0)),
    learnable_temperature=st.booleans(),
    kernels=st.lists(st.sampled_from([1, 3, 5, 7]), max_size=3),
    use_dilated=st.booleans(),
    dilated=st.tuples(st.sampled_from([3, 5, 7]), st.integers(1, 3)),
    residual=st.booleans(),
    alpha=st.sampled_from([1.0, 0.0, 0.4, -0.5]),
    learnable_alpha=st.booleans(),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    channels_last=st.booleans(),
    kind=st.sampled_from(["normal", "relu", "integers"]),
)
def test_property_fast_equals_reference(
    batch, channels, height, width, fusion, ca_gate, sa_gate, act, temperatures, learnable_temperature, kernels,
    use_dilated, dilated, residual, alpha, learnable_alpha, dtype, channels_last, kind,
):  # fmt: skip
    if not kernels and not use_dilated:
        use_dilated = True
    block = CBAMResidualDynamicSA(
        channels, min_hidden=2, ca_fusion=fusion, ca_gate=ca_gate, sa_gate=sa_gate, ca_act=act,
        ca_temperature=temperatures[0], sa_temperature=temperatures[1], learnable_temperature=learnable_temperature,
        sa_kernels=tuple(kernels), sa_use_dilated=use_dilated, sa_dilated_kernel=dilated[0],
        sa_dilated_d=dilated[1], residual=residual, alpha_init=alpha if residual else 1.0,
        learnable_alpha=learnable_alpha and residual, dtype=dtype,
    )  # fmt: skip
    randomize(block)
    x = make_input((batch, channels, height, width), kind, dtype, channels_last)
    assert_paths_agree(block, x)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("kind", ["relu", "integers"])
def test_ties_split_the_max_gradient_like_amax(kind, channels_last):
    # All-zero channels tie over H, W; all-zero pixels tie over C; integers tie inside channels.
    block = randomize(CBAMResidualDynamicSA(8, min_hidden=2, dtype=torch.float64))
    x = make_input((2, 8, 6, 5), kind, torch.float64, channels_last)
    assert (x.amax(dim=(2, 3), keepdim=True) == x).sum() > x.shape[0] * x.shape[1]  # ties present
    assert_paths_agree(block, x, rtol=1e-12, atol=1e-13)


def test_default_block_on_resnet_like_features():
    block = randomize(CBAMResidualDynamicSA(64), scale=0.2)
    assert_paths_agree(block, make_input((2, 64, 14, 14), "relu", torch.float32, False))


def test_inputs_without_grad_still_train_the_parameters():
    block = randomize(CBAMResidualDynamicSA(6, min_hidden=2, dtype=torch.float64, learnable_alpha=True))
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    grads = {}
    for fast in (True, False):
        block._fast_path = fast
        block.zero_grad(set_to_none=True)
        block(x).square().sum().backward()
        grads[fast] = {name: p.grad.clone() for name, p in block.named_parameters()}
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-9, atol=1e-11)


def test_parameters_swapped_by_functional_call_get_their_gradients():
    # The channel part recomputes its network in backward: it must use the tensors of the forward pass, not the
    # module's attributes at backward time (functional_call has put the originals back by then).
    block = randomize(
        CBAMResidualDynamicSA(4, min_hidden=2, dtype=torch.float64, learnable_temperature=True, learnable_alpha=True)
    )
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    grads = {}
    for fast in (True, False):
        block._fast_path = fast
        values = {name: p.detach().clone().requires_grad_() for name, p in block.named_parameters()}
        torch.func.functional_call(block, values, (x,)).square().sum().backward()
        grads[fast] = {name: value.grad for name, value in values.items()}
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-9, atol=1e-11, msg=name)


def test_non_contiguous_input():
    block = randomize(CBAMResidualDynamicSA(5, min_hidden=2, dtype=torch.float64))
    x = torch.randn(2, 7, 9, 5, dtype=torch.float64).transpose(2, 3)[:, 1:6]  # neither layout
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    assert_paths_agree(block, x)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_inference_equals_reference(mode):
    block = randomize(CBAMResidualDynamicSA(12, min_hidden=2, learnable_alpha=True, alpha_init=0.6))
    x = make_input((3, 12, 8, 8), "relu", torch.float32, False)
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        fast = block(x)
        block._fast_path = False
        expected = block(x)
    torch.testing.assert_close(fast, expected, **TOLERANCES[torch.float32])


def test_gradcheck_and_gradgradcheck_float64():
    block = randomize(CBAMResidualDynamicSA(3, min_hidden=2, dtype=torch.float64, learnable_alpha=True, alpha_init=0.5))
    x = torch.randn(2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    assert _fast.fast_path_applies(block, x)
    assert torch.autograd.gradcheck(block, (x,))
    assert torch.autograd.gradgradcheck(block, (x,), fast_mode=True)


def test_backward_twice_with_retain_graph_gives_the_same_gradients():
    block = randomize(CBAMResidualDynamicSA(6, min_hidden=2))
    x = make_input((2, 6, 7, 7), "relu", torch.float32, False).requires_grad_()
    out = block(x)
    grad = torch.randn_like(out)
    (first,) = torch.autograd.grad(out, x, grad, retain_graph=True)
    (second,) = torch.autograd.grad(out, x, grad)
    assert torch.equal(first, second)


# ----------------------------------------------------------------------------------------------------------
# Numerics, layout and safety.


def test_deterministic_mode_gives_bitwise_equal_runs(deterministic):
    block = randomize(CBAMResidualDynamicSA(16, min_hidden=2, learnable_alpha=True, alpha_init=0.7))
    x = make_input((2, 16, 9, 9), "relu", torch.float32, False)
    first = run(block, x, fast=True)
    second = run(block, x, fast=True)
    for a, b in zip(first[0], second[0], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(first[1], second[1])
    for name, grad in first[2].items():
        assert torch.equal(grad, second[2][name]), name


def test_bfloat16_autocast_matches_reference():
    block = randomize(CBAMResidualDynamicSA(16, min_hidden=2), scale=0.2)
    x = make_input((2, 16, 8, 8), "relu", torch.float32, False)
    results = {}
    for fast in (True, False):
        block._fast_path = fast
        block.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(xx)
        out.float().square().sum().backward()
        results[fast] = (out, xx.grad, block.sa.branches[0].weight.grad)
    assert results[True][0].dtype == results[False][0].dtype == torch.float32
    for got, expected in zip(results[True], results[False], strict=True):
        torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05 * float(expected.detach().abs().max()))


def test_float16_inputs_up_to_6e4_stay_finite():
    block = randomize(CBAMResidualDynamicSA(16, min_hidden=2), scale=0.2)
    half = CBAMResidualDynamicSA(16, min_hidden=2, dtype=torch.float16)
    half.load_state_dict(block.state_dict())
    x = (torch.rand(2, 16, 9, 9) * 2 - 1) * 6e4
    x[:, 0] = 6e4  # a channel at the float16 limit everywhere: its mean must not overflow
    half.return_maps = block.return_maps = True
    assert _fast.fast_path_applies(half, x.half())
    outputs = half(x.half())
    for tensor in outputs:
        assert torch.isfinite(tensor).all()
    expected = block(x)
    torch.testing.assert_close(outputs[0].float(), expected[0], rtol=1e-2, atol=60.0)
    torch.testing.assert_close(outputs[2].float(), expected[2], rtol=1e-2, atol=1e-2)


def test_channels_last_is_preserved_for_output_and_gradient():
    block = randomize(CBAMResidualDynamicSA(8, min_hidden=2))
    x = make_input((2, 8, 6, 6), "normal", torch.float32, True).requires_grad_()
    out = block(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    out.sum().backward()
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("learnable_alpha", [False, True])
def test_the_callers_tensor_is_never_modified(requires_grad, learnable_alpha):
    block = randomize(CBAMResidualDynamicSA(8, min_hidden=2, learnable_alpha=learnable_alpha))
    x = make_input((2, 8, 6, 6), "relu", torch.float32, False).requires_grad_(requires_grad)
    before, version = x.detach().clone(), x._version
    out = block(x)
    if out.requires_grad:
        out.backward(torch.randn_like(out))
    assert torch.equal(x.detach(), before)
    assert x._version == version
    assert out.data_ptr() != x.data_ptr()


def test_empty_batch_runs_the_reference():
    block = CBAMResidualDynamicSA(4)
    x = torch.zeros(0, 4, 5, 5)
    assert not _fast.fast_path_applies(block, x)
    assert block(x).shape == (0, 4, 5, 5)


# ----------------------------------------------------------------------------------------------------------
# Dispatch: the fast path where it can run, the reference elsewhere.


@pytest.fixture
def fast_path_calls(monkeypatch):
    calls = []
    for name in ("block_forward", "block_output"):
        original = getattr(_fast, name)

        def spy(block, x, _original=original):
            calls.append(tuple(x.shape))
            return _original(block, x)

        monkeypatch.setattr(_fast, name, spy)
    return calls


def test_eager_uses_the_fast_path_and_the_switch_forces_the_reference(fast_path_calls):
    block = CBAMResidualDynamicSA(4)
    block(torch.randn(1, 4, 5, 5))
    assert fast_path_calls == [(1, 4, 5, 5)]
    block._fast_path = False
    block(torch.randn(1, 4, 5, 5))
    assert fast_path_calls == [(1, 4, 5, 5)]


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
def test_tracing_uses_the_reference(fast_path_calls):
    block = randomize(CBAMResidualDynamicSA(4, min_hidden=2)).eval()
    x = torch.randn(2, 4, 6, 6)
    traced = torch.jit.trace(block, x, check_trace=False)
    assert fast_path_calls == []
    torch.testing.assert_close(traced(x), block(x))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_onnx_export_uses_the_reference(fast_path_calls):
    pytest.importorskip("onnx")
    block = randomize(CBAMResidualDynamicSA(4, min_hidden=2)).eval()
    torch.onnx.export(block, (torch.randn(2, 4, 6, 6),), io.BytesIO(), dynamo=False)
    assert fast_path_calls == []


def test_torch_export_uses_the_reference(fast_path_calls):
    block = randomize(CBAMResidualDynamicSA(4, min_hidden=2)).eval()
    x = torch.randn(2, 4, 6, 6)
    program = torch.export.export(block, (x,))
    assert fast_path_calls == []
    torch.testing.assert_close(program.module()(x), block(x))


@pytest.mark.slow
def test_compile_fullgraph_training_equals_eager():
    block = randomize(CBAMResidualDynamicSA(8, min_hidden=2, learnable_alpha=True, alpha_init=0.8))
    x = make_input((2, 8, 7, 7), "relu", torch.float32, False)
    eager_out, eager_gx, eager_grads = run(block, x, fast=True)
    compiled = torch.compile(block, fullgraph=True)
    block.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_()
    outputs = compiled(xx)
    generator = torch.Generator().manual_seed(2)
    sum((out * torch.randn(out.shape, generator=generator)).sum() for out in outputs if out.requires_grad).backward()
    for got, expected in zip(outputs, eager_out, strict=True):
        torch.testing.assert_close(got, expected, **TOLERANCES[torch.float32])
    torch.testing.assert_close(xx.grad, eager_gx, **TOLERANCES[torch.float32])
    for name, p in block.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[name], **TOLERANCES[torch.float32])


# ----------------------------------------------------------------------------------------------------------
# The pieces.


@pytest.mark.parametrize("shape", [(2, 5, 3, 3), (3, 64, 7, 7), (2, 37, 5, 3), (1, 1, 2, 2), (2, 513, 4, 4)])
def test_channel_max_is_amax(shape):
    y = torch.randn(shape)
    y[:, ::2] = 0.0
    assert torch.equal(_fast.channel_max(y), y.amax(dim=1, keepdim=True))


@pytest.mark.parametrize("size", [5, 7, 14, 30])
def test_parameter_gradients_keep_the_parameters_layout(size):
    """DistributedDataParallel copies every step (and warns) when a gradient's strides differ from its bucket."""
    block = CBAMResidualDynamicSA(16, learnable_alpha=True, learnable_temperature=True)
    block(torch.randn(2, 16, size, size)).sum().backward()
    for name, param in block.named_parameters():
        assert param.grad.stride() == param.stride(), name


def test_cuda_tensors_take_the_reference_path():
    block = CBAMResidualDynamicSA(8)
    assert _fast.fast_path_applies(block, torch.randn(1, 8, 4, 4))
    assert not _fast.fast_path_applies(block, torch.randn(1, 8, 4, 4, device="meta"))
