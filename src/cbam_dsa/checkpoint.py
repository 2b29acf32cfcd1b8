"""Safe checkpoint files: safetensors (preferred) or ``torch.load(..., weights_only=True)``, never a bare pickle.

A checkpoint holds a state_dict and, optionally, a JSON-serialisable ``config`` that rebuilds the model (for a
single block, :meth:`CBAMResidualDynamicSA.get_config`).
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["CheckpointError", "load_block", "load_checkpoint", "save_checkpoint"]

_CONFIG_KEY = "cbam_dsa_config"
_SAFETENSORS_SUFFIXES = (".safetensors",)


class CheckpointError(ValueError):
    """A checkpoint file that is missing, malformed, or refused as unsafe."""


def _state_dict(source: nn.Module | dict[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(source, nn.Module):
        source = source.state_dict()
    if not isinstance(source, dict) or not all(isinstance(v, Tensor) for v in source.values()):
        raise TypeError(f"expected an nn.Module or a dict of tensors, but got {type(source).__name__}")
    # Clone so that tensors sharing storage (tied weights, views) are written independently.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in source.items()}


def save_checkpoint(
    path: str | os.PathLike[str],
    source: nn.Module | dict[str, Tensor],
    config: dict[str, Any] | None = None,
) -> Path:
    """Write ``source``'s state_dict (and ``config``) to ``path``.

    ``.safetensors`` files are written with safetensors (the config goes into the header metadata as JSON); any
    other suffix is written with ``torch.save`` as ``{"state_dict": ..., "config": ...}``, which
    :func:`load_checkpoint` reads back with ``weights_only=True``.

    Args:
        path (str or PathLike): the file to write; parent folders are created.
        source (nn.Module or dict): a module or a state_dict.
        config (dict, optional): JSON-serialisable description of the model.

    Returns:
        Path: the path written.
    """
    path = Path(path)
    tensors = _state_dict(source)
    config_json = json.dumps(config) if config is not None else None  # fail before writing anything
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in _SAFETENSORS_SUFFIXES:
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata={_CONFIG_KEY: config_json} if config_json else None)
    else:
        torch.save({"state_dict": tensors, "config": json.loads(config_json) if config_json else None}, path)
    return path


def _detail(error: BaseException) -> str:
    """One line about ``error``: torch's long weights-only explanation is cut down to the line that matters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    telling = [line for line in lines if "GLOBAL" in line or "Unsupported" in line or "unsupported" in line]
    line = (telling or lines or [""])[0]
    line = f"{type(error).__name__}: {line}" if line else type(error).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def _read_config(path: Path, text: str) -> dict[str, Any]:
    try:
        config = json.loads(text)
    except ValueError as error:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has a config that is not valid JSON: {_detail(error)}"
        ) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} has a config of type {type(config).__name__}, not a dict")
    return config


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """Read a checkpoint safely; returns ``(state_dict, config)`` (``config`` may be ``None``).

    ``.safetensors`` files are read with safetensors. Anything else is read with
    ``torch.load(path, map_location="cpu", weights_only=True)``, which refuses pickled code; a file holding
    either a bare state_dict or ``{"state_dict": ..., "config": ...}`` is accepted.

    Raises:
        CheckpointError: the file is missing, is not a checkpoint, or holds objects other than tensors and
            plain containers (a crafted pickle is refused here, never executed). The message is one line.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is an empty file")
    if path.suffix in _SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
                metadata = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(
                f"checkpoint {str(path)!r} is not a valid safetensors file: {_detail(error)}"
            ) from error
        config = _read_config(path, metadata[_CONFIG_KEY]) if _CONFIG_KEY in metadata else None
        return state, config
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was refused: torch.load(weights_only=True) accepts only tensors and plain "
            f"containers and never runs pickled code, and this file holds something else or is not a PyTorch "
            f"checkpoint ({_detail(error)})"
        ) from error
    except Exception as error:  # a damaged or foreign file fails in many ways (zip, pickle, storage errors)
        raise CheckpointError(
            f"checkpoint {str(path)!r} could not be read as a PyTorch file ({_detail(error)})"
        ) from error
    config = None
    if isinstance(payload, dict) and "state_dict" in payload:
        config = payload.get("config")
        payload = payload["state_dict"]
    if not isinstance(payload, dict) or not all(isinstance(v, Tensor) for v in payload.values()):
        raise CheckpointError(f"checkpoint {str(path)!r} does not hold a state_dict (a dict of tensors)")
    if config is not None and not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} has a config of type {type(config).__name__}, not a dict")
    return dict(payload), config


def load_block(path: str | os.PathLike[str], **overrides: Any) -> nn.Module:
    """Rebuild a :class:`CBAMResidualDynamicSA` from a checkpoint written with its ``get_config()``.

    Args:
        path (str or PathLike): a checkpoint written by :func:`save_checkpoint` with ``config=block.get_config()``.
        **overrides: constructor arguments to change (for example ``return_maps=True``).
    """
    from .block import CBAMResidualDynamicSA

    state, config = load_checkpoint(path)
    if config is None:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has no config; save it with save_checkpoint(path, block, block.get_config())"
        )
    try:
        block = CBAMResidualDynamicSA(**{**config, **overrides})
    except (TypeError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has a config the block refuses: {' '.join(str(error).split())}"
        ) from error
    try:
        block.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match its config: {_state_mismatch(error)}"
        ) from error
    return block


def _state_mismatch(error: RuntimeError) -> str:
    """``load_state_dict``'s multi-line report, folded into one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines and lines[0].startswith("Error(s) in loading state_dict"):
        lines = lines[1:]
    text = " ".join(lines) or type(error).__name__
    return text if len(text) <= 400 else text[:397] + "..."
