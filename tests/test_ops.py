"""The fused operators (``torch.ops.cbam_dsa``) against the reference path: outputs, maps and every gradient."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from cbam_dsa import CBAMResidualDynamicSA, ops
from cbam_dsa.ops import library, pytorch
from cbam_dsa.ops.cpu import native

BACKENDS = ("native", "pytorch")


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Each CPU implementation in turn: the C kernels, and the PyTorch one (as without a C compiler)."""
    if request.param == "native":
        if native.library() is None:
            pytest.skip("the C kernels cannot be built here")
        monkeypatch.setenv("CBAM_DSA_NATIVE", "1")
    else:
        monkeypatch.setenv("CBAM_DSA_NATIVE", "0")
        assert native.library() is None
    return request.param


def make_block(channels: int, dtype: torch.dtype = torch.float64, seed: int = 0, **config) -> CBAMResidualDynamicSA:
    """A block with random (non-default) parameters, so every gradient is exercised."""
    torch.manual_seed(seed)
    block = CBAMResidualDynamicSA(channels, **config).to(dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return block


def _copy_with_strides(x: Tensor) -> Tensor:
    """A copy of ``x`` with its strides, in a storage of NaN: the gaps of a view that is not dense stay NaN, so a
    kernel that reads them shows it."""
    size = x.storage_offset() + sum((n - 1) * s for n, s in zip(x.shape, x.stride(), strict=True)) + 1
    storage = torch.full((size,), float("nan"), dtype=x.dtype)
    return storage.as_strided(x.shape, x.stride(), x.storage_offset()).copy_(x.detach())


def run(block: CBAMResidualDynamicSA, x: Tensor, seed: int, maps: bool) -> list:
    """The block's outputs and the gradients of ``x`` and every parameter under a random loss (on the output, and
    with ``maps`` on the four maps too)."""
    x = _copy_with_strides(x).requires_grad_(True)
    block.return_maps = True
    outs = block(x)
    generator = torch.Generator().manual_seed(seed)
    used = outs if maps else outs[:1]
    loss = sum((o * torch.randn(o.shape, generator=generator, dtype=o.dtype)).sum() for o in used)
    params = [p for p in block.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x, *params], allow_unused=True)
    return [o.detach() for o in outs] + [None if g is None else g.detach() for g in grads]


def reference(block: CBAMResidualDynamicSA, x: Tensor, seed: int, maps: bool) -> list:
    block.fast_path = False
    try:
        return run(block, x, seed, maps)
    finally:
        block.fast_path = True


def assert_same(got: list, expected: list, rtol: float, atol: float) -> None:
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        if b is None or a is None:
            assert a is None or not a.any(), f"entry {i}: {a} where the reference has no gradient"
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, f"entry {i}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        assert torch.equal(a.isnan(), b.isnan()), f"entry {i}: NaN at other positions"
        assert torch.equal(a.isposinf(), b.isposinf()) and torch.equal(a.isneginf(), b.isneginf()), f"entry {i}: inf"
        finite = b.isfinite()
        torch.testing.assert_close(a[finite], b[finite], rtol=rtol, atol=atol, msg=lambda m, i=i: f"entry {i}: {m}")


CONFIG = st.fixed_dictionaries(
    {
        "ca_fusion": st.sampled_from(["sum", "softmax"]),
        "ca_gate": st.sampled_from(["sigmoid", "hardsigmoid"]),
        "sa_gate": st.sampled_from(["sigmoid", "hardsigmoid"]),
        "ca_act": st.sampled_from(["relu", "silu"]),
        "ca_temperature": st.sampled_from([1.0, 0.5, 2.0]),
        "sa_temperature": st.sampled_from([1.0, 0.7]),
        "learnable_temperature": st.booleans(),
        "sa_kernels": st.sampled_from([(3, 7), (3,), (), (1, 5)]),
        "sa_use_dilated": st.booleans(),
        "blend": st.sampled_from(["default", "fixed_0.4", "learnable_0.3", "none"]),
        "reduction": st.sampled_from([1, 4, 16]),
    }
)


