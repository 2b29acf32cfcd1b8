"""torchvision integration: insert the block into torchvision ResNets where CBAM goes.

CBAM (Woo et al., 2018, https://arxiv.org/abs/1807.06521, figure 3) sits on the residual branch of each block,
after its last BatchNorm and before the addition of the shortcut. :func:`add_attention` puts a
:class:`~cbam_dsa.CBAMResidualDynamicSA` there in every ``BasicBlock`` and ``Bottleneck``:

* each block becomes an instance of a subclass (:class:`AttentionBasicBlock`, :class:`AttentionBottleneck`)
  whose ``forward`` is torchvision's with the attention call added, and gains one child, ``attention``;
* nothing else changes: every existing parameter and buffer keeps its tensor and its state_dict key, so a
  torchvision checkpoint still loads, the ``attention.*`` keys being the only additions.

The subclasses are ordinary module-level classes (built on first use, so that importing this module does not
import torchvision), hence the model survives ``copy.deepcopy``, pickling, ``torch.jit.trace`` and
``torch.compile``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from ..block import CBAMResidualDynamicSA
from ._common import check_block_kwargs

# AttentionBasicBlock and AttentionBottleneck are served by __getattr__ (built on first use).
__all__ = ["ATTENTION_NAME", "add_attention"]

#: The name of the block inside each residual block (state_dict keys ``layer1.0.attention.*``).
ATTENTION_NAME = "attention"

_CLASSES: dict[type, type] = {}  # torchvision block type -> its subclass with attention


def _basic_block_forward(self: nn.Module, x: Tensor) -> Tensor:
    """torchvision's ``BasicBlock.forward`` with the attention after ``bn2``, before the shortcut is added.

    Shape:
        - x: :math:`(B, C_{in}, H, W)`
        - Output: :math:`(B, C_{out}, H / s, W / s)`
    """
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.attention(self.bn2(self.conv2(out)))
    if self.downsample is not None:
        identity = self.downsample(x)
    return self.relu(out + identity)


def _bottleneck_forward(self: nn.Module, x: Tensor) -> Tensor:
    """torchvision's ``Bottleneck.forward`` with the attention after ``bn3``, before the shortcut is added.

    Shape:
        - x: :math:`(B, C_{in}, H, W)`
        - Output: :math:`(B, C_{out}, H / s, W / s)`
    """
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.attention(self.bn3(self.conv3(out)))
    if self.downsample is not None:
        identity = self.downsample(x)
    return self.relu(out + identity)


def _attention_classes() -> dict[type, type]:
    """torchvision's ``BasicBlock``/``Bottleneck`` -> their subclasses with attention, built on first use."""
    if not _CLASSES:
        try:
            from torchvision.models.resnet import BasicBlock, Bottleneck
        except ImportError as error:  # pragma: no cover - torchvision is a declared extra
            raise ImportError("add_attention needs torchvision: pip install 'cbam-dsa[timm]'") from error
        for base, name, forward in (
            (BasicBlock, "AttentionBasicBlock", _basic_block_forward),
            (Bottleneck, "AttentionBottleneck", _bottleneck_forward),
        ):
            doc = f"torchvision's ``{base.__name__}`` with ``CBAMResidualDynamicSA`` (``attention``) before the add."
            cls = type(name, (base,), {"forward": forward, "__doc__": doc, "__module__": __name__})
            _CLASSES[base] = cls
    return _CLASSES


def __getattr__(name: str) -> type:
    # The subclasses are found by name (pickle looks them up here) without importing torchvision at import time.
    if name in ("AttentionBasicBlock", "AttentionBottleneck"):
        return next(cls for cls in _attention_classes().values() if cls.__name__ == name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _last_norm(block: nn.Module) -> nn.Module:
    return block.bn3 if hasattr(block, "conv3") else block.bn2


def _factory_keywords(norm: nn.Module) -> dict[str, Any]:
    reference = next(iter(norm.parameters()), None)
    if reference is None:
        reference = next(iter(norm.buffers()), torch.empty(0))
    return {"device": reference.device, "dtype": reference.dtype}


def add_attention(model: nn.Module, **block_kwargs: Any) -> nn.Module:
    """Insert a :class:`~cbam_dsa.CBAMResidualDynamicSA` into every ResNet block of a torchvision model.

    In each ``BasicBlock`` (after ``bn2``) and ``Bottleneck`` (after ``bn3``), on the residual branch before the
    shortcut is added, with the channels of that norm, on its device and in its dtype and training mode. The
    model is changed in place and returned; every existing weight is left untouched and keeps its state_dict
    key. With ``alpha_init=0`` the blocks start as the identity, so the model computes exactly what it did.

    Args:
        model (nn.Module): a torchvision ResNet (``resnet18`` ... ``resnet152``, ``resnext*``,
            ``wide_resnet*``), or any module containing torchvision ``BasicBlock``/``Bottleneck`` layers.
        **block_kwargs: options of the block (all but ``channels``, ``device``, ``dtype``; ``return_maps=True``
            is refused, use :class:`~cbam_dsa.MapRecorder`). ``**cbam_config()`` gives classic CBAM.

    Returns:
        nn.Module: ``model``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; an unknown or host-given block option.
        ValueError: no torchvision ResNet block in ``model``; attention already added; a subclass of
            ``BasicBlock``/``Bottleneck`` with its own ``forward``; a block option's value is refused.
            On error the model is left unchanged.

    Example:
        >>> model = add_attention(torchvision.models.resnet50(), alpha_init=0.0, learnable_alpha=True)
        >>> model.layer1[0].attention.channels
        256
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a torchvision ResNet), but got {type(model).__name__}")
    check_block_kwargs(block_kwargs)  # every option, before the model is touched
    make_block = functools.partial(CBAMResidualDynamicSA, **block_kwargs)
    classes = _attention_classes()
    attention_types = tuple(classes.values())
    bases = tuple(classes)

    targets = []
    for name, module in model.named_modules():
        where = name or "model"
        if isinstance(module, attention_types):
            raise ValueError(f"{where} already has attention (add_attention was called on this model before)")
        if type(module) in classes:
            targets.append(module)
        elif isinstance(module, bases):
            raise ValueError(
                f"{where} is a {type(module).__name__}, a subclass of torchvision's ResNet blocks with its own "
                "forward; add_attention handles BasicBlock and Bottleneck themselves"
            )
    if not targets:
        hint = ""
        if type(model).__module__.startswith("timm."):
            hint = "; for a timm model, give the block to timm: create_model(name, block_args=dict(attn_layer=...))"
        raise ValueError(
            f"model ({type(model).__name__}) holds no torchvision ResNet BasicBlock or Bottleneck, so there is "
            f"nowhere to add attention{hint}"
        )

    blocks = []
    for module in targets:  # build all blocks first: a failure leaves the model unchanged
        norm = _last_norm(module)
        block = make_block(norm.num_features, **_factory_keywords(norm))
        blocks.append(block.train(module.training))
    for module, block in zip(targets, blocks, strict=True):
        module.__class__ = classes[type(module)]
        module.register_module(ATTENTION_NAME, block)
    return model
