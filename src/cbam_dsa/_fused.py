"""The whole block as one autograd Function on the fused C kernels, with a hand-written backward.

Where the kernels run (:func:`._native.supports`: contiguous float32/float64 CPU inputs) and only the output is asked
for, the block is one :class:`FusedBlock`:

* forward: the pooling over H, W (one kernel); the channel MLP as two matrix products; then one kernel call for
  everything after it (:meth:`._native.Kernels.spatial_forward`: channel gate, pooling over C of ``x * ca``, router,
  the merged branch convolution, spatial gate, blend);
* backward: one kernel call from the output's gradient down to the channel gate's input
  (:meth:`._native.Kernels.spatial_backward`), the MLP's adjoints as matrix products, and one pass that writes the
  gradient of ``x`` (:meth:`._native.Kernels.grad_x`).

No autograd graph is recorded: the derived parameters (fusion weights, effective temperatures, the mixing matrix of
the merged branches) are built inside the Function (:func:`derive`) and their chain rule is written out in
backward. The light networks are rearranged where that saves work, with the same math:

* The channel MLP's second layer is linear, so the fusion ``w0 * mlp(avg) + w1 * mlp(max)`` is one product on the
  mixed hidden activations: ``(w0 * h_avg + w1 * h_max) @ W2^T + (w0 + w1) * b2`` (``B`` rows, not ``2B``).
* The K spatial branches are one convolution over their merged taps (:mod:`._tapconv`) with the per-sample weights
  ``router @ mixing``.

Forward saves the input, the gates' inputs ``z`` (``(B, C)``) and ``logit`` (``(B, 1, H, W)``), the descriptors ``s``
(``(B, 2, H, W)``), a few tensors of ``B`` rows, and the pooled ``(2B, C)`` descriptors from
:data:`KEEP_POOLS_FROM_PIXELS` pixels per map on (below, they are a large share of the input and are recomputed by one
pass). Nothing else is recomputed but the two gates. A backward pass that is itself differentiated
(``create_graph=True``) recomputes the block in differentiable operations (:func:`block_math`) and differentiates
that instead.

Everything here is tested equal to the reference path, outputs and gradients (``tests/test_fused.py``,
``tests/test_native.py``, ``tests/test_fast.py``).
"""

from __future__ import annotations

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

_aten = torch.ops.aten


class Spec(NamedTuple):
    """The block's static choices: the MLP's activation, both gates, the merged taps of the spatial branches and how
    their kernels fill the mixing matrix (:func:`._tapconv.tap_layout`), and the number of branches."""

    act: str
    ca_gate: str
    sa_gate: str
    taps: Tensor
    gather: Tensor
    branches: int


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


def _alpha(p: Inputs) -> float | None:
    return None if p.alpha is None else float(p.alpha)


def _spatial(p: Inputs, spec: Spec) -> _native.Spatial:
    """The light parameters after the channel MLP, for :meth:`._native.Kernels.spatial_forward`."""
    return _native.Spatial(
        p.router_fc1_weight,
        p.router_fc1_bias,
        p.router_fc2_weight,
        p.router_fc2_bias,
        p.mixing,
        p.branch_bias,
        spec.taps,
        spec.ca_gate,
        spec.sa_gate,
        float(p.ca_temperature),
        float(p.sa_temperature),
        _alpha(p),
    )


def _mlp(p: Inputs, spec: Spec) -> _native.Mlp:
    """The channel MLP's parameters, for :meth:`._native.Kernels.block_forward`."""
    return _native.Mlp(p.fc1_weight, p.fc1_bias, p.fc2_weight, p.fc2_bias, p.fusion_w, spec.act)