def block_config(drawn: dict) -> dict:
    config = dict(drawn)
    blend = config.pop("blend")
    if not config["sa_kernels"]:
        config["sa_use_dilated"] = True
    if blend == "none":
        config["residual"] = False
    elif blend != "default":
        kind, value = blend.split("_")
        config["alpha_init"] = float(value)
        config["learnable_alpha"] = kind == "learnable"
    return config


SHAPE = st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(1, 9))
LAYOUT = st.sampled_from([torch.contiguous_format, torch.channels_last])  # the C kernels read both as they are
OPCHECK_LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(drawn=CONFIG, shape=SHAPE, maps=st.booleans(), seed=st.integers(0, 2**16), layout=LAYOUT)
def test_operator_equals_the_reference(backend, drawn, shape, maps, seed, layout):
    b, c, h, w = shape
    block = make_block(c, seed=seed, **block_config(drawn))
    x = torch.randn(b, c, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    x = x.contiguous(memory_format=layout)
    assert_same(run(block, x, seed, maps), reference(block, x, seed, maps), rtol=1e-9, atol=1e-11)


SPECIAL = st.sampled_from([float("nan"), float("inf"), float("-inf")])
WHERE = st.sampled_from(["pixel", "channel", "sample", "pixel_all_channels"])


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    drawn=CONFIG, shape=SHAPE, value=SPECIAL, where=WHERE, maps=st.booleans(), seed=st.integers(0, 2**16), layout=LAYOUT
)
def test_non_finite_values_spread_as_in_the_reference(backend, drawn, shape, value, where, maps, seed, layout):
    b, c, h, w = shape
    block = make_block(c, seed=seed, **block_config(drawn))
    x = torch.randn(b, c, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    index = {
        "pixel": (0, c - 1, h // 2, w - 1),
        "channel": (b - 1, 0),
        "sample": (0,),
        "pixel_all_channels": (0, slice(None), 0, 0),
    }[where]
    x[index] = value
    x = x.contiguous(memory_format=layout)
    assert_same(run(block, x, seed, maps), reference(block, x, seed, maps), rtol=1e-9, atol=1e-11)


# Maps wider than the C kernels' vector blocks (8 columns) and taller than their row tiles (4 rows), on both sides of
# a block's edge, maps of 128 pixels and more (reduced plane by plane, not eight planes at a time), and short maps
# with more channels than the kernels' channel blocks (32) and not a multiple of eight, with and without a non-finite
# value: the property-based tests above stop at 9 x 9 and 9 channels. In channels_last, the same shapes cover the
# (B, P, C) passes' tiles of 64 pixels and groups of eight, and (1, 300, 3, 5) rows longer than their channel blocks
# (256) and than tiles_reduce's rows (64), neither a multiple of them.
@pytest.mark.parametrize(
    "shape",
    [(2, 3, 5, 17), (1, 4, 13, 8), (2, 2, 6, 23), (1, 3, 30, 31), (3, 45, 7, 7), (1, 70, 3, 5), (1, 300, 3, 5)],
)
@pytest.mark.parametrize("special", [None, float("nan"), float("inf")])
@pytest.mark.parametrize("maps", [False, True])
@pytest.mark.parametrize("layout", list(OPCHECK_LAYOUTS))
def test_wide_maps_equal_the_reference(backend, shape, special, maps, layout):
    b, c, h, w = shape
    block = make_block(c, seed=w)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(h))
    if special is not None:
        x[b - 1, c - 1, h // 2, w - 1] = special
    x = x.contiguous(memory_format=OPCHECK_LAYOUTS[layout])
    assert_same(run(block, x, w, maps), reference(block, x, w, maps), rtol=1e-9, atol=1e-11)


# The channel MLP's matrix products on both sides of the C kernels' tiles (4 rows by 32 columns; 4 by 4 sums over 64
# channels and more), full and partial: channel counts and hidden widths past those of the tests above, a batch of
# one and of several tiles, a channel count that is not a multiple of eight.
@pytest.mark.parametrize(
    ("shape", "reduction"), [((4, 70, 2, 3), 16), ((5, 70, 3, 2), 2), ((9, 128, 1, 2), 4), ((1, 64, 2, 2), 1)]
)
def test_wide_mlps_equal_the_reference(backend, shape, reduction):
    b, c = shape[:2]
    block = make_block(c, seed=b, reduction=reduction)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(c))
    assert_same(run(block, x, b, False), reference(block, x, b, False), rtol=1e-9, atol=1e-11)


# ----------------------------------------------------------------------------------------------------------
# The operators' contract: opcheck, argument checks, other dtypes and layouts, threads, double backward.


def _op_args(block: CBAMResidualDynamicSA, x: Tensor) -> tuple:
    part, spatial = block.ca, block.sa
    weights, biases, dilations = spatial.branch_params()
    router = spatial.router_params() or (None, None, None, None)
    return (
        x, *part.mlp_params(), part.fusion_logits, part.effective_temperature(), spatial.effective_temperature(),
        block.alpha, *router, weights, biases, list(dilations), part.act, part.gate, spatial.gate,
    )  # fmt: skip


def _detached_op_args(block: CBAMResidualDynamicSA, x: Tensor) -> list:
    """:func:`_op_args`, every tensor detached (the branch lists' too): the operators called directly."""
    args = [t.detach() if isinstance(t, Tensor) else t for t in _op_args(block, x)]
    args[13], args[14] = [t.detach() for t in args[13]], [t.detach() for t in args[14]]
    return args


OPCHECK_CONFIGS = {
    "default": {},
    "sum_hard_one_branch": {"ca_fusion": "sum", "ca_gate": "hardsigmoid", "sa_kernels": (3,), "sa_use_dilated": False},
    "learnable": {"learnable_alpha": True, "alpha_init": 0.5, "learnable_temperature": True, "ca_act": "silu"},
    "no_residual": {"residual": False, "sa_gate": "hardsigmoid"},
}


@pytest.mark.parametrize("layout", list(OPCHECK_LAYOUTS))
@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (3, 4, 9, 9)])
@pytest.mark.parametrize("config", list(OPCHECK_CONFIGS))
def test_opcheck_forward(backend, config, shape, layout):
    block = make_block(shape[1], torch.float32, **OPCHECK_CONFIGS[config])
    x = torch.randn(shape).contiguous(memory_format=OPCHECK_LAYOUTS[layout]).requires_grad_()
    torch.library.opcheck(ops.FORWARD, _op_args(block, x))


