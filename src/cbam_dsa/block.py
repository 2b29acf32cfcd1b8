"""CBAMResidualDynamicSA: channel attention, then dynamic spatial attention, then a residual blend."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import functional as FA
from . import ops
from ._checks import (
    check_bool,
    check_choice,
    check_finite,
    check_input,
    check_int,
    check_kernel_size,
    check_kernel_sizes,
    check_temperature,
)
from .channel import ChannelAttentionFusionT
from .spatial import DynamicSpatialAttention

__all__ = ["CBAMResidualDynamicSA"]


class CBAMResidualDynamicSA(nn.Module):
    """CBAM with fused channel attention, dynamic spatial attention and a residual blend.

    ``y = sa(ca(x))``; ``out = x + alpha * (y - x)`` with ``residual``, else ``out = y``. ``alpha`` is a
    learned parameter with ``learnable_alpha``, else a buffer; its state_dict key is ``alpha`` either way.

    Args:
        channels (int): number of input channels ``C``.
        reduction (int): channel MLP reduction ratio. Default: ``16``.
        min_hidden (int): lower bound of the channel MLP's hidden width. Default: ``4``.
        ca_fusion (str): ``"sum"`` or ``"softmax"`` fusion of the avg and max descriptors. Default: ``"softmax"``.
        ca_gate (str): channel gate, ``"sigmoid"`` or ``"hardsigmoid"``. Default: ``"sigmoid"``.
        ca_temperature (float): channel gate temperature, > 0. Default: ``1.0``.
        ca_act (str): channel MLP activation, ``"relu"`` or ``"silu"``. Default: ``"relu"``.
        sa_gate (str): spatial gate, ``"sigmoid"`` or ``"hardsigmoid"``. Default: ``"sigmoid"``.
        sa_temperature (float): spatial gate temperature, > 0. Default: ``1.0``.
        learnable_temperature (bool): learn both temperatures (each part its own). Default: ``False``.
        sa_kernels (tuple[int, ...]): odd kernel sizes of the plain spatial branches. Default: ``(3, 7)``.
        sa_use_dilated (bool): add a dilated spatial branch. Default: ``True``.
        sa_dilated_kernel (int): odd kernel size of the dilated branch. Default: ``7``.
        sa_dilated_d (int): dilation of the dilated branch. Default: ``2``.
        sa_router_hidden (int): hidden width of the spatial router. Default: ``8``.
        residual (bool): blend the attended features with the input. Default: ``True``.
        alpha_init (float): initial blend weight (0 keeps ``x``, 1 gives the attended features). Default: ``1.0``.
        learnable_alpha (bool): learn ``alpha``. Default: ``False``.
        return_maps (bool): also return ``(ca, sa, fusion_w, router_w)``. Default: ``False``.
        device, dtype: factory keywords for parameters and buffers.

    Returns:
        ``out``, or ``(out, ca, sa, fusion_w, router_w)`` with ``return_maps``.

    Shape:
        - Input: :math:`(B, C, H, W)`
        - out: :math:`(B, C, H, W)`; ca: :math:`(B, C, 1, 1)`; sa: :math:`(B, 1, H, W)`;
          fusion_w: :math:`(2,)`; router_w: :math:`(B, K)` with ``K = len(sa_kernels) + sa_use_dilated``

    Example:
        >>> block = CBAMResidualDynamicSA(64)
        >>> block(torch.randn(2, 64, 32, 32)).shape
        torch.Size([2, 64, 32, 32])
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        min_hidden: int = 4,
        ca_fusion: str = "softmax",
        ca_gate: str = "sigmoid",
        ca_temperature: float = 1.0,
        ca_act: str = "relu",
        sa_gate: str = "sigmoid",
        sa_temperature: float = 1.0,
        learnable_temperature: bool = False,
        sa_kernels: Sequence[int] = (3, 7),
        sa_use_dilated: bool = True,
        sa_dilated_kernel: int = 7,
        sa_dilated_d: int = 2,
        sa_router_hidden: int = 8,
        residual: bool = True,
        alpha_init: float = 1.0,
        learnable_alpha: bool = False,
        return_maps: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        # Validate every argument under the name the caller used, before any child is built.
        check_int("channels", channels)
        check_int("reduction", reduction)
        check_int("min_hidden", min_hidden)
        check_choice("ca_fusion", ca_fusion, FA.FUSIONS)
        check_choice("ca_gate", ca_gate, FA.GATES)
        check_temperature("ca_temperature", ca_temperature)
        check_choice("ca_act", ca_act, FA.ACTIVATIONS)
        check_choice("sa_gate", sa_gate, FA.GATES)
        check_temperature("sa_temperature", sa_temperature)
        check_bool("learnable_temperature", learnable_temperature)
        sa_kernels = check_kernel_sizes("sa_kernels", sa_kernels)
        check_bool("sa_use_dilated", sa_use_dilated)
        check_kernel_size("sa_dilated_kernel", sa_dilated_kernel)
        check_int("sa_dilated_d", sa_dilated_d)
        check_int("sa_router_hidden", sa_router_hidden)
        self.residual = check_bool("residual", residual)
        alpha_init = check_finite("alpha_init", alpha_init)
        learnable_alpha = check_bool("learnable_alpha", learnable_alpha)
        return_maps = check_bool("return_maps", return_maps)
        if not sa_kernels and not sa_use_dilated:
            raise ValueError(
                "sa_kernels is empty and sa_use_dilated is False: spatial attention needs at least one branch "
                "(give kernel sizes such as (3, 7), or set sa_use_dilated=True)"
            )
        if not residual and (learnable_alpha or alpha_init != 1.0):
            raise ValueError(
                f"alpha_init={alpha_init!r} and learnable_alpha={learnable_alpha!r} have no effect with "
                "residual=False (out = y): leave them at 1.0 and False, or set residual=True"
            )

        self._config = {
            "channels": int(channels),
            "reduction": int(reduction),
            "min_hidden": int(min_hidden),
            "ca_fusion": ca_fusion,
            "ca_gate": ca_gate,
            "ca_temperature": float(ca_temperature),
            "ca_act": ca_act,
            "sa_gate": sa_gate,
            "sa_temperature": float(sa_temperature),
            "learnable_temperature": learnable_temperature,
            "sa_kernels": list(sa_kernels),
            "sa_use_dilated": sa_use_dilated,
            "sa_dilated_kernel": int(sa_dilated_kernel),
            "sa_dilated_d": int(sa_dilated_d),
            "sa_router_hidden": int(sa_router_hidden),
            "residual": residual,
            "alpha_init": alpha_init,
            "learnable_alpha": learnable_alpha,
        }
        dd = {"device": device, "dtype": dtype}
        self.channels = channels
        self.ca = ChannelAttentionFusionT(
            channels,
            reduction=reduction,
            min_hidden=min_hidden,
            fusion=ca_fusion,
            gate=ca_gate,
            temperature=ca_temperature,
            learnable_temperature=learnable_temperature,
            act=ca_act,
            return_fusion_weights=return_maps,
            **dd,
        )
        self.sa = DynamicSpatialAttention(
            kernels=sa_kernels,
            use_dilated=sa_use_dilated,
            dilated_kernel=sa_dilated_kernel,
            dilated_d=sa_dilated_d,
            gate=sa_gate,
            temperature=sa_temperature,
            learnable_temperature=learnable_temperature,
            router_hidden=sa_router_hidden,
            return_router_weights=return_maps,
            **dd,
        )
        self._return_maps = return_maps
        if residual:
            alpha = torch.tensor(alpha_init, **dd)
            if learnable_alpha:
                self.alpha = nn.Parameter(alpha)
            else:
                self.register_buffer("alpha", alpha)
        else:
            self.register_buffer("alpha", None)

    @property
    def return_maps(self) -> bool:
        """Whether ``forward`` also returns ``(ca, sa, fusion_w, router_w)``; settable after construction."""
        return self._return_maps

    @return_maps.setter
    def return_maps(self, value: bool) -> None:
        value = check_bool("return_maps", value)
        self._return_maps = value
        self.ca.return_fusion_weights = value
        self.sa.return_router_weights = value

    def get_config(self) -> dict:
        """The constructor arguments (JSON-serialisable, ``return_maps`` excluded): ``type(b)(**b.get_config())``
        rebuilds the same architecture."""
        config = dict(self._config)
        config["sa_kernels"] = list(config["sa_kernels"])
        return config

    @property
    def learnable_alpha(self) -> bool:
        """Whether ``alpha`` is a learned parameter."""
        return isinstance(self.alpha, nn.Parameter)

    fast_path: bool = True
    """Run the fused operator (``torch.ops.cbam_dsa``) where it can run (:func:`.ops.runs_on`); ``False`` forces the
    reference path of :mod:`.functional` (a plain attribute, not in the state_dict; set it on one block, or on the
    class for every block). Both give the same outputs and gradients (tested)."""

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        check_input(x, self.channels)
        part, spatial = self.ca, self.sa
        mlp = part.mlp_params()
        # a parameter, for its device and dtype, which ops.runs_on reads for an FX Proxy only: a real one there (``mlp``
        # holds Proxies under FX), elsewhere the first MLP weight, with no walk of the submodules (each a guard under
        # torch.compile, checked at every call of the graph)
        proxy = not torch.compiler.is_compiling() and isinstance(x, torch.fx.Proxy)
        probe = next(self.parameters()) if proxy else mlp[0]
        if not (self.fast_path and ops.runs_on(x, probe)):
            return self._reference_forward(x)
        weights, biases, dilations = spatial.branch_params()
        outs = ops.fused_block(
            x, mlp, part.fusion_logits, part.effective_temperature(), spatial.effective_temperature(),
            self.alpha, spatial.router_params(), weights, biases,
            ops.BlockSpec(dilations, part.act, part.gate, spatial.gate),
        )  # fmt: skip
        return outs if self._return_maps else outs[0]

    def _reference_forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The reference path: the parts' forward passes and the blend of ``functional.py``, plain autograd."""
        ca_out = self.ca(x)
        sa_out = self.sa(ca_out[0])
        y = sa_out[0]
        out = y if self.alpha is None else FA.residual_blend(x, y, self.alpha)
        if self._return_maps:
            return out, ca_out[1], sa_out[1], ca_out[2], sa_out[2]
        return out

    def extra_repr(self) -> str:
        alpha = "none" if self.alpha is None else f"{float(self.alpha.detach()):g}"
        return (
            f"channels={self.channels}, residual={self.residual}, alpha={alpha}, learnable_alpha={self.learnable_alpha}"
        )