def fused_forward(p: Inputs, spec: Spec) -> _native.BlockForward:
    """The block on the kernels, in one call (:meth:`._native.Kernels.block_forward`: pooling over H, W; the MLP on
    both descriptors, fused on its hidden layer; then everything after it), with everything its backward pass
    needs."""
    return _native.kernels().block_forward(p.x, _mlp(p, spec), _spatial(p, spec))


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
        p = derive(raw, spec)
        f = fused_forward(p, spec)
        keep = p.x.shape[2] * p.x.shape[3] >= KEEP_POOLS_FROM_PIXELS
        saved = _native.BlockSaved(f.z, f.s, f.logit, f.router, f.router_hidden, f.pre, f.pools if keep else None)
        ctx.save_for_backward(*raw, *p, *saved)
        ctx.spec = spec
        return f.out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        n, m = len(ctx.needs_input_grad) - 1, len(Inputs._fields)
        raw, p, rest = saved[:n], Inputs(*saved[n : n + m]), saved[n + m :]
        needs = ctx.needs_input_grad[1:]
        if torch.is_grad_enabled():
            return (None, *_differentiable_backward(raw, needs, ctx.spec, grad_out))
        grads = _backward(p, _derived_needs(needs, ctx.spec), ctx.spec, grad_out, _native.BlockSaved(*rest))
        return (None, *_raw_grads(raw, needs, ctx.spec, p, grads))


def _differentiable_backward(raw: tuple, needs: tuple[bool, ...], spec: Spec, grad_out: Tensor) -> tuple:
    """The gradients by autograd over :func:`derive` and :func:`block_math` (``create_graph=True``), so that they
    can be differentiated."""
    with torch.enable_grad():
        wanted = [t for t, need in zip(raw, needs, strict=True) if need]
        out = block_math(derive(raw, spec), spec)
        found = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True, create_graph=True))
    return tuple(next(found) if need else None for need in needs)


def _derived_needs(needs: tuple[bool, ...], spec: Spec) -> Inputs:
    """Which of :class:`Inputs` need a gradient, given which raw inputs do."""
    n, k = len(RAW_FIELDS), spec.branches
    raw = dict(zip(RAW_FIELDS, needs[:n], strict=True))
    return Inputs(
        *(raw[name] for name in RAW_FIELDS[:5]),
        raw["fusion_logits"],
        raw["ca_temperature"] or raw["ca_temperature_log_scale"],
        any(needs[n : n + k]),
        any(needs[n + k :]),
        *(raw[name] for name in RAW_FIELDS[11:]),
        raw["sa_temperature"] or raw["sa_temperature_log_scale"],
        raw["alpha"],
    )


def _raw_grads(raw: tuple, needs: tuple[bool, ...], spec: Spec, p: Inputs, g: Inputs) -> list[Tensor | None]:
    """The gradients of the raw inputs from those of :class:`Inputs` (the chain rule through :func:`derive`)."""
    n, k = len(RAW_FIELDS), spec.branches
    named = dict(zip(RAW_FIELDS, raw[:n], strict=True))
    grads: dict[str, Tensor | None] = {name: getattr(g, name) for name in RAW_FIELDS[:5] + RAW_FIELDS[10:]}
    if needs[5]:
        grads["fusion_logits"] = _aten._softmax_backward_data(g.fusion_w, p.fusion_w, 0, p.fusion_w.dtype)
    for part in ("ca", "sa"):
        grad_t, base, log_scale = (
            getattr(g, f"{part}_temperature"),
            f"{part}_temperature",
            f"{part}_temperature_log_scale",
        )
        if grad_t is not None:  # T = base * exp(log_scale)
            if named[log_scale] is not None:
                grads[log_scale] = grad_t * getattr(p, base)
            grads[base] = grad_t if named[log_scale] is None else grad_t * torch.exp(named[log_scale])
    out: list[Tensor | None] = [
        _like(grads.get(name), named[name]) if need else None for name, need in zip(RAW_FIELDS, needs[:n], strict=True)
    ]
    weights, biases = raw[n : n + k], raw[n + k :]
    if any(needs[n : n + k]):
        flat = g.mixing.new_zeros(sum(w.numel() for w in weights) + 1).index_add_(0, spec.gather, g.mixing.reshape(-1))
        parts = flat.split([w.numel() for w in weights] + [1])
        out += [
            _like(part.view_as(w), w) if need else None
            for part, w, need in zip(parts, weights, needs[n : n + k], strict=False)
        ]
    else:
        out += [None] * k
    parts = g.branch_bias.split([b.numel() for b in biases]) if any(needs[n + k :]) else [None] * k
    out += [_like(part, b) if need else None for part, b, need in zip(parts, biases, needs[n + k :], strict=True)]
    return out