# (5, 7): maps small enough that the PyTorch implementation's branch gradients come as slices of one buffer, which
# opcheck failed on (outputs aliasing each other) before library.gradients_like copied them.
@pytest.mark.parametrize("size", [(8, 9), (5, 7)])
@pytest.mark.parametrize("layout", list(OPCHECK_LAYOUTS))
@pytest.mark.parametrize("maps", [False, True])
@pytest.mark.parametrize("config", list(OPCHECK_CONFIGS))
def test_opcheck_backward(backend, config, maps, layout, size):
    block = make_block(5, torch.float32, **OPCHECK_CONFIGS[config])
    args = _detached_op_args(block, torch.randn(2, 5, *size).contiguous(memory_format=OPCHECK_LAYOUTS[layout]))
    out, ca, sa, fusion_w, router_w, *saved = ops.FORWARD(*args)
    grads = [torch.randn_like(out)] + [torch.randn_like(t) if maps else None for t in (ca, sa, fusion_w, router_w)]
    flat = library.gradient_inputs(args)
    needs = [t is not None for t in flat]

    torch.library.opcheck(ops.BACKWARD, (*grads, *args[:15], saved, *args[15:], needs))


BAD_FORWARD = {  # what is wrong: (position, replacement of the good value, the message after the operator name)
    "x_dtype": (0, lambda t: t.long(), r"x must be a floating-point \(B, C, H, W\) tensor with H, W >= 1, but got "
                r"shape \(2, 6, 4, 4\) and dtype torch.int64"),
    "channels": (1, lambda t: torch.randn(3, 5, 1, 1), r"x has 6 channels, but fc1_weight has shape \(3, 5, 1, 1\) "
                 r"\(expected \(hidden, 6, 1, 1\)\)"),
    "shape": (4, lambda t: torch.randn(5), r"fc2_bias must have shape \(6,\), but got \(5,\)"),
    "scalar": (6, lambda t: torch.ones(2), r"ca_temperature must have shape \(\), but got \(2,\)"),
    "dtype": (2, lambda t: t.long(), r"fc1_bias must be a floating-point tensor on x's device \(cpu\), but got "
              r"torch.int64 on cpu"),
    "router": (9, lambda t: None, "router_fc1_weight is None, but the other router tensors are given"),
    "kernel": (13, lambda ts: [torch.randn(1, 2, 4, 4), *ts[1:]], r"branch 0 must have an odd kernel size and a "
               r"dilation >= 1, but got kernel shape \(1, 2, 4, 4\) and dilation 1"),
    "act": (16, lambda a: "gelu", r"act must be one of \('relu', 'silu'\), but got 'gelu'"),
}  # fmt: skip


