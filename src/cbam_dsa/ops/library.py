"""The fused block as two ``torch.library`` operators: ``cbam_dsa::block_forward`` and ``cbam_dsa::block_backward``.

Both take the block's tensors and a small spec as explicit arguments (never a module):

* tensors: ``x``, the channel MLP (``fc1_weight, fc1_bias, fc2_weight, fc2_bias``), ``fusion_logits`` (``None``: sum
  fusion), the effective temperatures ``ca_temperature, sa_temperature`` (0-d), ``alpha`` (0-d; ``None``: no
  residual), the router (``router_fc1_weight, router_fc1_bias, router_fc2_weight, router_fc2_bias``; ``None`` with
  one branch), and the K ``branch_weights`` and ``branch_biases``;
* spec: the branches' ``dilations``, the MLP's ``act`` and the two gates.

``block_forward`` returns one flat list, ``[out, ca, sa, fusion_w, router_w, *saved]``: the output, the four maps,
and what its device's backward needs (small tensors only; ``x`` and the parameters are kept by autograd). Flat, not a
tuple that ends in a list: inductor's C++ wrapper (``cpp_wrapper``, also AOTInductor's) calls an operator that returns
plain tensors or one list of them, and refuses a nested return. ``block_backward``
takes the gradients of the output and of the maps (each may be ``None``) and returns one gradient per tensor
argument, an empty tensor where the argument is ``None`` or its gradient is not needed.

Each device registers its implementation with :func:`implement` (``cpu/``: the C kernels, ``cuda/``: Triton); the
dispatcher chooses by device. The fake (meta) kernels make ``torch.compile`` and FX see through both operators. Their
autograd is :mod:`.autograd`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef

from .. import functional as FA

__all__ = [
    "BACKWARD",
    "BACKWARD_SCHEMA",
    "FORWARD",
    "FORWARD_SCHEMA",
    "OVERLOAD",
    "TENSOR_ARGS",
    "check_arguments",
    "check_backward_arguments",
    "devices",
    "direct_kernels",
    "forward_arguments",
    "gradients_like",
    "implement",
]

TENSOR_ARGS = (
    "x",
    "fc1_weight",
    "fc1_bias",
    "fc2_weight",
    "fc2_bias",
    "fusion_logits",
    "ca_temperature",
    "sa_temperature",
    "alpha",
    "router_fc1_weight",
    "router_fc1_bias",
    "router_fc2_weight",
    "router_fc2_bias",
)
"""The operators' single tensor arguments, in order; ``branch_weights`` and ``branch_biases`` (lists) follow."""

_OPTIONAL = {"fusion_logits", "alpha", "router_fc1_weight", "router_fc1_bias", "router_fc2_weight", "router_fc2_bias"}
_TENSORS = ", ".join(f"Tensor{'?' if name in _OPTIONAL else ''} {name}" for name in TENSOR_ARGS)
_ARGS = f"{_TENSORS}, Tensor[] branch_weights, Tensor[] branch_biases"
_SPEC = "int[] dilations, str act, str ca_gate, str sa_gate"
_GRADS = "Tensor? grad_out, Tensor? grad_ca, Tensor? grad_sa, Tensor? grad_fusion_w, Tensor? grad_router_w"

OVERLOAD = "v4"
"""The operators' overload name, to be raised (``"v4"``, ...) whenever what an operator returns changes shape, or
how inductor lowers the graph around it (its tags). torch.compile's on-disk caches (AOTAutograd's, inductor's) key a
graph on its operators' names, not on what their fake kernels return nor on their tags: a graph cached by a version
whose forward returned other tensors would be reused and fail on its first call (``AssertionError: wrong number of
dimensions``), as it did when ``saved`` was briefly one packed tensor, and again when short maps' saved pools went
from no elements to the maxima (then ``v2``: the default overload before). ``v3`` came with ``flexible_layout``: a
graph cached before converts the operators' channels_last inputs to contiguous, correct but slower. ``v4``: the
forward's outputs as one flat list (the same tensors), for inductor's C++ wrapper.
The CPU's C++ kernels register under the same name (``cpu/build.py`` passes it to the library). The tests hold what
``block_forward`` returns under each name (``RETURNS`` in ``tests/test_ops.py``), and fail on another layout."""
_FORWARD_NAME = f"block_forward.{OVERLOAD}" if OVERLOAD else "block_forward"
_BACKWARD_NAME = f"block_backward.{OVERLOAD}" if OVERLOAD else "block_backward"

# The operators' schemas less their names (also for operators of the same signature: the CPU implementation's).
FORWARD_SCHEMA = f"({_ARGS}, {_SPEC}) -> Tensor[]"
BACKWARD_SCHEMA = f"({_GRADS}, {_ARGS}, Tensor[] saved, {_SPEC}, bool[] needs) -> Tensor[]"

