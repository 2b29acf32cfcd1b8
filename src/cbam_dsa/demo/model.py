"""The demo's small ResNet-style CNN, with an attention layer after each stage's residual branch.

The attention sits where CBAM puts it in a ResNet (Woo et al., 2018, https://arxiv.org/abs/1807.06521, figure 3):
on the residual branch, before the addition of the shortcut. Variants:

* ``none``: no attention (identity).
* ``cbam``: classic CBAM, as :class:`~cbam_dsa.CBAMResidualDynamicSA` in its CBAM configuration: sum fusion of
  the avg and max descriptors, one 7x7 spatial branch (no dilated branch, so no router), sigmoid gates, ``T = 1``,
  no residual blend. It differs from timm's ``CbamModule`` only in that the MLP and the 7x7 convolution carry
  biases where timm uses a bias-free MLP and a BatchNorm after the 7x7 convolution.
* ``dsa``: :class:`~cbam_dsa.CBAMResidualDynamicSA` with its defaults.
* ``dsa-learnable-alpha``: the same with ``learnable_alpha=True``.
* ``dsa-zero-start``: the same with ``alpha_init=0.0, learnable_alpha=True``: the block starts as the identity
  (``out = x``) and learns how much attention to blend in, as ReZero (Bachlechner et al., 2020,
  https://arxiv.org/abs/2003.04887) does for residual branches.

Every variant has the same backbone, so the comparison isolates the attention layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_int
from ..block import CBAMResidualDynamicSA

__all__ = ["VARIANTS", "DemoNet", "ResidualStage", "attention_kwargs", "build_model", "make_attention"]

VARIANTS = ("none", "cbam", "dsa", "dsa-learnable-alpha", "dsa-zero-start")

_CBAM_CONFIGURATION: dict[str, Any] = {
    "ca_fusion": "sum",
    "ca_gate": "sigmoid",
    "ca_temperature": 1.0,
    "sa_gate": "sigmoid",
    "sa_temperature": 1.0,
    "sa_kernels": (7,),
    "sa_use_dilated": False,
    "residual": False,
}


def attention_kwargs(variant: str, overrides: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The block's keyword arguments for ``variant`` (``None`` for ``"none"``).

    Args:
        variant (str): one of :data:`VARIANTS`.
        overrides (dict, optional): keyword arguments applied on top, to the ``dsa`` variants only (the ``cbam``
            configuration is fixed, so it stays classic CBAM; ``dsa-zero-start`` always starts at ``alpha = 0``
            and learns it, so an ``alpha_init`` or ``learnable_alpha`` override does not reach it).
    """
    check_choice("variant", variant, VARIANTS)
    if variant == "none":
        return None
    if variant == "cbam":
        return dict(_CBAM_CONFIGURATION)
    kwargs = dict(overrides or {})
    if variant == "dsa-learnable-alpha":
        kwargs["learnable_alpha"] = True
    if variant == "dsa-zero-start":
        kwargs.update(alpha_init=0.0, learnable_alpha=True)
    return kwargs


def make_attention(channels: int, variant: str, overrides: dict[str, Any] | None = None) -> nn.Module:
    """The attention layer of ``variant`` for ``channels`` channels (``nn.Identity`` for ``"none"``)."""
    kwargs = attention_kwargs(variant, overrides)
    return nn.Identity() if kwargs is None else CBAMResidualDynamicSA(channels, **kwargs)


class ResidualStage(nn.Module):
    """One basic residual block: ``relu(shortcut(x) + attention(bn(conv(relu(bn(conv(x)))))))``.

    Args:
        in_channels (int): input channels.
        out_channels (int): output channels.
        stride (int): stride of the first convolution and of the shortcut.
        attention (nn.Module): applied to the residual branch before the addition.

    Shape:
        - Input: :math:`(B, C_{in}, H, W)`
        - Output: :math:`(B, C_{out}, \\lceil H / s \\rceil, \\lceil W / s \\rceil)`
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, attention: nn.Module) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.attention = attention
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        else:
            self.shortcut = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        branch = self.act(self.bn1(self.conv1(x)))
        branch = self.attention(self.bn2(self.conv2(branch)))
        return self.act(self.shortcut(x) + branch)


class DemoNet(nn.Module):
    """A small ResNet-style classifier: a stride-2 stem, one residual stage per width, average pooling, a linear head.

    The first stage keeps the stem's resolution and every later stage halves it, so a 64x64 input gives attention
    maps of 32x32, 16x16 and 8x8 with the default widths. Under the same seed the backbone's initial weights are
    the same in every variant.

    Args:
        variant (str): attention variant, one of :data:`VARIANTS`. Default: ``"dsa"``.
        num_classes (int): number of classes. Default: ``10``.
        in_channels (int): image channels. Default: ``1``.
        widths (Sequence[int]): channels of each stage. Default: ``(16, 32, 64)``.
        attention (dict, optional): extra block arguments for the ``dsa`` variants (for example
            ``{"alpha_init": 0.5}``). Default: ``None``.

    Shape:
        - Input: :math:`(B, C_{in}, H, W)`
        - Output: :math:`(B, num\\_classes)` logits.

    Example:
        >>> DemoNet("dsa")(torch.randn(2, 1, 64, 64)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        variant: str = "dsa",
        num_classes: int = 10,
        in_channels: int = 1,
        widths: Sequence[int] = (16, 32, 64),
        attention: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_choice("variant", variant, VARIANTS)
        check_int("num_classes", num_classes, minimum=2)
        check_int("in_channels", in_channels)
        widths = [check_int(f"widths[{i}]", w) for i, w in enumerate(widths)]
        if not widths:
            raise ValueError("widths must hold at least one stage width, but got an empty sequence")
        self._config = {
            "variant": variant,
            "num_classes": int(num_classes),
            "in_channels": int(in_channels),
            "widths": list(widths),
            "attention": dict(attention or {}),
        }
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        stages, previous = [], widths[0]
        for i, width in enumerate(widths):
            # The attention layer draws its initial weights from a forked generator, so the backbone starts from
            # the same weights in every variant under the same seed.
            with torch.random.fork_rng(devices=[]):
                layer = make_attention(width, variant, attention)
            stages.append(ResidualStage(previous, width, stride=1 if i == 0 else 2, attention=layer))
            previous = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(previous, num_classes)

    def get_config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments: ``DemoNet(**net.get_config())`` rebuilds the architecture."""
        config = dict(self._config)
        config["widths"] = list(config["widths"])
        config["attention"] = dict(config["attention"])
        return config

    def forward(self, x: Tensor) -> Tensor:
        features = self.stages(self.stem(x))
        return self.head(torch.flatten(features.mean(dim=(2, 3)), 1))


def build_model(config: dict[str, Any]) -> DemoNet:
    """Rebuild a :class:`DemoNet` from :meth:`DemoNet.get_config` output (for example, a checkpoint's config)."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict from DemoNet.get_config(), but got {type(config).__name__}")
    return DemoNet(**config)