@pytest.mark.parametrize("where", ["kernel", "fake"])
@pytest.mark.parametrize("wrong", list(BAD_FORWARD))
def test_the_operators_check_their_arguments(where, wrong):
    """A bad argument is a ValueError worded the same by the CPU kernel (C++ where the library is loaded) and by the
    fake kernel (Python: what torch.compile traces)."""
    block = make_block(6, torch.float32)
    args = [a.detach() if isinstance(a, Tensor) else a for a in _op_args(block, torch.randn(2, 6, 4, 4))]
    position, change, message = BAD_FORWARD[wrong]
    args[position] = change(args[position])
    if where == "fake":
        mode = torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True)
        args = [
            mode.from_tensor(a) if isinstance(a, Tensor) else [mode.from_tensor(t) for t in a] if _tensors(a) else a
            for a in args
        ]
        with mode, pytest.raises(ValueError, match="cbam_dsa::block_forward: " + message):
            ops.FORWARD(*args)
    else:
        with pytest.raises(ValueError, match="cbam_dsa::block_forward: " + message):
            ops.FORWARD(*args)


def _tensors(a: object) -> bool:
    return isinstance(a, list) and bool(a) and isinstance(a[0], Tensor)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_every_entry_checks_the_arguments(backend, requires_grad):
    """The checks run in the dispatcher's kernel of both operators, and on the autograd node's direct call of the
    forward kernel (a tensor that requires grad), for each CPU implementation."""
    block = make_block(6, torch.float32)
    args = list(_op_args(block, torch.randn(2, 6, 4, 4, requires_grad=requires_grad)))
    found = ops.FORWARD(*args)
    out, saved = found[0], found[5:]
    wrong = list(args)
    wrong[4] = torch.randn(5)
    with pytest.raises(ValueError, match=r"fc2_bias must have shape \(6,\)"):
        ops.FORWARD(*wrong)
    needs = [t is not None for t in library.gradient_inputs(args)]
    grads = [torch.randn_like(out.detach()), None, None, None, None]
    detached = [a.detach() if isinstance(a, Tensor) else a for a in wrong]
    with pytest.raises(ValueError, match=r"fc2_bias must have shape \(6,\)"):
        ops.BACKWARD(*grads, *detached[:15], [t.detach() for t in saved], *detached[15:], needs)


def _backward_args(block: CBAMResidualDynamicSA, x: Tensor) -> tuple[list, list, list, list]:
    """``block_backward``'s arguments for ``block(x)``, detached: the five gradients, the forward's arguments, the
    forward's ``saved`` list and ``needs``."""
    args = _detached_op_args(block, x)
    out, ca, sa, fusion_w, router_w, *saved = ops.FORWARD(*args)
    grads = [torch.randn_like(t) for t in (out, ca, sa, fusion_w, router_w)]
    return grads, args, list(saved), [t is not None for t in library.gradient_inputs(args)]