# flexible_layout: torch.compile hands the operators their tensors as the graph lays them out (channels_last after
# inductor's convolutions, say) rather than converting them to the layout seen while tracing: every implementation
# takes any layout (the C kernels read contiguous and channels_last as they are), and the fake kernels' strides
# follow x's, as the real ones do
_TAGS = (torch.Tag.flexible_layout,)
_library = torch.library.Library("cbam_dsa", "DEF")
_library.define(_FORWARD_NAME + FORWARD_SCHEMA, tags=_TAGS)
_library.define(_BACKWARD_NAME + BACKWARD_SCHEMA, tags=_TAGS)
FORWARD = getattr(torch.ops.cbam_dsa.block_forward, OVERLOAD or "default")
BACKWARD = getattr(torch.ops.cbam_dsa.block_backward, OVERLOAD or "default")
_N = len(TENSOR_ARGS)

SavedLike = Callable[..., list[Tensor]]
_saved_like: dict[str, SavedLike] = {}
_saved_shapes: dict[str, Callable[..., Sequence[Sequence[int]]]] = {}
_kernels: dict[str, tuple[Callable, Callable]] = {}


def implement(
    device: str,
    forward: Callable,
    backward: Callable,
    saved_like: SavedLike,
    saved_shapes: Callable[..., Sequence[Sequence[int]]] | None = None,
    direct: bool = True,
) -> None:
    """Register a device's implementation of both operators.

    The dispatcher's kernels check their arguments (:func:`check_arguments`) before calling ``forward`` or
    ``backward``. With ``direct``, the autograd node calls them without the dispatcher (:func:`_below_autograd`),
    its backward without the check: it gets what its forward checked and returned, and autograd's gradients.

    Args:
        device (str): ``"cpu"`` or ``"cuda"``.
        forward (Callable): takes ``block_forward``'s arguments and returns its outputs.
        backward (Callable): takes ``block_backward``'s arguments and returns its outputs.
        saved_like (Callable): takes ``block_forward``'s arguments and returns empty tensors shaped as its
            ``saved`` output, for the fake kernel (called on fake tensors: no data access).
        saved_shapes (Callable, optional): takes ``block_forward``'s arguments and returns the shapes of its
            ``saved`` output, for ``block_backward``'s check (without allocating); default: those of ``saved_like``.
        direct (bool): whether the autograd node may call ``forward`` and ``backward`` directly; ``False`` where
            kernels registered outside Python may take their place (the CPU's C++ ones).
    """
    key = {"cpu": "CPU", "cuda": "CUDA"}[device]

    def checked_forward(*args: Any) -> Any:
        check_arguments(args)
        return forward(*args)

    def checked_backward(*args: Any) -> Any:
        check_backward_arguments(args)
        return backward(*args)

    _library.impl(_FORWARD_NAME, checked_forward, key)
    _library.impl(_BACKWARD_NAME, checked_backward, key)
    _saved_like[device] = saved_like
    _saved_shapes[device] = saved_shapes or (lambda *args: [t.shape for t in saved_like(*args)])
    if direct:
        _kernels[device] = (checked_forward, backward)
    else:
        _kernels.pop(device, None)


def direct_kernels(device: str) -> tuple[Callable, Callable] | None:
    """The checked forward and the unchecked backward of a device registered with ``direct`` (:func:`implement`)."""
    return _kernels.get(device)


def devices() -> frozenset[str]:
    """The device types with an implementation."""
    return frozenset(_saved_like)


# ----------------------------------------------------------------------------------------------------------
# Argument checks: the operators are public, so every implementation checks what it is given before any kernel reads
# memory (the fake kernels too, so that torch.compile reports a bad call when it traces it).


def _fits(t: Any, shape: Sequence[int], device: torch.device) -> bool:
    """Whether ``t`` is a floating-point tensor of ``shape`` on ``device``."""
    return isinstance(t, Tensor) and t.shape == shape and t.device == device and t.dtype.is_floating_point


def _bad(where: str, name: str, t: Any, shape: Sequence[int], device: torch.device) -> ValueError:
    """The error for a tensor argument that is missing (or not a tensor), or of the wrong shape, device or dtype."""
    shape = tuple(shape)
    if not isinstance(t, Tensor):
        what = "None" if t is None else f"a {type(t).__name__}"
        return ValueError(f"{where}: {name} is {what}, but the operator needs a tensor of shape {shape}")
    if t.shape != shape:
        return ValueError(f"{where}: {name} must have shape {shape}, but got {tuple(t.shape)}")
    return ValueError(
        f"{where}: {name} must be a floating-point tensor on x's device ({device}), but got {t.dtype} on {t.device}"
    )


