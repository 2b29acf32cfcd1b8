"""The whole block as one autograd Function on the fused C kernels, with a hand-written backward.

Where the kernels run (:func:`._native.supports`: contiguous float32/float64 CPU inputs) and only the output is asked
for, the block is one :class:`FusedBlock`, and each direction is one kernel call on the block's own tensors:

* forward (:meth:`._native.Kernels.block_forward`): the pooling over H, W; the channel MLP; the channel gate; the
  pooling over C of ``x * ca``; the router; the merged branch convolution; the spatial gate; the blend;
* backward (:meth:`._native.Kernels.block_backward`): the same in reverse, down to the gradient of ``x`` (one pass)
  and of every parameter.

The kernels derive the light parameters themselves (the fusion softmax, the mixing matrix gathered from the branch
kernels, the stacked branch biases) and apply their chain rule; only the effective temperatures ``base *
exp(log_scale)`` are formed here, and their chain rule written out in :func:`_backward`. No autograd graph is
recorded. Where the batch fills the threads and a sample's maps outweigh the MLP's weights, each sample runs on one
thread from start to end, so its slice of the input is read from memory once and from the cache after that
(:func:`._native.one_sample_per_thread`). The light networks are rearranged where that saves work, with the same
math:

* The channel MLP's second layer is linear, so the fusion ``w0 * mlp(avg) + w1 * mlp(max)`` is one product on the
  mixed hidden activations: ``(w0 * h_avg + w1 * h_max) @ W2^T + (w0 + w1) * b2`` (``B`` rows, not ``2B``).
* The K spatial branches are one convolution over their merged taps (:mod:`._tapconv`) with the per-sample weights
  ``router @ mixing``.

Forward saves the input, the gates' inputs ``z`` (``(B, C)``) and ``logit`` (``(B, 1, H, W)``), the descriptors ``s``
(``(B, 2, H, W)``), a few tensors of ``B`` rows, and the pooled ``(2B, C)`` descriptors from
:data:`KEEP_POOLS_FROM_PIXELS` pixels per map on (below, they are a large share of the input and are recomputed by one
pass). Nothing else is recomputed but the two gates. A backward pass that is itself differentiated
(``create_graph=True``) recomputes the block in differentiable operations (:func:`block_math`) and differentiates
that instead (:func:`derive` builds the light parameters in differentiable operations for it).

Everything here is tested equal to the reference path, outputs and gradients (``tests/test_fused.py``,
``tests/test_native.py``, ``tests/test_fast.py``).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from . import _native, _tapconv
from . import functional as FA

if TYPE_CHECKING:
    from .block import CBAMResidualDynamicSA

__all__ = [
    "KEEP_POOLS_FROM_PIXELS",
    "RAW_FIELDS",
    "FusedBlock",
    "Inputs",
    "Spec",
    "block_forward",
    "block_math",
    "derive",
]

# From this many pixels per map on, the pooled (2B, C) descriptors are kept for backward (2 / pixels of the input,
# at most 3%); below, they are recomputed there by one pass over the input.
KEEP_POOLS_FROM_PIXELS = 64


class Spec(NamedTuple):
    """The block's static choices: the MLP's activation, both gates, the merged taps of the spatial branches and how
    their kernels fill the mixing matrix (:func:`._tapconv.tap_layout`), and the number of branches."""

    act: str
    ca_gate: str
    sa_gate: str
    taps: Tensor
    gather: Tensor
    branches: int
    layout: Tensor  # the taps, gather and kernel sizes packed for the kernels (:func:`._native.block_layout`)


RAW_FIELDS = (
    "x",
    "fc1_weight",
    "fc1_bias",
    "fc2_weight",
    "fc2_bias",
    "fusion_logits",
    "ca_temperature",
    "ca_temperature_log_scale",
    "sa_temperature",
    "sa_temperature_log_scale",
    "alpha",
    "router_fc1_weight",
    "router_fc1_bias",
    "router_fc2_weight",
    "router_fc2_bias",
)
""":class:`FusedBlock`'s inputs, the block's own tensors (``None`` where it has no such part), followed by the K
branch kernels and then the K branch biases."""


class Inputs(NamedTuple):
    """The tensors the kernels and the light networks take, derived from the block's (:func:`derive`), in ``x``'s
    dtype (``None`` where the block has no such part)."""

    x: Tensor
    fc1_weight: Tensor
    fc1_bias: Tensor
    fc2_weight: Tensor
    fc2_bias: Tensor
    fusion_w: Tensor
    ca_temperature: Tensor
    mixing: Tensor
    branch_bias: Tensor
    router_fc1_weight: Tensor | None
    router_fc1_bias: Tensor | None
    router_fc2_weight: Tensor | None
    router_fc2_bias: Tensor | None
    sa_temperature: Tensor
    alpha: Tensor | None


# ----------------------------------------------------------------------------------------------------------
# Forward.


# The positions in RAW_FIELDS of the kernels' inputs (the temperatures go to them as numbers), the branch kernels and
# biases after them.
_KERNEL_FIELDS = (0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 14)


def _kernel_inputs(raw: tuple[Tensor | None, ...]) -> list[Tensor | None]:
    """The kernels' inputs from the block's own tensors, in ``x``'s dtype, contiguous (the tensors themselves where
    they already are)."""
    dtype = raw[0].dtype
    picked = [raw[i] for i in _KERNEL_FIELDS]
    picked += raw[len(RAW_FIELDS) :]
    return [_native.ready(t, dtype) for t in picked]


def _temperatures(raw: tuple[Tensor | None, ...]) -> tuple[float, float]:
    """The effective temperatures ``(T_ca, T_sa)``."""
    return float(_temperature(raw[6], raw[7])), float(_temperature(raw[8], raw[9]))


def _dims(inputs: list[Tensor | None], spec: Spec) -> Any:
    return _native.block_dims(inputs, spec.branches, spec.taps.shape[0], (spec.ca_gate, spec.sa_gate), spec.act)


class _Call(NamedTuple):
    """What the forward kernel call was given beside the tensors; the backward call takes the same."""

    kernels: _native.Kernels
    dims: Any  # from _native.block_dims
    temperatures: tuple[float, float]


def fused_forward(raw: tuple[Tensor | None, ...], spec: Spec) -> tuple[_native.BlockForward, _Call]:
    """The block on the kernels from its own tensors (:data:`RAW_FIELDS`), in one call
    (:meth:`._native.Kernels.block_forward`), with everything its backward pass needs."""
    inputs = _kernel_inputs(raw)
    call = _Call(_native.kernels(), _dims(inputs, spec), _temperatures(raw))
    return call.kernels.block_forward(inputs, spec.layout, call.dims, call.temperatures), call


# ----------------------------------------------------------------------------------------------------------
# The differentiable recomputation (for backward passes that are themselves differentiated).


def block_math(p: Inputs, spec: Spec) -> Tensor:
    """The block's output from :class:`Inputs` in plain differentiable operations: the math of
    :mod:`.functional` with the branches as one dense convolution (:func:`._tapconv.dense_tap_conv`).

    Shape:
        - x: :math:`(B, C, H, W)`
        - Output: :math:`(B, C, H, W)`
    """
    x = p.x
    b = x.shape[0]
    avg, mx = FA.channel_pool(x)
    mlp = (p.fc1_weight, p.fc1_bias, p.fc2_weight, p.fc2_bias, spec.act)
    z = p.fusion_w[0] * FA.channel_mlp(avg, *mlp) + p.fusion_w[1] * FA.channel_mlp(mx, *mlp)
    ca = FA.apply_gate(z, spec.ca_gate, p.ca_temperature)
    s = FA.spatial_pool(x * ca)
    if p.router_fc1_weight is None:
        router = s.new_ones(b, 1)
    else:
        router = FA.router_weights(s, p.router_fc1_weight, p.router_fc1_bias, p.router_fc2_weight, p.router_fc2_bias)
    logit = _tapconv.dense_tap_conv(s, router @ p.mixing, spec.taps) + (router @ p.branch_bias).view(b, 1, 1, 1)
    sa = FA.apply_gate(logit, spec.sa_gate, p.sa_temperature)
    y = x * ca * sa
    return y if p.alpha is None else FA.residual_blend(x, y, p.alpha)


# ----------------------------------------------------------------------------------------------------------
# The Function.


class FusedBlock(torch.autograd.Function):
    """The block's output on the fused kernels from its own tensors (:data:`RAW_FIELDS`), with a hand-written
    backward; the light parameters are derived inside (:func:`derive`), so no autograd graph is recorded at all.

    Shape:
        - x: :math:`(B, C, H, W)`, contiguous float32/float64 on the CPU
        - Output: :math:`(B, C, H, W)`
    """

    @staticmethod
    def forward(ctx: Any, spec: Spec, *raw: Tensor | None) -> Tensor:
        f, call = fused_forward(raw, spec)
        keep = raw[0].shape[2] * raw[0].shape[3] >= KEEP_POOLS_FROM_PIXELS
        ctx.save_for_backward(*raw, f.z, f.s, f.logit, f.router, f.router_hidden, f.pre, f.pools if keep else None)
        # The saved tensors are checked against in-place changes when backward unpacks them, so the numbers taken
        # from them here (the shapes in dims, the temperatures) still hold there.
        ctx.spec, ctx.call = spec, call
        return f.out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        n = len(ctx.needs_input_grad) - 1
        raw, needs = saved[:n], ctx.needs_input_grad[1:]
        if torch.is_grad_enabled():
            return (None, *_differentiable_backward(raw, needs, ctx.spec, grad_out))
        saved = _native.BlockSaved(*saved[n:])
        return (None, *_backward(raw, needs, ctx.spec, grad_out, saved, ctx.call))


def _differentiable_backward(raw: tuple, needs: tuple[bool, ...], spec: Spec, grad_out: Tensor) -> tuple:
    """The gradients by autograd over :func:`derive` and :func:`block_math` (``create_graph=True``), so that they
    can be differentiated."""
    with torch.enable_grad():
        wanted = [t for t, need in zip(raw, needs, strict=True) if need]
        out = block_math(derive(raw, spec), spec)
        found = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True, create_graph=True))
    return tuple(next(found) if need else None for need in needs)


def _like(grad: Tensor | None, t: Tensor | None) -> Tensor | None:
    """``grad`` in ``t``'s dtype and shape."""
    if grad is None or t is None:
        return None
    grad = grad if grad.dtype == t.dtype else grad.to(t.dtype)
    return grad if grad.shape == t.shape else grad.reshape(t.shape)