BAD_BACKWARD = {  # what is wrong: (part, position, replacement from the good value, message)
    "grad_out_batch": ("grads", 0, lambda t: t[:1], r"grad_out must have shape \(2, 6, 4, 5\), but got \(1, 6, 4, 5\)"),
    "grad_sa_shape": ("grads", 2, lambda t: t.transpose(2, 3), r"grad_sa must have shape \(2, 1, 4, 5\)"),
    "grad_router_w_integer": ("grads", 4, lambda t: t.long(), "grad_router_w must be a floating-point tensor"),
    "grad_ca_meta": ("grads", 1, lambda t: t.to("meta"), "grad_ca must be a floating-point tensor on x's device"),
    "saved_short": ("saved", None, lambda saved: saved[:-1], "saved must be the forward's list of 7 tensors"),
    "saved_long": ("saved", None, lambda saved: saved * 2, "saved must be the forward's list of 7 tensors"),
    "saved_shape": ("saved", 1, lambda t: t[:1], r"saved\[1\] must have shape \(2, 2, 4, 5\)"),
    "needs_short": ("needs", None, lambda needs: needs[:-1], "needs must have one entry per tensor argument"),
    "forward_argument": ("args", 4, lambda t: t[:5], r"block_backward: fc2_bias must have shape \(6,\)"),
}


@pytest.mark.parametrize("wrong", list(BAD_BACKWARD))
def test_the_backward_checks_its_gradients_and_saved_tensors(backend, wrong):
    """A gradient, saved tensor or ``needs`` that does not match the forward is a ValueError naming it, in the
    device's kernel and in the fake kernel (what torch.compile traces): no kernel reads past what it is given."""
    block = make_block(6, torch.float32)
    grads, args, saved, needs = _backward_args(block, torch.randn(2, 6, 4, 5))
    part, position, change, message = BAD_BACKWARD[wrong]
    parts = {"grads": grads, "args": args, "saved": saved, "needs": needs}
    if position is None:
        parts[part] = change(parts[part])
    else:
        parts[part][position] = change(parts[part][position])
    call = (*parts["grads"], *parts["args"][:15], parts["saved"], *parts["args"][15:], parts["needs"])
    with pytest.raises(ValueError, match=message):
        ops.BACKWARD(*call)
    if wrong == "grad_ca_meta":
        return  # a fake-tensor mode takes no mix of meta and real tensors
    with torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(a) if isinstance(a, Tensor) else a for a in call]
        fake = [
            [mode.from_tensor(t) for t in a] if isinstance(a, list) and a and isinstance(a[0], Tensor) else a
            for a in fake
        ]
        with pytest.raises(ValueError, match=message):
            ops.BACKWARD(*fake)


