"""CBAMResidualDynamicSA: the block's contract (issue 2), checked through its public behaviour.

These tests hold whichever path the block runs (reference or fast): they compare against the returned maps, the
plain functions of ``cbam_dsa.functional`` and identities of the design.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cbam_dsa import CBAMResidualDynamicSA, DynamicSpatialAttention
from cbam_dsa import functional as FA

CONFIGS = [
    {},
    {"ca_fusion": "sum"},
    {"ca_gate": "hardsigmoid", "sa_gate": "hardsigmoid"},
    {"ca_act": "silu", "ca_temperature": 0.5, "sa_temperature": 2.0},
    {"learnable_temperature": True, "learnable_alpha": True, "alpha_init": 0.3},
    {"residual": False},
    {"sa_kernels": (), "sa_use_dilated": True},
    {"sa_kernels": (7,), "sa_use_dilated": False},
    {"sa_kernels": (1, 3, 5), "sa_dilated_kernel": 3, "sa_dilated_d": 3, "sa_router_hidden": 2},
    {"alpha_init": -0.5},
]


def randomize(block: CBAMResidualDynamicSA) -> CBAMResidualDynamicSA:
    """Give the learned logits non-trivial values so that fusion and temperature paths are exercised."""
    with torch.no_grad():
        if block.ca.fusion_logits is not None:
            block.ca.fusion_logits.copy_(torch.tensor([0.4, -0.7]))
        for part in (block.ca, block.sa):
            if part.temperature_log_scale is not None:
                part.temperature_log_scale.fill_(0.2)
    return block


def reference(block: CBAMResidualDynamicSA, x: torch.Tensor):
    """The whole block through the plain functions, with the block's own weights."""
    return FA.cbam_residual_dynamic_sa(
        x,
        block.ca.mlp_params(),
        block.ca.fusion_logits,
        *block.sa.branch_params(),
        block.sa.router_params(),
        alpha=block.alpha,
        ca_act=block.ca.act,
        ca_gate=block.ca.gate,
        ca_temperature=block.ca.effective_temperature(),
        sa_gate=block.sa.gate,
        sa_temperature=block.sa.effective_temperature(),
    )


@pytest.mark.parametrize("config", CONFIGS)
def test_composition_identity_from_returned_maps(config):
    block = randomize(CBAMResidualDynamicSA(24, return_maps=True, **config))
    x = torch.randn(3, 24, 9, 7)
    out, ca, sa, fusion_w, router_w = block(x)
    alpha = block.alpha if block.residual else 1.0
    torch.testing.assert_close(out, x + alpha * (x * ca * sa - x))
    assert ca.shape == (3, 24, 1, 1) and sa.shape == (3, 1, 9, 7) and fusion_w.shape == (2,)
    assert router_w.shape == (3, block.sa.num_branches)


@pytest.mark.parametrize("config", CONFIGS)
def test_block_equals_functional_reference(config):
    block = randomize(CBAMResidualDynamicSA(16, return_maps=True, **config))
    x = torch.randn(2, 16, 6, 10)
    for got, expected in zip(block(x), reference(block, x), strict=True):
        torch.testing.assert_close(got, expected)


def test_default_returns_tensor_and_maps_are_togglable():
    block = CBAMResidualDynamicSA(8)
    x = torch.randn(2, 8, 5, 5)
    out = block(x)
    assert isinstance(out, torch.Tensor) and out.shape == x.shape
    block.return_maps = True
    maps = block(x)
    assert isinstance(maps, tuple) and len(maps) == 5
    torch.testing.assert_close(maps[0], out)
    block.return_maps = False
    assert isinstance(block(x), torch.Tensor)


def test_alpha_zero_gives_input_exactly():
    block = CBAMResidualDynamicSA(16, alpha_init=0.0)
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(block(x), x)


def test_alpha_one_gives_attended_features():
    block = CBAMResidualDynamicSA(16, alpha_init=1.0, return_maps=True)
    x = torch.randn(2, 16, 8, 8)
    out, ca, sa, _, _ = block(x)
    torch.testing.assert_close(out, x * ca * sa)


def test_residual_off_gives_attended_features_and_has_no_alpha():
    block = CBAMResidualDynamicSA(16, residual=False, return_maps=True)
    assert block.alpha is None and "alpha" not in block.state_dict()
    x = torch.randn(2, 16, 8, 8)
    out, ca, sa, _, _ = block(x)
    torch.testing.assert_close(out, x * ca * sa)