def _backward(
    raw: tuple[Tensor | None, ...],
    needs: tuple[bool, ...],
    spec: Spec,
    grad_out: Tensor,
    saved: _native.BlockSaved,
    call: _Call,
) -> list[Tensor | None]:
    """The first-order gradients of :class:`FusedBlock`'s inputs, in one kernel call
    (:meth:`._native.Kernels.block_backward`: the blend and the spatial part, the MLP's adjoints, x's gradient in one
    pass, and the chain rule to the fusion logits and the branch kernels); the temperatures' chain rule here.
    ``call`` is the forward kernel call's."""
    n = len(RAW_FIELDS)
    inputs = _kernel_inputs(raw)
    wanted = [needs[i] for i in _KERNEL_FIELDS]
    wanted += needs[n:]
    grads, scalars = call.kernels.block_backward(
        grad_out.contiguous(), inputs, saved, spec.layout, wanted, call.dims, call.temperatures
    )
    out: list[Tensor | None] = [None] * len(raw)
    for grad, i in zip(grads, _grad_fields(len(raw)), strict=True):
        if grad is not None:  # the kernels' inputs have the shapes of the block's tensors, perhaps not their dtypes
            out[i] = grad if grad.dtype == raw[i].dtype else grad.to(raw[i].dtype)
    if not any(needs[6:11]):
        return out
    scalars = scalars.to(raw[0].dtype)
    if needs[10]:
        out[10] = _like(scalars[0], raw[10])
    for grad_t, base, log_scale in ((scalars[1], 6, 7), (scalars[2], 8, 9)):  # T = base * exp(log_scale)
        if raw[log_scale] is None:
            out[base] = _like(grad_t, raw[base]) if needs[base] else None
            continue
        if needs[log_scale]:
            out[log_scale] = _like(grad_t * _temperature(raw[base], raw[log_scale]).to(grad_t.dtype), raw[log_scale])
        if needs[base]:
            out[base] = _like(grad_t * torch.exp(raw[log_scale]).to(grad_t.dtype), raw[base])
    return out