def test_the_backward_takes_any_subset_of_gradients(backend):
    """Gradients that are None (an output the loss does not use) need no check, and the result equals the one with
    zeros in their place."""
    block = make_block(6, torch.float32)
    grads, args, saved, needs = _backward_args(block, torch.randn(2, 6, 4, 5))
    given = [grads[0], None, grads[2], None, None]
    zeros = [grads[0], torch.zeros_like(grads[1]), grads[2], torch.zeros_like(grads[3]), torch.zeros_like(grads[4])]
    found, expected = (ops.BACKWARD(*g, *args[:15], saved, *args[15:], needs) for g in (given, zeros))
    for a, b in zip(found, expected, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("special", [False, True])
@pytest.mark.parametrize("layout", list(OPCHECK_LAYOUTS))
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (3, 5, 8, 8)])
def test_both_backends_keep_one_saved_list(monkeypatch, shape, layout, special):
    """The C kernels and the PyTorch implementation save the same list, so the backward of either takes the forward of
    either (``CBAM_DSA_NATIVE`` is read at each call). Its last tensor holds the maxima over H, W below
    ``KEEP_POOLS_FROM_PIXELS`` pixels per map (the backward recomputes the means), and both pooled descriptors from
    there on, as torch.mean and torch.amax give them: with ``special``, NaN where a channel holds a NaN, and +inf
    where it holds +inf and -inf (its mean NaN)."""
    if native.library() is None:
        pytest.skip("the C kernels cannot be built here")
    block = make_block(shape[1], torch.float64)
    x = torch.randn(shape, dtype=torch.float64)
    if special:
        x[1, 2, 3, 4] = float("nan")
        x[0, 1, 0, 0], x[0, 1, 2, 1] = float("inf"), float("-inf")
    x = x.contiguous(memory_format=OPCHECK_LAYOUTS[layout])
    means, maxima = x.mean(dim=(2, 3)), x.amax(dim=(2, 3))
    expected_pools = maxima if shape[2] * shape[3] < pytorch.KEEP_POOLS_FROM_PIXELS else torch.cat([means, maxima])
    found = {}
    for forward in BACKENDS:
        monkeypatch.setenv("CBAM_DSA_NATIVE", "1" if forward == "native" else "0")
        torch.manual_seed(1)  # the same output gradient each time
        grads, args, saved, needs = _backward_args(block, x)
        torch.testing.assert_close(saved[6], expected_pools, equal_nan=True)
        given = (grads[0], None, None, None, None)  # the output's gradient only: the C backward takes it
        for backward in BACKENDS:
            monkeypatch.setenv("CBAM_DSA_NATIVE", "1" if backward == "native" else "0")
            found[forward, backward] = ops.BACKWARD(*given, *args[:15], saved, *args[15:], needs)
    expected = found["pytorch", "pytorch"]
    for pair, grads in found.items():
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(
                got, want, rtol=1e-9, atol=1e-11, equal_nan=True, msg=lambda m, pair=pair: f"{pair}: {m}"
            )


@pytest.mark.parametrize("shape", [(3, 6, 5, 7), (2, 6, 8, 9)])
@pytest.mark.parametrize("special", [None, "ties", "nan", "inf"])
def test_the_pytorch_backward_reads_its_own_forwards_maxima(monkeypatch, shape, special):
    """The PyTorch backward takes the maxima over C of x * ca from the descriptors its own forward saved rather than
    recomputing them, with the same gradients, bit for bit, as recomputing them, which it does for any other saved
    list (a copy here; the C kernels' in use)."""
    monkeypatch.setenv("CBAM_DSA_NATIVE", "0")
    block = make_block(shape[1], torch.float32)
    x = torch.randn(shape)
    if special == "ties":  # whole channels of zeros and repeated values, as after a ReLU
        x = x.clamp_min(0).round()
    elif special is not None:
        x[1, 2, 3, 4] = float(special)
    grads, args, saved, needs = _backward_args(block, x)
    given = (grads[0], grads[1], None, None, None)
    recomputed = []
    channel_max = pytorch.channel_max
    monkeypatch.setattr(pytorch, "channel_max", lambda y: recomputed.append(y.shape) or channel_max(y))
    own = ops.BACKWARD(*given, *args[:15], saved, *args[15:], needs)
    assert not recomputed
    copy = ops.BACKWARD(*given, *args[:15], [saved[0], saved[1].clone(), *saved[2:]], *args[15:], needs)
    assert recomputed == [shape]
    for a, b in zip(own, copy, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


# What block_forward returns under each overload name, at two sizes of a (2, 6, H, W) input with the default branches:
# the output, the four maps and the saved list (its pools: the maxima below 64 pixels per map, both descriptors from
# there). torch.compile's on-disk caches key a graph on the operators' names, so returning other shapes needs a new
# name (library.OVERLOAD): this table then gets a new entry, and the test fails until it has one.
_V2_RETURNS = {
    (7, 9): [(2, 6, 7, 9), (2, 6, 1, 1), (2, 1, 7, 9), (2,), (2, 3),
             (2, 6), (2, 2, 7, 9), (2, 1, 7, 9), (2, 3), (2, 8), (4, 4), (2, 6)],
    (8, 8): [(2, 6, 8, 8), (2, 6, 1, 1), (2, 1, 8, 8), (2,), (2, 3),
             (2, 6), (2, 2, 8, 8), (2, 1, 8, 8), (2, 3), (2, 8), (4, 4), (4, 6)],
}  # fmt: skip
# v3: the same returns, tagged flexible_layout; v4: the same tensors, as one flat list (v2 and v3: the saved ones a
# list of their own)
RETURNS = {"v2": _V2_RETURNS, "v3": _V2_RETURNS, "v4": _V2_RETURNS}


@pytest.mark.parametrize("fake", [False, True])
def test_what_the_forward_returns_belongs_to_its_overload_name(backend, fake):
    expected = RETURNS.get(library.OVERLOAD)
    assert expected is not None, f"no entry in RETURNS for the overload {library.OVERLOAD!r}"
    block = make_block(6, torch.float32)
    for (h, w), shapes in expected.items():
        args = _detached_op_args(block, torch.randn(2, 6, h, w))
        if fake:
            with torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True):
                found = ops.FORWARD(*args)
        else:
            found = ops.FORWARD(*args)
        assert [tuple(t.shape) for t in found] == shapes


