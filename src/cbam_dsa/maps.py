"""Capture the attention maps of every CBAMResidualDynamicSA in a whole model, without changing its outputs.

The recorder follows the hook-based recorders of lucidrains' vit-pytorch: while recording, each block is asked
for its maps (``return_maps``) and a forward hook stores them and hands the model back the output it would have
seen, so what the model returns is unchanged (bitwise: the maps are outputs of the block's one operator call either
way). On exit the hooks are removed and the flags restored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_bool
from .block import CBAMResidualDynamicSA

__all__ = ["AttentionMaps", "MapRecorder", "find_blocks"]


@dataclass
class AttentionMaps:
    """The maps of one block for one forward pass.

    Attributes:
        ca (Tensor): channel map ``(B, C, 1, 1)``.
        sa (Tensor): spatial map ``(B, 1, H, W)``.
        fusion_w (Tensor): avg/max fusion weights ``(2,)`` (``[1, 1]`` for sum fusion).
        router_w (Tensor): router weights ``(B, K)`` (all ones for a single branch).
    """

    ca: Tensor
    sa: Tensor
    fusion_w: Tensor
    router_w: Tensor

    def as_dict(self) -> dict[str, Tensor]:
        """The maps as ``{"ca": ..., "sa": ..., "fusion_w": ..., "router_w": ...}``."""
        return {"ca": self.ca, "sa": self.sa, "fusion_w": self.fusion_w, "router_w": self.router_w}


def find_blocks(model: nn.Module) -> dict[str, CBAMResidualDynamicSA]:
    """Every :class:`CBAMResidualDynamicSA` in ``model``, keyed by its qualified module name.

    ``model`` itself, if it is a block, is keyed ``""``. A block reachable under several names appears once.
    """
    return {name: m for name, m in model.named_modules() if isinstance(m, CBAMResidualDynamicSA)}


class MapRecorder:
    """Context manager that records each block's maps during forward passes.

    Inside the ``with``, every :class:`CBAMResidualDynamicSA` of ``model`` computes its maps; the model still
    returns exactly what it returns outside (a block that was built with ``return_maps=True`` keeps returning
    its tuple). On exit, also when the body raises, every hook is removed and every block's ``return_maps`` is
    restored. ``maps`` maps each block's qualified name to its :class:`AttentionMaps` from the latest forward
    (or a list of them, one per forward, with ``keep_all=True``). The blocks are looked up when recording
    starts, so blocks added after the recorder was made are recorded too. Recorders on the same model nest.

    Args:
        model (nn.Module): any model containing the block.
        detach (bool): store detached tensors (no autograd graph kept alive). Default: ``True``.
        keep_all (bool): keep the maps of every forward pass, not just the latest. Default: ``False``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ``detach`` or ``keep_all`` is not a bool.
        RuntimeError: the recorder is entered while it is already recording.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 16, 3), CBAMResidualDynamicSA(16))
        >>> with MapRecorder(model) as rec:
        ...     out = model(torch.randn(2, 3, 32, 32))
        >>> rec.maps["1"].sa.shape
        torch.Size([2, 1, 30, 30])
    """

    def __init__(self, model: nn.Module, detach: bool = True, keep_all: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, but got {type(model).__name__}")
        self.model = model
        self.detach = check_bool("detach", detach)
        self.keep_all = check_bool("keep_all", keep_all)
        self.blocks = find_blocks(model)
        self.maps: dict[str, Any] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._saved_flags: dict[str, bool] = {}
        self._recording = False

    @property
    def recording(self) -> bool:
        """Whether the recorder is inside its ``with``."""
        return self._recording

    def _hook(self, name: str, caller_wants_maps: bool):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            out, ca, sa, fusion_w, router_w = output
            tensors = (ca, sa, fusion_w, router_w)
            if self.detach:
                tensors = tuple(t.detach() for t in tensors)
            maps = AttentionMaps(*tensors)
            if self.keep_all:
                self.maps.setdefault(name, []).append(maps)
            else:
                self.maps[name] = maps
            return output if caller_wants_maps else out

        return hook

    def __enter__(self) -> MapRecorder:
        if self.recording:
            raise RuntimeError("MapRecorder is already recording; it cannot be entered twice")
        self.maps = {}
        self.blocks = find_blocks(self.model)
        try:
            for name, block in self.blocks.items():
                self._saved_flags[name] = block.return_maps
                block.return_maps = True
                # Prepended, so that a recorder entered later (nested) sees the block's tuple first and an
                # outer one still gets the tuple back; hooks the user registered see the usual output.
                hook = self._hook(name, self._saved_flags[name])
                self._handles.append(block.register_forward_hook(hook, prepend=True))
        except BaseException:
            self._restore()
            raise
        self._recording = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for name, flag in self._saved_flags.items():
            self.blocks[name].return_maps = flag
        self._saved_flags.clear()
        self._recording = False
