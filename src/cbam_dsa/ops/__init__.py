"""The fused block as PyTorch operators (``torch.ops.cbam_dsa``), one implementation per device.

* :mod:`.library`: the two operators' schemas, argument checks and fake kernels; :mod:`.autograd`: their autograd;
* :mod:`.cpu`: the C kernels (built on first use) and, without a C compiler, :mod:`.pytorch`;
* :mod:`.cuda`: the Triton kernels, opt-in (:func:`use_triton`, or ``CBAM_DSA_TRITON=1`` in the environment) until
  they have passed the correctness check on a real GPU and measured faster than the reference there.

:func:`fused_block` is the block's one call into them; :func:`runs_on` says where they run. Everywhere else
(TorchScript, ONNX export, ``torch.export``, functorch transforms, devices without an implementation) the block runs
the reference math of :mod:`..functional`, which exports as standard operators.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import autograd, cpu, library  # noqa: F401 (autograd: registers the autograd kernel)
from .library import BACKWARD, FORWARD

__all__ = ["BACKWARD", "FORWARD", "BlockSpec", "fused_block", "runs_on", "use_triton"]

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_ = cpu  # registers the CPU implementation


def use_triton() -> bool:
    """Register the Triton kernels as the operators' CUDA implementation, where triton can launch them
    (:func:`.cuda.available`); returns whether they are registered. Until then CUDA tensors run the reference path.

    Opt-in: the kernels are tested under Triton's interpreter, and become the default once they have passed the
    correctness check on a real GPU and measured faster than the reference there (``benchmarks/gpu.sh``).
    """
    from . import cuda

    if "cuda" in library.devices():
        return True
    if not cuda.available():
        return False
    from .cuda import impl

    library.implement("cuda", impl.block_forward, impl.block_backward, impl.saved_like)
    return True


if os.environ.get("CBAM_DSA_TRITON") == "1":
    use_triton()


class BlockSpec(NamedTuple):
    """The block's static choices: the spatial branches' dilations, the channel MLP's activation, and both gates."""

    dilations: tuple[int, ...]
    act: str
    ca_gate: str
    sa_gate: str


def runs_on(x: Tensor | torch.fx.Proxy, parameter: Tensor) -> bool:
    """Whether :func:`fused_block` runs on ``x``, for a block whose parameters are on ``parameter``'s device.

    ``False`` under TorchScript (scripting and tracing), ONNX export and ``torch.export`` (they keep the reference
    math, which exports as standard operators), under functorch transforms, for tensor subclasses, for empty inputs,
    and for devices or dtypes without an implementation. FX tracing (a :class:`torch.fx.Proxy` input) records the
    operator.
    """
    if torch.compiler.is_compiling():  # torch.compile or torch.export (TorchScript and FX never set it)
        # the checks that cannot hold while compiling are left out: each global a check reads becomes a guard,
        # evaluated at every call of the compiled graph
        return not torch.compiler.is_exporting() and _supported(x)
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    if isinstance(x, torch.fx.Proxy):
        return parameter.device.type in library.devices() and parameter.dtype in _DTYPES
    if type(x) is not torch.Tensor and type(x) is not torch.nn.Parameter:
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        return False
    return _supported(x)


def _supported(x: Tensor) -> bool:
    return x.device.type in library.devices() and x.dtype in _DTYPES and x.numel() > 0


def fused_block(
    x: Tensor,
    mlp: Sequence[Tensor],
    fusion_logits: Tensor | None,
    ca_temperature: Tensor,
    sa_temperature: Tensor,
    alpha: Tensor | None,
    router: Sequence[Tensor] | None,
    branch_weights: Sequence[Tensor],
    branch_biases: Sequence[Tensor],
    spec: BlockSpec,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The block by ``cbam_dsa::block_forward``: ``(out, ca, sa, fusion_w, router_w)``, equal to
    :func:`..functional.cbam_residual_dynamic_sa` (outputs and gradients).

    Args:
        x (Tensor): input features.
        mlp (tuple): ``(fc1_weight, fc1_bias, fc2_weight, fc2_bias)`` of the channel MLP.
        fusion_logits (Tensor, optional): ``(2,)`` logits for softmax fusion; ``None`` for sum fusion.
        ca_temperature, sa_temperature (Tensor): the effective temperatures (0-d).
        alpha (Tensor, optional): the blend weight (0-d); ``None`` means no residual.
        router (tuple, optional): ``(fc1_weight, fc1_bias, fc2_weight, fc2_bias)`` of the router; ``None`` with one
            branch.
        branch_weights, branch_biases (list[Tensor]): the K branch convolutions.
        spec (BlockSpec): dilations, activation and gates.

    Shape:
        - x: :math:`(B, C, H, W)`
        - out: :math:`(B, C, H, W)`; ca: :math:`(B, C, 1, 1)`; sa: :math:`(B, 1, H, W)`;
          fusion_w: :math:`(2,)`; router_w: :math:`(B, K)`
    """
    router = (None, None, None, None) if router is None else router
    out, ca, sa, fusion_w, router_w = FORWARD(
        x, *mlp, fusion_logits, ca_temperature, sa_temperature, alpha, *router, list(branch_weights),
        list(branch_biases), list(spec.dilations), spec.act, spec.ca_gate, spec.sa_gate,
    )[:5]  # fmt: skip
    return out, ca, sa, fusion_w, router_w