def _channels_last(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _strided(t: Tensor) -> Tensor:
    return t.transpose(2, 3).contiguous().transpose(2, 3)


def _every_other_column(t: Tensor) -> Tensor:  # a view that is not dense: torch.empty_like lays it out contiguously
    return torch.stack([t, torch.full_like(t, float("nan"))], dim=-1).flatten(-2)[..., ::2]


LAYOUTS = {
    "contiguous": lambda t: t,
    "channels_last": _channels_last,
    "transposed": _strided,
    "every_other_column": _every_other_column,
}
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (4e-2, 4e-2), torch.float16: (1e-2, 1e-2)}


@pytest.mark.parametrize("maps", [False, True])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_other_dtypes_and_layouts_equal_the_reference(backend, dtype, layout, maps):
    block = make_block(8, dtype, learnable_alpha=True, alpha_init=0.6)
    x = LAYOUTS[layout](torch.randn(3, 8, 10, 9).to(dtype))
    got = run(block, x, 0, maps=maps)
    expected = reference(block, x, 0, maps=maps)
    layout = torch.empty_like(x).stride()  # x's own, but contiguous for a view that is not dense
    assert got[0].stride() == layout and got[5].stride() == layout  # out and its gradient are laid out as x
    rtol, atol = TOLERANCES[dtype]
    assert_same(got, expected, rtol=rtol, atol=atol)


SPLITS = {  # operators.cpp's chunk_samples, with 2 threads: chunks of (batch + 1) // 2 samples, or of 1 for batch 2
    "chunks": ({"reduction": 4}, (11, 13)),  # a chunk's maps (143+ pixels) outweigh the MLP (3 hidden)
    "stages": ({"reduction": 1}, (2, 2)),  # they do not (4 to 20 pixels, 12 hidden): each stage on all threads
}


@pytest.mark.parametrize("layout", list(OPCHECK_LAYOUTS))
@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 2, 3, 5])
def test_every_thread_split_equals_the_reference(backend, threads, batch, split, layout):
    config, size = SPLITS[split]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        block = make_block(12, **config)
        x = torch.randn(batch, 12, *size, dtype=torch.float64).contiguous(memory_format=OPCHECK_LAYOUTS[layout])
        assert_same(run(block, x, 1, maps=False), reference(block, x, 1, maps=False), rtol=1e-9, atol=1e-11)
    finally:
        torch.set_num_threads(previous)


def test_nothing_given_is_modified_in_place(backend):
    block = make_block(6, torch.float32, learnable_alpha=True, alpha_init=0.5)
    x = torch.randn(2, 6, 9, 9, requires_grad=True)
    before, version = x.detach().clone(), x._version
    out = block(x)
    grad = torch.randn_like(out)
    grad_before, grad_version = grad.clone(), grad._version
    out.backward(grad)
    assert torch.equal(x.detach(), before) and x._version == version
    assert torch.equal(grad, grad_before) and grad._version == grad_version
    assert x.grad.data_ptr() not in (x.data_ptr(), grad.data_ptr())


