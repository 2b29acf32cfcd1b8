"""Every argument of the three modules is validated with a message naming it, the value and what is allowed."""

from __future__ import annotations

import math

import pytest
import torch

from cbam_dsa import CBAMResidualDynamicSA, ChannelAttentionFusionT, DynamicSpatialAttention

BLOCK_ERRORS = [
    # (kwargs, exception, pattern in the message)
    ({"channels": 0}, ValueError, r"channels must be an integer >= 1, but got 0"),
    ({"channels": -3}, ValueError, r"channels .* got -3"),
    ({"channels": 2.0}, TypeError, r"channels must be an integer >= 1, but got 2\.0 \(float\)"),
    ({"channels": True}, TypeError, r"channels must be an integer .* True \(bool\)"),
    ({"reduction": 0}, ValueError, r"reduction must be an integer >= 1, but got 0"),
    ({"min_hidden": 0}, ValueError, r"min_hidden must be an integer >= 1, but got 0"),
    ({"min_hidden": "4"}, TypeError, r"min_hidden must be an integer"),
    ({"ca_fusion": "mean"}, ValueError, r"ca_fusion must be one of 'sum', 'softmax', but got 'mean'"),
    ({"ca_fusion": None}, TypeError, r"ca_fusion must be one of 'sum', 'softmax', but got None"),
    ({"ca_gate": "relu"}, ValueError, r"ca_gate must be one of 'sigmoid', 'hardsigmoid', but got 'relu'"),
    ({"sa_gate": "tanh"}, ValueError, r"sa_gate must be one of 'sigmoid', 'hardsigmoid', but got 'tanh'"),
    ({"ca_act": "gelu"}, ValueError, r"ca_act must be one of 'relu', 'silu', but got 'gelu'"),
    ({"ca_temperature": 0.0}, ValueError, r"ca_temperature must be a finite number > 0, but got 0\.0"),
    ({"ca_temperature": -1.0}, ValueError, r"ca_temperature must be a finite number > 0, but got -1\.0"),
    ({"sa_temperature": math.inf}, ValueError, r"sa_temperature must be a finite number > 0, but got inf"),
    ({"sa_temperature": math.nan}, ValueError, r"sa_temperature must be a finite number > 0, but got nan"),
    ({"sa_temperature": "1"}, TypeError, r"sa_temperature must be a finite number > 0, but got '1' \(str\)"),
    ({"learnable_temperature": 1}, TypeError, r"learnable_temperature must be True or False, but got 1 \(int\)"),
    ({"sa_kernels": (3, 4)}, ValueError, r"sa_kernels must hold odd integers >= 1, but sa_kernels\[1\] is 4"),
    ({"sa_kernels": (0,)}, ValueError, r"sa_kernels\[0\] is 0"),
    ({"sa_kernels": (3.0,)}, TypeError, r"sa_kernels\[0\] is 3\.0"),
    ({"sa_kernels": 7}, TypeError, r"sa_kernels must be a tuple or list of odd integers >= 1 .* but got 7"),
    ({"sa_kernels": "37"}, TypeError, r"sa_kernels must be a tuple or list"),
    ({"sa_kernels": (), "sa_use_dilated": False}, ValueError, r"sa_kernels is empty and sa_use_dilated is False"),
    ({"sa_use_dilated": "yes"}, TypeError, r"sa_use_dilated must be True or False, but got 'yes'"),
    ({"sa_dilated_kernel": 6}, ValueError, r"sa_dilated_kernel must be an odd integer >= 1, but got 6"),
    ({"sa_dilated_kernel": -1}, ValueError, r"sa_dilated_kernel must be an odd integer >= 1, but got -1"),
    ({"sa_dilated_d": 0}, ValueError, r"sa_dilated_d must be an integer >= 1, but got 0"),
    ({"sa_router_hidden": 0}, ValueError, r"sa_router_hidden must be an integer >= 1, but got 0"),
    ({"residual": None}, TypeError, r"residual must be True or False, but got None"),
    ({"alpha_init": math.nan}, ValueError, r"alpha_init must be a finite real number, but got nan"),
    ({"alpha_init": "0.5"}, TypeError, r"alpha_init must be a finite real number, but got '0\.5'"),
    ({"learnable_alpha": 0}, TypeError, r"learnable_alpha must be True or False, but got 0"),
    ({"return_maps": "no"}, TypeError, r"return_maps must be True or False, but got 'no'"),
    ({"residual": False, "learnable_alpha": True}, ValueError, r"no effect with residual=False"),
    ({"residual": False, "alpha_init": 0.5}, ValueError, r"alpha_init=0\.5 .* no effect with residual=False"),
]


