"""ChannelAttentionFusionT: CBAM channel attention with a learned avg/max fusion and a gate temperature.

After CBAM (Woo et al., 2018, https://arxiv.org/abs/1807.06521), section 3.1: average- and max-pooled channel
descriptors share one MLP. Here their outputs are fused by a plain sum (CBAM) or by a learned two-way softmax,
and the gate's input is divided by a temperature.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import functional as FA
from ._checks import check_bool, check_choice, check_input, check_int, check_temperature
from ._temperature import effective_temperature, register_temperature

__all__ = ["ChannelAttentionFusionT"]


class ChannelAttentionFusionT(nn.Module):
    """Channel attention with avg/max fusion and a temperature-scaled gate.

    ``hidden = max(min_hidden, channels // reduction)``; ``a = mlp(mean_hw(x))``, ``m = mlp(max_hw(x))``;
    ``z = a + m`` (``fusion="sum"``) or ``z = w0 * a + w1 * m`` with ``w = softmax(logits)``
    (``fusion="softmax"``, logits start at zero so ``w = [0.5, 0.5]``); ``ca = gate(z / T)``; ``y = x * ca``.

    Args:
        channels (int): number of input channels ``C``.
        reduction (int): MLP reduction ratio. Default: ``16``.
        min_hidden (int): lower bound of the MLP's hidden width. Default: ``4``.
        fusion (str): ``"sum"`` or ``"softmax"``. Default: ``"softmax"``.
        gate (str): ``"sigmoid"`` or ``"hardsigmoid"``. Default: ``"sigmoid"``.
        temperature (float): ``T`` > 0 dividing the gate's input; below 1 sharpens. Default: ``1.0``.
        learnable_temperature (bool): learn ``T`` (kept positive, starts at ``temperature``). Default: ``False``.
        act (str): MLP activation, ``"relu"`` or ``"silu"``. Default: ``"relu"``.
        return_fusion_weights (bool): also return the fusion weights. Default: ``False``.
        device, dtype: factory keywords for parameters and buffers.

    Returns:
        ``(y, ca)``, or ``(y, ca, fusion_w)`` with ``return_fusion_weights``. ``fusion_w`` is ``[1., 1.]``
        for sum fusion.

    Shape:
        - Input: :math:`(B, C, H, W)`
        - y: :math:`(B, C, H, W)`; ca: :math:`(B, C, 1, 1)`; fusion_w: :math:`(2,)`

    Example:
        >>> ca = ChannelAttentionFusionT(64)
        >>> y, ca_map = ca(torch.randn(2, 64, 8, 8))
        >>> y.shape, ca_map.shape
        (torch.Size([2, 64, 8, 8]), torch.Size([2, 64, 1, 1]))
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        min_hidden: int = 4,
        fusion: str = "softmax",
        gate: str = "sigmoid",
        temperature: float = 1.0,
        learnable_temperature: bool = False,
        act: str = "relu",
        return_fusion_weights: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        channels = check_int("channels", channels)
        reduction = check_int("reduction", reduction)
        min_hidden = check_int("min_hidden", min_hidden)
        self.fusion = check_choice("fusion", fusion, FA.FUSIONS)
        self.gate = check_choice("gate", gate, FA.GATES)
        temperature = check_temperature("temperature", temperature)
        learnable_temperature = check_bool("learnable_temperature", learnable_temperature)
        self.act = check_choice("act", act, FA.ACTIVATIONS)
        self.return_fusion_weights = check_bool("return_fusion_weights", return_fusion_weights)

        dd = {"device": device, "dtype": dtype}
        self.channels = channels
        self.hidden = max(min_hidden, channels // reduction)
        self.fc1 = nn.Conv2d(channels, self.hidden, 1, bias=True, **dd)
        self.fc2 = nn.Conv2d(self.hidden, channels, 1, bias=True, **dd)
        logits = nn.Parameter(torch.zeros(2, **dd)) if self.fusion == "softmax" else None
        self.register_parameter("fusion_logits", logits)
        register_temperature(self, temperature, learnable_temperature, device, dtype)

    def effective_temperature(self) -> Tensor:
        """The temperature dividing the gate's input (learned or fixed), as a 0-d tensor."""
        return effective_temperature(self)

    def mlp_params(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(fc1_weight, fc1_bias, fc2_weight, fc2_bias)`` of the shared MLP."""
        return self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias

    def attention_map(self, avg: Tensor, mx: Tensor) -> tuple[Tensor, Tensor]:
        """The channel map and fusion weights from pooled descriptors ``(B, C, 1, 1)``, in their dtype."""
        return FA.channel_attention_map(
            avg, mx, *self.mlp_params(), self.fusion_logits, self.act, self.gate, self.effective_temperature()
        )

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        check_input(x, self.channels)
        y, ca, fusion_w = FA.channel_attention(
            x, *self.mlp_params(), self.fusion_logits, self.act, self.gate, self.effective_temperature()
        )
        if self.return_fusion_weights:
            return y, ca, fusion_w
        return y, ca

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, hidden={self.hidden}, fusion={self.fusion!r}, gate={self.gate!r}, "
            f"act={self.act!r}, temperature={float(self.temperature):g}, "
            f"learnable_temperature={self.temperature_log_scale is not None}"
        )