_SINGLE_NAMES = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "ca_temperature", "sa_temperature")
_OPTIONAL_NAMES = ("fusion_logits", "alpha", *TENSOR_ARGS[9:13])
_SPEC_NAMES = (("act", FA.ACTIVATIONS), ("ca_gate", FA.GATES), ("sa_gate", FA.GATES))


def check_arguments(args: Sequence[Any], where: str = "cbam_dsa::block_forward") -> None:
    """Check ``block_forward``'s arguments (also the matching part of ``block_backward``'s): shapes that agree with
    ``x`` and with each other, one device, known activation and gates. Raises ``ValueError`` naming the argument."""
    x, fc1_weight = args[0], args[1]
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.dtype.is_floating_point or 0 in x.shape[2:]:
        got = f"shape {tuple(x.shape)} and dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{where}: x must be a floating-point (B, C, H, W) tensor with H, W >= 1, but got {got}")
    c = x.shape[1]
    if not isinstance(fc1_weight, Tensor) or fc1_weight.dim() != 4 or fc1_weight.shape[1] != c:
        got = tuple(fc1_weight.shape) if isinstance(fc1_weight, Tensor) else fc1_weight
        raise ValueError(f"{where}: x has {c} channels, but fc1_weight has shape {got} (expected (hidden, {c}, 1, 1))")
    hidden = fc1_weight.shape[0]
    weights, biases, dilations = args[_N : _N + 3]
    branches = len(weights)
    if branches == 0 or len(biases) != branches or len(dilations) != branches:
        raise ValueError(
            f"{where}: branch_weights, branch_biases and dilations must have one entry per branch (at least one), "
            f"but got {branches}, {len(biases)} and {len(dilations)}"
        )
    device = x.device
    singles = (fc1_weight, args[2], args[3], args[4], args[6], args[7])
    shapes = ((hidden, c, 1, 1), (hidden,), (c, hidden, 1, 1), (c,), (), ())
    for name, t, shape in zip(_SINGLE_NAMES, singles, shapes):  # noqa: B905 (one length by construction)
        if not _fits(t, shape, device):
            raise _bad(where, name, t, shape, device)
    router = args[9:13]
    if router[0] is None and router[1] is None and router[2] is None and router[3] is None:
        optional, shapes = (args[5], args[8]), ((2,), ())
    else:
        r_hidden = router[0].shape[0] if isinstance(router[0], Tensor) and router[0].dim() else -1
        optional = (args[5], args[8], *router)
        shapes = ((2,), (), (r_hidden, 2, 1, 1), (r_hidden,), (branches, r_hidden, 1, 1), (branches,))
        if any(t is None for t in router):
            name = _OPTIONAL_NAMES[2 + [t is None for t in router].index(True)]
            raise ValueError(f"{where}: {name} is None, but the other router tensors are given")
    for i, (t, shape) in enumerate(zip(optional, shapes)):  # noqa: B905 (one length by construction)
        if t is not None and not _fits(t, shape, device):
            raise _bad(where, _OPTIONAL_NAMES[i], t, shape, device)
    for k in range(branches):
        weight, bias, dilation = weights[k], biases[k], dilations[k]
        size = weight.shape[-1] if isinstance(weight, Tensor) and weight.dim() else 0
        if size % 2 == 0 or dilation < 1:
            got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
            raise ValueError(
                f"{where}: branch {k} must have an odd kernel size and a dilation >= 1, but got kernel shape {got} "
                f"and dilation {dilation}"
            )
        shape = (1, 2, size, size)
        if not _fits(weight, shape, device):
            raise _bad(where, f"branch_weights[{k}]", weight, shape, device)
        if not _fits(bias, (1,), device):
            raise _bad(where, f"branch_biases[{k}]", bias, (1,), device)
    for (name, allowed), value in zip(_SPEC_NAMES, args[_N + 3 : _N + 6]):  # noqa: B905
        if value not in allowed:
            raise ValueError(f"{where}: {name} must be one of {allowed}, but got {value!r}")


_GRAD_NAMES = ("grad_out", "grad_ca", "grad_sa", "grad_fusion_w", "grad_router_w")