@pytest.mark.parametrize("learnable", [False, True])
def test_alpha_is_parameter_or_buffer_under_one_key(learnable):
    block = CBAMResidualDynamicSA(8, alpha_init=0.25, learnable_alpha=learnable)
    params, buffers = dict(block.named_parameters()), dict(block.named_buffers())
    assert ("alpha" in params) is learnable and ("alpha" in buffers) is (not learnable)
    assert block.state_dict()["alpha"].item() == 0.25
    assert block.learnable_alpha is learnable


@pytest.mark.parametrize(("src_learnable", "dst_learnable"), [(False, True), (True, False), (True, True)])
def test_state_dict_round_trip_moves_alpha_between_parameter_and_buffer(src_learnable, dst_learnable):
    src = randomize(CBAMResidualDynamicSA(12, alpha_init=0.3, learnable_alpha=src_learnable))
    with torch.no_grad():
        src.alpha.fill_(0.7)
    dst = CBAMResidualDynamicSA(12, alpha_init=0.0, learnable_alpha=dst_learnable)
    dst.load_state_dict(src.state_dict())
    assert dst.alpha.item() == pytest.approx(0.7)
    assert isinstance(dst.alpha, torch.nn.Parameter) is dst_learnable
    x = torch.randn(2, 12, 6, 6)
    torch.testing.assert_close(dst(x), src(x))


def test_state_dict_keys():
    block = CBAMResidualDynamicSA(32, learnable_temperature=True)
    assert set(block.state_dict()) == {
        "alpha",
        "ca.fc1.weight", "ca.fc1.bias", "ca.fc2.weight", "ca.fc2.bias", "ca.fusion_logits",
        "ca.temperature", "ca.temperature_log_scale",
        "sa.branches.0.weight", "sa.branches.0.bias", "sa.branches.1.weight", "sa.branches.1.bias",
        "sa.branches.2.weight", "sa.branches.2.bias",
        "sa.router.0.weight", "sa.router.0.bias", "sa.router.2.weight", "sa.router.2.bias",
        "sa.temperature", "sa.temperature_log_scale",
    }  # fmt: skip


@pytest.mark.parametrize("config", CONFIGS)
def test_every_parameter_receives_a_gradient(config):
    block = randomize(CBAMResidualDynamicSA(16, **config))
    x = torch.randn(4, 16, 8, 8) + torch.linspace(-1, 1, 4).view(4, 1, 1, 1)
    (block(x) * torch.randn(4, 16, 8, 8)).sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "config",
    [{}, {"ca_fusion": "sum", "residual": False}, {"learnable_temperature": True, "learnable_alpha": True,
     "alpha_init": 0.6, "ca_act": "silu"}, {"sa_kernels": (3,), "sa_use_dilated": False}],
)  # fmt: skip
def test_gradcheck_float64(config):
    block = randomize(CBAMResidualDynamicSA(6, min_hidden=3, **config)).double()
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64, requires_grad=True)
    # fast_mode checks v^T J u for random u, v: a full Jacobian check of the block costs minutes on two cores.
    assert torch.autograd.gradcheck(block, (x,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_gradcheck_float64_wrt_parameters():
    block = randomize(CBAMResidualDynamicSA(4, learnable_temperature=True, learnable_alpha=True, alpha_init=0.5))
    block = block.double()
    x = torch.randn(2, 4, 3, 4, dtype=torch.float64)
    names, params = zip(*block.named_parameters(), strict=True)

    def fn(*values):
        return torch.func.functional_call(block, dict(zip(names, values, strict=True)), (x,))

    inputs = tuple(p.detach().clone().requires_grad_(True) for p in params)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 3, 1, 9), (2, 1, 7, 3), (1, 5, 13, 2), (3, 17, 4, 4)])
def test_odd_shapes(shape):
    block = CBAMResidualDynamicSA(shape[1], return_maps=True)
    x = torch.randn(shape)
    out, ca, sa, _, router_w = block(x)
    assert out.shape == shape and ca.shape == (shape[0], shape[1], 1, 1) and sa.shape == (shape[0], 1, *shape[2:])
    assert router_w.shape == (shape[0], 3)
    assert torch.isfinite(out).all()