# Several blocks called at once from Python threads (the operators run without the GIL), as a server's threads may:
# branch layouts no other test builds (kernels of 5 and 9, a dilation of 3), so that their first calls fill the C++
# operators' layout cache (behind a lock) side by side; channels_last beside contiguous.
THREADED = [
    ({"sa_kernels": (5,), "sa_use_dilated": False}, torch.contiguous_format),
    ({"sa_kernels": (9,), "sa_dilated_kernel": 5, "sa_dilated_d": 3}, torch.channels_last),
    ({"sa_kernels": (5, 9), "sa_use_dilated": False}, torch.contiguous_format),
    ({"sa_kernels": (), "sa_dilated_kernel": 9, "sa_dilated_d": 3}, torch.channels_last),
]


def test_blocks_called_from_several_threads_at_once_give_their_results_alone(backend):
    cases = []
    for i, (config, layout) in enumerate(THREADED):
        block = make_block(6, seed=i, **config)
        cases.append((block, torch.randn(3, 6, 11, 10 + i, dtype=torch.float64).contiguous(memory_format=layout)))
    start, found, errors = threading.Barrier(len(cases)), [[] for _ in cases], []

    def work(i: int) -> None:
        block, x = cases[i]
        try:
            start.wait(timeout=60)
            found[i].extend(run(block, x, i, maps=True) for _ in range(3))
        except BaseException as error:  # reported below, with the thread's case
            errors.append((i, error))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and all(not thread.is_alive() for thread in threads), errors
    for i, (block, x) in enumerate(cases):
        alone = run(block, x, i, maps=True)
        assert_same(alone, reference(block, x, i, maps=True), rtol=1e-9, atol=1e-11)
        for got in found[i]:
            assert_same(got, alone, rtol=1e-12, atol=1e-14)


DOUBLE_BACKWARD_CONFIGS = {  # hardsigmoid has no second derivative in PyTorch, on the reference path either
    "default": {},
    "learnable": OPCHECK_CONFIGS["learnable"],
    "sum_no_residual_one_branch": {"ca_fusion": "sum", "residual": False, "sa_kernels": (3,), "sa_use_dilated": False},
}


@pytest.mark.parametrize("config", list(DOUBLE_BACKWARD_CONFIGS))
def test_gradcheck_and_double_backward(backend, config):
    block = make_block(3, torch.float64, **DOUBLE_BACKWARD_CONFIGS[config])
    block.return_maps = True
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    params = [p for p in block.parameters() if p.requires_grad]

    def outputs(x, *params):
        return block(x)

    assert torch.autograd.gradcheck(outputs, (x, *params), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradgradcheck(outputs, (x, *params), eps=1e-6, atol=1e-4)


def test_the_reference_switch():
    block = make_block(4)
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    calls = []
    original = library.FORWARD

    def counting(*args):
        calls.append(1)
        return original(*args)

    try:
        ops.FORWARD = counting  # the block calls the operator through ops.FORWARD
        block(x)
        assert calls == [1]
        block.fast_path = False
        block(x)
        assert calls == [1]
    finally:
        ops.FORWARD = original


@pytest.mark.parametrize("maps", [False, True])
def test_a_channels_last_model_equals_the_contiguous_one(backend, maps):
    """``model.to(memory_format=torch.channels_last)`` (the usual recipe for channels_last training) lays the block's
    4-D weights out channels_last too, the branch kernels' strides no longer contiguous: outputs and every gradient
    are those of the block with contiguous weights, each gradient laid out as its parameter."""
    block = make_block(16, torch.float32, learnable_alpha=True, alpha_init=0.5)
    converted = make_block(16, torch.float32, learnable_alpha=True, alpha_init=0.5).to(
        memory_format=torch.channels_last
    )
    assert not all(p.is_contiguous() for p in converted.parameters())
    x = torch.randn(2, 16, 9, 7).contiguous(memory_format=torch.channels_last)
    got = run(converted, x, seed=3, maps=maps)
    assert_same(got, run(block, x, seed=3, maps=maps), rtol=1e-5, atol=1e-6)
    params = [p for p in converted.parameters() if p.requires_grad]
    assert all(g.stride() == p.stride() for g, p in zip(got[6:], params, strict=True))
