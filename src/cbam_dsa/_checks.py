"""Argument and input validation with messages that name the argument, the value and what is allowed.

Every check raises ``TypeError`` for a value of the wrong kind and ``ValueError`` for a value of the right
kind outside the allowed range. None of them uses ``assert``, so they survive ``python -O``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

__all__ = [
    "check_bool",
    "check_choice",
    "check_finite",
    "check_input",
    "check_int",
    "check_kernel_size",
    "check_kernel_sizes",
    "check_temperature",
]


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """Return ``value`` as an ``int`` if it is an integer ``>= minimum``."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an integer >= {minimum}, but got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, but got {value!r}")
    return int(value)


def check_bool(name: str, value: object) -> bool:
    """Return ``value`` if it is a ``bool``; integers and strings are refused rather than guessed at."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, but got {value!r} ({type(value).__name__})")
    return value


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of the strings in ``choices``."""
    allowed = ", ".join(repr(c) for c in choices)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {allowed}, but got {value!r} ({type(value).__name__})")
    if value not in choices:
        raise ValueError(f"{name} must be one of {allowed}, but got {value!r}")
    return value


def check_finite(name: str, value: object) -> float:
    """Return ``value`` as a ``float`` if it is a finite real number."""
    if not _is_real(value):
        raise TypeError(f"{name} must be a finite real number, but got {value!r} ({type(value).__name__})")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite real number, but got {value!r}")
    return float(value)


def check_temperature(name: str, value: object) -> float:
    """Return ``value`` as a ``float`` if it is finite and strictly positive."""
    if not _is_real(value):
        raise TypeError(f"{name} must be a finite number > 0, but got {value!r} ({type(value).__name__})")
    if not (math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"{name} must be a finite number > 0, but got {value!r}")
    return float(value)


def check_kernel_size(name: str, value: object) -> int:
    """Return ``value`` if it is an odd integer ``>= 1``.

    Even sizes are refused rather than rounded: a kernel with no centre pixel cannot keep the map aligned
    with the input under symmetric padding, and silently changing the size changes what was asked for.
    """
    if not _is_int(value):
        raise TypeError(f"{name} must be an odd integer >= 1, but got {value!r} ({type(value).__name__})")
    if value < 1 or value % 2 == 0:
        raise ValueError(f"{name} must be an odd integer >= 1, but got {value!r}")
    return int(value)


def check_kernel_sizes(name: str, value: object) -> tuple[int, ...]:
    """Return ``value`` as a tuple of odd integers ``>= 1`` (it may be empty)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(
            f"{name} must be a tuple or list of odd integers >= 1 (for example (3, 7)), "
            f"but got {value!r} ({type(value).__name__})"
        )
    sizes = []
    for i, k in enumerate(value):
        if not _is_int(k) or k < 1 or k % 2 == 0:
            error = TypeError if not _is_int(k) else ValueError
            raise error(f"{name} must hold odd integers >= 1, but {name}[{i}] is {k!r} (in {value!r})")
        sizes.append(int(k))
    return tuple(sizes)


def check_input(x: object, channels: int | None = None, name: str = "x") -> None:
    """Check that ``x`` is a 4-D floating-point tensor ``(B, C, H, W)`` with ``channels`` channels.

    Under FX tracing ``x`` is a :class:`torch.fx.Proxy`, which holds no values: the checks then run on the shape and
    dtype its node records (``meta["val"]`` or ``meta["tensor_meta"]``, after shape propagation) where there are
    some, and pass otherwise, so tracing never breaks on them.
    """
    if isinstance(x, torch.Tensor):  # first: under torch.compile, a test of a global (torch.fx.Proxy) is a guard
        shape, dtype = tuple(x.shape), x.dtype
    elif isinstance(x, torch.fx.Proxy):
        meta = x.node.meta.get("val", x.node.meta.get("tensor_meta"))
        if meta is None or not hasattr(meta, "shape") or not hasattr(meta, "dtype"):
            return
        shape, dtype = tuple(meta.shape), meta.dtype
    else:
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, C, H, W), but got {type(x).__name__}")
    if len(shape) != 4:
        expected = f"(B, {channels}, H, W)" if channels is not None else "(B, C, H, W)"
        raise ValueError(f"{name} must have shape {expected}, but got shape {shape} ({len(shape)}-D)")
    if not dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, but got dtype {dtype}")
    if channels is not None and shape[1] != channels:
        raise ValueError(
            f"{name} must have shape (B, {channels}, H, W), but got shape {shape}: "
            f"{shape[1]} channels where the module was built for {channels}"
        )
    if shape[2] == 0 or shape[3] == 0:
        raise ValueError(f"{name} must have H >= 1 and W >= 1, but got shape {shape}")