def _like(grad: Tensor | None, t: Tensor | None) -> Tensor | None:
    """``grad`` in ``t``'s dtype and shape."""
    if grad is None or t is None:
        return None
    grad = grad if grad.dtype == t.dtype else grad.to(t.dtype)
    return grad if grad.shape == t.shape else grad.reshape(t.shape)


def _backward(p: Inputs, needs: Inputs, spec: Spec, grad_out: Tensor, saved: _native.BlockSaved) -> Inputs:
    """The first-order gradients of :class:`FusedBlock`'s inputs, in one kernel call
    (:meth:`._native.Kernels.block_backward`: the blend and the spatial part, the MLP's adjoints, then x's gradient
    in one pass)."""
    wanted = _native.BlockNeeds(
        needs.fc1_weight, needs.fc1_bias, needs.fc2_weight, needs.fc2_bias, needs.fusion_w, needs.x, needs.alpha
    )
    gb = _native.kernels().block_backward(grad_out.contiguous(), p.x, saved, _mlp(p, spec), _spatial(p, spec), wanted)
    scalars = gb.scalars.to(p.x.dtype)
    g: dict[str, Tensor | None] = {
        "x": gb.x,
        "fc1_weight": _like(gb.fc1_weight, p.fc1_weight),
        "fc1_bias": gb.fc1_bias,
        "fc2_weight": _like(gb.fc2_weight, p.fc2_weight),
        "fc2_bias": gb.fc2_bias,
        "fusion_w": gb.fusion,
        "alpha": None if p.alpha is None else scalars[0].reshape(p.alpha.shape),
        "ca_temperature": scalars[1].reshape(p.ca_temperature.shape),
        "sa_temperature": scalars[2].reshape(p.sa_temperature.shape),
        "mixing": gb.mixing,
        "branch_bias": gb.bias,
    }
    if p.router_fc1_weight is not None:
        for name in ("router_fc1_weight", "router_fc1_bias", "router_fc2_weight", "router_fc2_bias"):
            g[name] = getattr(gb, name).view_as(getattr(p, name))
    return Inputs(*(g.get(name) if need else None for name, need in zip(Inputs._fields, needs, strict=True)))


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


def block_inputs(block: CBAMResidualDynamicSA, x: Tensor, alpha: Tensor | None) -> tuple[tuple, Spec]:
    """The block's own tensors in :data:`RAW_FIELDS` order (branch kernels and biases after them) and its
    :class:`Spec`; ``alpha`` is ``None`` where the blend is the identity on ``x * ca * sa``."""
    part, spatial = block.ca, block.sa
    weights, biases, dilations = spatial.branch_params()
    specs = tuple((int(weight.shape[-1]), int(d)) for weight, d in zip(weights, dilations, strict=True))
    taps, gather = _tapconv.tap_layout(specs, 2)
    raw = (
        x,
        *part.mlp_params(),
        part.fusion_logits,
        part.temperature,
        part.temperature_log_scale,
        spatial.temperature,
        spatial.temperature_log_scale,
        alpha,
        *(spatial.router_params() or (None, None, None, None)),
        *weights,
        *biases,
    )
    return raw, Spec(part.act, part.gate, spatial.gate, taps, gather, len(specs))


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
            return fused_forward(derive(raw, spec), spec).out