def test_empty_batch_returns_empty_output():
    block = CBAMResidualDynamicSA(8, return_maps=True)
    out, ca, sa, fusion_w, router_w = block(torch.randn(0, 8, 5, 5))
    assert out.shape == (0, 8, 5, 5) and ca.shape == (0, 8, 1, 1) and sa.shape == (0, 1, 5, 5)
    assert router_w.shape == (0, 3) and fusion_w.shape == (2,)


def test_train_and_eval_modes_agree():
    block = CBAMResidualDynamicSA(16)
    x = torch.randn(2, 16, 6, 6)
    train_out = block.train()(x)
    eval_out = block.eval()(x)
    assert torch.equal(train_out, eval_out)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_input_is_never_modified(requires_grad):
    block = CBAMResidualDynamicSA(8, alpha_init=0.5)
    x = torch.randn(2, 8, 6, 6, requires_grad=requires_grad)
    before = x.detach().clone()
    version = x._version
    out = block(x)
    if requires_grad:
        out.sum().backward()
    assert torch.equal(x.detach(), before) and x._version == version


def test_channels_last_in_gives_channels_last_out():
    block = CBAMResidualDynamicSA(16)
    x = torch.randn(2, 16, 8, 8).to(memory_format=torch.channels_last)
    out = block(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, block(x.contiguous()))


def test_learnable_temperature_gives_each_part_its_own():
    block = CBAMResidualDynamicSA(8, ca_temperature=0.5, sa_temperature=3.0, learnable_temperature=True)
    assert block.ca.effective_temperature().item() == 0.5
    assert block.sa.effective_temperature().item() == 3.0
    assert block.ca.temperature_log_scale is not block.sa.temperature_log_scale


def test_children_receive_every_option():
    block = CBAMResidualDynamicSA(
        64, reduction=8, min_hidden=2, ca_fusion="sum", ca_gate="hardsigmoid", ca_temperature=0.5, ca_act="silu",
        sa_gate="hardsigmoid", sa_temperature=2.0, sa_kernels=(5,), sa_use_dilated=True, sa_dilated_kernel=3,
        sa_dilated_d=4, sa_router_hidden=5,
    )  # fmt: skip
    ca, sa = block.ca, block.sa
    assert (ca.hidden, ca.fusion, ca.gate, ca.act, ca.temperature.item()) == (8, "sum", "hardsigmoid", "silu", 0.5)
    assert (sa.kernels, sa.use_dilated, sa.dilated_kernel, sa.dilated_d) == ((5,), True, 3, 4)
    assert (sa.gate, sa.temperature.item(), sa.router_hidden) == ("hardsigmoid", 2.0, 5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_device_and_dtype_reach_every_child(dtype):
    block = CBAMResidualDynamicSA(8, learnable_alpha=True, learnable_temperature=True, device="cpu", dtype=dtype)
    assert {t.dtype for t in block.state_dict().values()} == {dtype}


def test_get_config_rebuilds_the_same_architecture():
    block = CBAMResidualDynamicSA(32, ca_fusion="sum", sa_kernels=[5, 3], alpha_init=0.2, learnable_alpha=True)
    rebuilt = CBAMResidualDynamicSA(**block.get_config())
    rebuilt.load_state_dict(block.state_dict())
    assert rebuilt.get_config() == block.get_config()
    x = torch.randn(2, 32, 5, 5)
    torch.testing.assert_close(rebuilt(x), block(x))


def test_deepcopy_keeps_behaviour():
    block = randomize(CBAMResidualDynamicSA(8, return_maps=True))
    clone = copy.deepcopy(block)
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(clone(x)[0], block(x)[0])
    clone.return_maps = False
    assert block.return_maps and block.ca.return_fusion_weights


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 3),
    channels=st.integers(1, 12),
    height=st.integers(1, 9),
    width=st.integers(1, 9),
    fusion=st.sampled_from(["sum", "softmax"]),
    ca_gate=st.sampled_from(["sigmoid", "hardsigmoid"]),
    sa_gate=st.sampled_from(["sigmoid", "hardsigmoid"]),
    act=st.sampled_from(["relu", "silu"]),
    ca_temperature=st.floats(0.2, 5.0),
    sa_temperature=st.floats(0.2, 5.0),
    learnable_temperature=st.booleans(),
    kernels=st.lists(st.sampled_from([1, 3, 5, 7]), max_size=3),
    use_dilated=st.booleans(),
    dilation=st.integers(1, 3),
    residual=st.booleans(),
    alpha=st.floats(-1.0, 2.0),
    learnable_alpha=st.booleans(),
)
def test_property_block_matches_reference_and_identity(
    batch, channels, height, width, fusion, ca_gate, sa_gate, act, ca_temperature, sa_temperature,
    learnable_temperature, kernels, use_dilated, dilation, residual, alpha, learnable_alpha,
):  # fmt: skip
    if not kernels and not use_dilated:
        use_dilated = True
    block = CBAMResidualDynamicSA(
        channels, min_hidden=2, ca_fusion=fusion, ca_gate=ca_gate, sa_gate=sa_gate, ca_act=act,
        ca_temperature=ca_temperature, sa_temperature=sa_temperature, learnable_temperature=learnable_temperature,
        sa_kernels=tuple(kernels), sa_use_dilated=use_dilated, sa_dilated_kernel=3, sa_dilated_d=dilation,
        residual=residual, alpha_init=alpha if residual else 1.0, learnable_alpha=learnable_alpha and residual,
        return_maps=True,
    )  # fmt: skip
    randomize(block)
    x = torch.randn(batch, channels, height, width, dtype=torch.float64)
    block = block.double()
    outputs = block(x)
    for got, expected in zip(outputs, reference(block, x), strict=True):
        torch.testing.assert_close(got, expected)
    out, ca, sa, _fusion_w, router_w = outputs
    effective_alpha = block.alpha if residual else 1.0
    torch.testing.assert_close(out, x + effective_alpha * (x * ca * sa - x))
    assert ((ca >= 0) & (ca <= 1)).all() and ((sa >= 0) & (sa <= 1)).all()
    assert router_w.shape == (batch, len(kernels) + use_dilated)
    torch.testing.assert_close(router_w.sum(1), torch.ones(batch, dtype=torch.float64))