def check_backward_arguments(args: Sequence[Any]) -> None:
    """Check ``block_backward``'s arguments: those of the forward (:func:`check_arguments`), each given gradient
    shaped as its output, ``saved`` shaped as the device's forward returns it, one ``needs`` entry per gradient.
    Raises ``ValueError`` naming the argument: a kernel never reads past a tensor it is given."""
    where = "cbam_dsa::block_backward"
    forward = forward_arguments(args)
    check_arguments(forward, where)
    x = forward[0]
    b, c, h, w = x.shape
    branches = len(forward[_N])
    shapes = (x.shape, (b, c, 1, 1), (b, 1, h, w), (2,), (b, branches))
    device = x.device
    for name, grad, shape in zip(_GRAD_NAMES, args[:5], shapes, strict=True):
        if grad is not None and not _fits(grad, shape, device):
            raise _bad(where, name, grad, shape, device)
    saved, needs = args[5 + _N + 2], args[-1]
    saved_shapes = _saved_shapes.get(x.device.type)
    if saved_shapes is None:
        raise NotImplementedError(f"{where} has no implementation on {x.device.type}")
    expected = saved_shapes(*forward)
    if len(saved) != len(expected):
        count = f"{len(expected)} tensor{'s' if len(expected) != 1 else ''}"
        raise ValueError(f"{where}: saved must be the forward's list of {count}, but got {len(saved)}")
    for i, (t, shape) in enumerate(zip(saved, expected, strict=True)):
        if not _fits(t, shape, device):
            raise _bad(where, f"saved[{i}]", t, shape, device)
    count = _N + 2 * branches  # len(gradient_inputs(forward))
    if len(needs) != count:
        raise ValueError(f"{where}: needs must have one entry per tensor argument ({count}), but got {len(needs)}")


# ----------------------------------------------------------------------------------------------------------
# Fake kernels.


@torch.library.register_fake(f"cbam_dsa::{_FORWARD_NAME}", lib=_library)
def _forward_fake(*args: Any) -> list[Tensor]:
    check_arguments(args)
    x, branches = args[0], len(args[_N])
    b, c, h, w = x.shape
    saved_like = _saved_like.get(x.device.type)
    if saved_like is None:
        raise NotImplementedError(f"cbam_dsa::block_forward has no implementation on {x.device.type}")
    maps = (x.new_empty(b, c, 1, 1), x.new_empty(b, 1, h, w), x.new_empty(2), x.new_empty(b, branches))
    return [torch.empty_like(x), *maps, *saved_like(*args)]


@torch.library.register_fake(f"cbam_dsa::{_BACKWARD_NAME}", lib=_library)
def _backward_fake(*args: Any) -> list[Tensor]:
    check_backward_arguments(args)
    inputs, needs = gradient_inputs(args[5:]), args[-1]
    return gradients_like([None] * len(inputs), inputs, needs)


def forward_arguments(args: Sequence[Any]) -> tuple:
    """``block_forward``'s arguments among ``block_backward``'s (less the gradients, ``saved`` and ``needs``)."""
    return (*args[5 : 5 + _N + 2], *args[5 + _N + 3 : -1])


def gradient_inputs(args: Sequence[Any]) -> list[Tensor | None]:
    """The tensor arguments that get a gradient, flat: the single ones, then the branch weights and biases."""
    return [*args[:_N], *args[_N], *args[_N + 1]]


def laid_out_as(t: Tensor, x: Tensor) -> Tensor:
    """``t`` (of ``x``'s numel) in ``x``'s dtype and shape, laid out as ``torch.empty_like(x)`` lays ``x`` out
    (channels_last for a channels_last ``x``, contiguous for a view that is not dense), as the fake kernels promise:
    ``t`` itself where it already is."""
    if t.dtype == x.dtype and t.shape == x.shape and t.stride() == x.stride():
        return t
    like = torch.empty_like(x)
    same = t.dtype == x.dtype and t.shape == x.shape and t.stride() == like.stride()
    return t if same else like.copy_(t.reshape(x.shape))


def gradients_like(grads: Sequence[Tensor | None], inputs: Sequence[Tensor | None], needs: Sequence[bool]) -> list:
    """``block_backward``'s output from one gradient (or ``None``) per input: each in its input's dtype, shape and
    strides (as ``torch.empty_like`` lays it out); an empty tensor where the input is ``None`` or not needed.

    No two outputs share memory (an operator's outputs may not alias each other, and ``opcheck`` checks it): a
    gradient that is a view into a buffer an earlier one came from (the small parameters' gradients are often
    slices of one) is copied."""
    out, buffers = [], set()
    for grad, t, need in zip(grads, inputs, needs, strict=True):
        if t is None or not need:
            out.append(inputs[0].new_empty(0))
        elif grad is None:
            out.append(torch.zeros_like(t))
        else:
            found = laid_out_as(grad, t)
            buffer = StorageWeakRef(found.untyped_storage())
            out.append(found.clone() if buffer in buffers else found)
            buffers.add(buffer)
    return out
