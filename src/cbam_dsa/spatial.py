"""DynamicSpatialAttention: CBAM spatial attention with several convolution branches mixed by a router.

CBAM's spatial attention (Woo et al., 2018, https://arxiv.org/abs/1807.06521, section 3.1) convolves the
channel-wise mean and max maps with one 7x7 kernel. Here K branches (kernel sizes such as 3 and 7, plus an
optional dilated kernel) convolve the same maps, and a small router mixes them per sample with softmax
weights, in the spirit of dynamic convolution (Chen et al., 2020, https://arxiv.org/abs/1912.03458).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import functional as FA
from ._checks import (
    check_bool,
    check_choice,
    check_input,
    check_int,
    check_kernel_size,
    check_kernel_sizes,
    check_temperature,
)
from ._temperature import effective_temperature, register_temperature

__all__ = ["DynamicSpatialAttention"]


class DynamicSpatialAttention(nn.Module):
    """Dynamic spatial attention.

    ``s = [mean_c(x), max_c(x)]``; branch ``k`` is ``Conv2d(2, 1, k, padding=k // 2)`` for each ``k`` in
    ``kernels``, plus with ``use_dilated`` a ``Conv2d(2, 1, dilated_kernel, dilation=dilated_d)`` with 'same'
    padding. The router (global average of ``s``, 1x1 conv ``2 -> router_hidden``, ReLU, 1x1 conv
    ``router_hidden -> K``, softmax over K) gives per-sample weights ``r``; ``logit = sum_k r_k * branch_k(s)``;
    ``sa = gate(logit / T)``; ``y = x * sa``. With a single branch there is nothing to route: no router is
    built and ``r = 1``.

    Args:
        kernels (tuple[int, ...]): odd kernel sizes of the plain branches (may be empty if ``use_dilated``).
            Default: ``(3, 7)``.
        use_dilated (bool): add the dilated branch. Default: ``True``.
        dilated_kernel (int): odd kernel size of the dilated branch. Default: ``7``.
        dilated_d (int): its dilation. Default: ``2``.
        gate (str): ``"sigmoid"`` or ``"hardsigmoid"``. Default: ``"sigmoid"``.
        temperature (float): ``T`` > 0 dividing the gate's input. Default: ``1.0``.
        learnable_temperature (bool): learn ``T`` (kept positive, starts at ``temperature``). Default: ``False``.
        router_hidden (int): hidden width of the router. Default: ``8``.
        return_router_weights (bool): also return the router weights. Default: ``False``.
        device, dtype: factory keywords for parameters and buffers.

    Returns:
        ``(y, sa)``, or ``(y, sa, router_w)`` with ``return_router_weights``.

    Shape:
        - Input: :math:`(B, C, H, W)`
        - y: :math:`(B, C, H, W)`; sa: :math:`(B, 1, H, W)`; router_w: :math:`(B, K)`,
          ``K = len(kernels) + use_dilated``

    Example:
        >>> sa = DynamicSpatialAttention()
        >>> y, sa_map, router_w = DynamicSpatialAttention(return_router_weights=True)(torch.randn(2, 64, 8, 8))
        >>> sa_map.shape, router_w.shape
        (torch.Size([2, 1, 8, 8]), torch.Size([2, 3]))
    """

    def __init__(
        self,
        kernels: Sequence[int] = (3, 7),
        use_dilated: bool = True,
        dilated_kernel: int = 7,
        dilated_d: int = 2,
        gate: str = "sigmoid",
        temperature: float = 1.0,
        learnable_temperature: bool = False,
        router_hidden: int = 8,
        return_router_weights: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kernels = check_kernel_sizes("kernels", kernels)
        use_dilated = check_bool("use_dilated", use_dilated)
        dilated_kernel = check_kernel_size("dilated_kernel", dilated_kernel)
        dilated_d = check_int("dilated_d", dilated_d)
        self.gate = check_choice("gate", gate, FA.GATES)
        temperature = check_temperature("temperature", temperature)
        learnable_temperature = check_bool("learnable_temperature", learnable_temperature)
        router_hidden = check_int("router_hidden", router_hidden)
        self.return_router_weights = check_bool("return_router_weights", return_router_weights)
        if not kernels and not use_dilated:
            raise ValueError(
                "kernels is empty and use_dilated is False: spatial attention needs at least one branch "
                "(give kernel sizes such as (3, 7), or set use_dilated=True)"
            )

        dd = {"device": device, "dtype": dtype}
        self.kernels = kernels
        self.use_dilated = use_dilated
        self.dilated_kernel = dilated_kernel
        self.dilated_d = dilated_d
        specs = [(k, 1) for k in kernels] + ([(dilated_kernel, dilated_d)] if use_dilated else [])
        self.dilations = tuple(d for _, d in specs)  # immutable: torch.compile's dict-tag guards can skip the module
        self.branches = nn.ModuleList(
            nn.Conv2d(2, 1, k, padding=FA.branch_padding(k, d), dilation=d, bias=True, **dd) for k, d in specs
        )
        self.num_branches = len(specs)
        if self.num_branches > 1:
            self.router = nn.Sequential(
                nn.Conv2d(2, router_hidden, 1, bias=True, **dd),
                nn.ReLU(),
                nn.Conv2d(router_hidden, self.num_branches, 1, bias=True, **dd),
            )
        else:
            self.router = None
        self.router_hidden = router_hidden
        register_temperature(self, temperature, learnable_temperature, device, dtype)

    def effective_temperature(self) -> Tensor:
        """The temperature dividing the gate's input (learned or fixed), as a 0-d tensor."""
        return effective_temperature(self)

    def router_params(self) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        """``(fc1_weight, fc1_bias, fc2_weight, fc2_bias)`` of the router, or ``None`` for one branch."""
        router = self.router
        if router is None:
            return None
        fc1, _, fc2 = router  # (unpacking is 2.5x faster than indexing a Sequential, per call of the block)
        return fc1.weight, fc1.bias, fc2.weight, fc2.bias

    def branch_params(self) -> tuple[list[Tensor], list[Tensor], tuple[int, ...]]:
        """``(weights, biases, dilations)`` of the K branch convolutions."""
        return [b.weight for b in self.branches], [b.bias for b in self.branches], self.dilations

    def attention_map(self, s: Tensor) -> tuple[Tensor, Tensor]:
        """The spatial map ``(B, 1, H, W)`` and router weights ``(B, K)`` from the descriptors, in their dtype."""
        return FA.spatial_attention_map(
            s, *self.branch_params(), self.router_params(), self.gate, self.effective_temperature()
        )

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        check_input(x)
        y, sa, router_w = FA.dynamic_spatial_attention(
            x, *self.branch_params(), self.router_params(), self.gate, self.effective_temperature()
        )
        if self.return_router_weights:
            return y, sa, router_w
        return y, sa

    def extra_repr(self) -> str:
        return (
            f"kernels={self.kernels}, use_dilated={self.use_dilated}, dilated_kernel={self.dilated_kernel}, "
            f"dilated_d={self.dilated_d}, gate={self.gate!r}, temperature={float(self.temperature):g}, "
            f"learnable_temperature={self.temperature_log_scale is not None}, K={self.num_branches}"
        )