@pytest.mark.parametrize(("kwargs", "error", "pattern"), BLOCK_ERRORS)
def test_block_rejects_bad_arguments(kwargs, error, pattern):
    kwargs = {"channels": 16, **kwargs}
    with pytest.raises(error, match=pattern):
        CBAMResidualDynamicSA(**kwargs)


CHANNEL_ERRORS = [
    ({"channels": 0}, ValueError, r"channels must be an integer >= 1"),
    ({"reduction": -1}, ValueError, r"reduction must be an integer >= 1, but got -1"),
    ({"min_hidden": 1.5}, TypeError, r"min_hidden must be an integer"),
    ({"fusion": "max"}, ValueError, r"fusion must be one of 'sum', 'softmax', but got 'max'"),
    ({"gate": "Sigmoid"}, ValueError, r"gate must be one of 'sigmoid', 'hardsigmoid', but got 'Sigmoid'"),
    ({"temperature": 0}, ValueError, r"temperature must be a finite number > 0, but got 0"),
    ({"learnable_temperature": "True"}, TypeError, r"learnable_temperature must be True or False"),
    ({"act": "tanh"}, ValueError, r"act must be one of 'relu', 'silu', but got 'tanh'"),
    ({"return_fusion_weights": 1}, TypeError, r"return_fusion_weights must be True or False"),
]


@pytest.mark.parametrize(("kwargs", "error", "pattern"), CHANNEL_ERRORS)
def test_channel_attention_rejects_bad_arguments(kwargs, error, pattern):
    kwargs = {"channels": 16, **kwargs}
    with pytest.raises(error, match=pattern):
        ChannelAttentionFusionT(**kwargs)


SPATIAL_ERRORS = [
    ({"kernels": (3, 8)}, ValueError, r"kernels must hold odd integers >= 1, but kernels\[1\] is 8"),
    ({"kernels": [2]}, ValueError, r"kernels\[0\] is 2"),
    ({"kernels": None}, TypeError, r"kernels must be a tuple or list"),
    ({"kernels": (), "use_dilated": False}, ValueError, r"kernels is empty and use_dilated is False"),
    ({"dilated_kernel": 4}, ValueError, r"dilated_kernel must be an odd integer >= 1, but got 4"),
    ({"dilated_d": 0}, ValueError, r"dilated_d must be an integer >= 1, but got 0"),
    ({"gate": "softmax"}, ValueError, r"gate must be one of 'sigmoid', 'hardsigmoid'"),
    ({"temperature": -0.5}, ValueError, r"temperature must be a finite number > 0, but got -0\.5"),
    ({"router_hidden": 0}, ValueError, r"router_hidden must be an integer >= 1, but got 0"),
    ({"use_dilated": 1}, TypeError, r"use_dilated must be True or False"),
    ({"return_router_weights": None}, TypeError, r"return_router_weights must be True or False"),
]


@pytest.mark.parametrize(("kwargs", "error", "pattern"), SPATIAL_ERRORS)
def test_spatial_attention_rejects_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        DynamicSpatialAttention(**kwargs)


@pytest.mark.parametrize(
    ("x", "error", "pattern"),
    [
        (torch.randn(2, 8, 5), ValueError, r"x must have shape \(B, 8, H, W\), but got shape \(2, 8, 5\) \(3-D\)"),
        (torch.randn(1, 2, 8, 5, 5), ValueError, r"but got shape \(1, 2, 8, 5, 5\) \(5-D\)"),
        (torch.randn(2, 7, 5, 5), ValueError, r"x must have shape \(B, 8, H, W\), but got shape \(2, 7, 5, 5\)"),
        (torch.ones(2, 8, 5, 5, dtype=torch.int64), TypeError, r"x must be a floating-point tensor, .* torch\.int64"),
        (torch.randn(2, 8, 0, 5), ValueError, r"x must have H >= 1 and W >= 1, but got shape \(2, 8, 0, 5\)"),
        ([[1.0]], TypeError, r"x must be a torch\.Tensor of shape \(B, C, H, W\), but got list"),
    ],
)
@pytest.mark.parametrize("module", ["block", "channel"])
def test_bad_inputs_are_refused_with_expected_and_actual_shape(module, x, error, pattern):
    layer = CBAMResidualDynamicSA(8) if module == "block" else ChannelAttentionFusionT(8)
    with pytest.raises(error, match=pattern):
        layer(x)


def test_spatial_attention_accepts_any_channel_count_but_not_3d():
    sa = DynamicSpatialAttention()
    for c in (1, 3, 17):
        assert sa(torch.randn(2, c, 6, 6))[0].shape == (2, c, 6, 6)
    with pytest.raises(ValueError, match=r"x must have shape \(B, C, H, W\)"):
        sa(torch.randn(3, 6, 6))


def test_return_maps_setter_is_validated():
    block = CBAMResidualDynamicSA(8)
    with pytest.raises(TypeError, match="return_maps must be True or False"):
        block.return_maps = "yes"