@pytest.mark.parametrize("config", [{}, {"ca_fusion": "sum", "residual": False, "sa_kernels": (5,)}])
def test_gradcheck_float64_reference_path_full_jacobian(config):
    block = randomize(CBAMResidualDynamicSA(4, min_hidden=2, **config)).double()
    block.fast_path = False  # the plain path, checked with the full Jacobian (cheap here)
    x = torch.randn(2, 4, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "dilations"),
    [
        ({}, (1, 1, 2)),
        ({"use_dilated": False}, (1, 1)),
        ({"kernels": (5,), "dilated_kernel": 3, "dilated_d": 4}, (1, 4)),
    ],
)
def test_spatial_dilations_are_an_immutable_tuple_per_branch(kwargs, dilations):
    # a tuple, not a list: torch.compile's dict-tag guards (torch._dynamo.config.use_recursive_dict_tags_for_guards)
    # can then skip the whole module while its __dict__ is unchanged, as they do for the channel part
    sa = DynamicSpatialAttention(**kwargs)
    assert sa.dilations == dilations and type(sa.dilations) is tuple
    assert sa.branch_params()[2] is sa.dilations
    assert [b.dilation for b in sa.branches] == [(d, d) for d in dilations]


def test_functorch_transforms_equal_plain_autograd():
    """``torch.func`` (``vmap``, ``grad``, per-sample gradients through ``functional_call``) runs the reference math
    (``ops.runs_on`` is False for its wrapped tensors) and agrees with the block under plain autograd."""
    block = randomize(CBAMResidualDynamicSA(8, learnable_alpha=True, alpha_init=0.6))
    x = torch.randn(3, 8, 5, 6)
    torch.testing.assert_close(torch.func.vmap(block)(x[:, None])[:, 0], block(x))  # each sample a batch of one

    x_grad = x.clone().requires_grad_()
    block(x_grad).square().sum().backward()
    torch.testing.assert_close(torch.func.grad(lambda t: block(t).square().sum())(x), x_grad.grad)

    params, buffers = dict(block.named_parameters()), dict(block.named_buffers())

    def loss(p: dict, sample: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(block, (p, buffers), (sample[None],)).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for name, p in block.named_parameters():
        assert per_sample[name].shape == (3, *p.shape)
        torch.testing.assert_close(per_sample[name].sum(0), p.grad, rtol=1e-4, atol=1e-5)