@functools.lru_cache(maxsize=16)
def _grad_fields(count: int) -> tuple[int, ...]:
    """The positions among :class:`FusedBlock`'s ``count`` inputs of the kernels' gradients."""
    return (*_KERNEL_FIELDS, *range(len(RAW_FIELDS), count))


# ----------------------------------------------------------------------------------------------------------
# The block.


def _in(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _temperature(base: Tensor, log_scale: Tensor | None) -> Tensor:
    return base if log_scale is None else base * torch.exp(log_scale)


def derive(raw: tuple[Tensor | None, ...], spec: Spec) -> Inputs:
    """:class:`Inputs` from the block's own tensors (:data:`RAW_FIELDS`): fusion weights, effective temperatures, the
    mixing matrix of the merged branches, the stacked branch biases, everything in ``x``'s dtype."""
    n, k = len(RAW_FIELDS), spec.branches
    r = dict(zip(RAW_FIELDS, raw[:n], strict=True))
    x = r["x"]
    dtype = x.dtype
    weights, biases = raw[n : n + k], raw[n + k :]
    flat = torch.cat([*(_in(weight, dtype).reshape(-1) for weight in weights), x.new_zeros(1)])
    return Inputs(
        x,
        *(_in(r[name], dtype) for name in RAW_FIELDS[1:5]),
        FA.fusion_weights(r["fusion_logits"], x),
        _in(_temperature(r["ca_temperature"], r["ca_temperature_log_scale"]), dtype),
        flat[spec.gather].view(k, -1),
        torch.cat([_in(bias, dtype) for bias in biases]),
        *(_in(r[name], dtype) for name in RAW_FIELDS[11:]),
        _in(_temperature(r["sa_temperature"], r["sa_temperature_log_scale"]), dtype),
        _in(r["alpha"], dtype),
    )


def _tensor(module: torch.nn.Module, name: str) -> Tensor | None:
    """``module.<name>`` for a parameter or buffer, from the module's dicts where it is there (``Module.__getattr__``
    costs a microsecond or more per lookup, and this runs on every call), else by attribute (parametrizations)."""
    params = module._parameters
    if name in params:
        return params[name]
    buffers = module._buffers
    if name in buffers:
        return buffers[name]
    return getattr(module, name)


def block_inputs(block: CBAMResidualDynamicSA, x: Tensor, alpha: Tensor | None) -> tuple[tuple, Spec]:
    """The block's own tensors in :data:`RAW_FIELDS` order (branch kernels and biases after them) and its
    :class:`Spec`; ``alpha`` is ``None`` where the blend is the identity on ``x * ca * sa``."""
    part, spatial = block._modules["ca"], block._modules["sa"]
    fc1, fc2 = part._modules["fc1"], part._modules["fc2"]
    branches = list(spatial._modules["branches"]._modules.values())
    weights = [_tensor(branch, "weight") for branch in branches]
    biases = [_tensor(branch, "bias") for branch in branches]
    specs = tuple((int(weight.shape[-1]), int(d)) for weight, d in zip(weights, spatial.dilations, strict=True))
    taps, gather, layout = _layout(specs)
    router = spatial._modules.get("router")  # None (a plain attribute) with one branch
    if router is None:
        router_params: tuple[Tensor | None, ...] = (None, None, None, None)
    else:
        first, last = router._modules["0"], router._modules["2"]
        router_params = tuple(_tensor(layer, name) for layer in (first, last) for name in ("weight", "bias"))
    raw = (
        x,
        _tensor(fc1, "weight"),
        _tensor(fc1, "bias"),
        _tensor(fc2, "weight"),
        _tensor(fc2, "bias"),
        _tensor(part, "fusion_logits"),
        _tensor(part, "temperature"),
        _tensor(part, "temperature_log_scale"),
        _tensor(spatial, "temperature"),
        _tensor(spatial, "temperature_log_scale"),
        alpha,
        *router_params,
        *weights,
        *biases,
    )
    return raw, Spec(part.act, part.gate, spatial.gate, taps, gather, len(specs), layout)


@functools.lru_cache(maxsize=64)
def _layout(specs: tuple[tuple[int, int], ...]) -> tuple[Tensor, Tensor, Tensor]:
    """``(taps, gather, layout)`` of the branches ``specs = ((size, dilation), ...)`` on 2 descriptor maps."""
    taps, gather = _tapconv.tap_layout(specs, 2)
    with torch.inference_mode(False):  # cached tensors must stay usable by autograd later
        return taps, gather, _native.block_layout(taps, gather, [2 * size * size for size, _ in specs])


def block_forward(block: CBAMResidualDynamicSA, x: Tensor, alpha: Tensor | None) -> Tensor:
    """The block's output on ``x`` by :class:`FusedBlock` (``x`` must suit the kernels); ``alpha`` is ``None`` where
    the blend is the identity on ``x * ca * sa``.

    The kernels and the light networks compute in ``x``'s dtype, with autocast off.

    Shape:
        - x, output: :math:`(B, C, H, W)`
    """
    with _tapconv._no_autocast(x):
        raw, spec = block_inputs(block, x, alpha)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in raw):
            return FusedBlock.apply(spec, *raw)
        with torch.no_grad():
            return fused_forward(raw, spec)[0].out
