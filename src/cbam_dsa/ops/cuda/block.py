"""The fused block on CUDA: launchers of the Triton kernels (:mod:`.kernels`, :mod:`.kernels_backward_spatial`,
:mod:`.kernels_backward_channel`) for the operator's CUDA implementation.

The math is :func:`cbam_dsa.functional.cbam_residual_dynamic_sa`; the tensors come in the operator's order (``None``
where the block has no such part) and the spec after them (:func:`block_forward`).

Forward, three kernels, one pass over ``x`` each (three reads and one write of ``x`` in all):

1. :func:`.kernels.channel_pool_kernel`: mean and max over H, W (grid ``(B, C / CB)``);
2. :func:`.kernels.spatial_pool_kernel`: each program computes its sample's channel MLP, fusion and gate (the
   first pixel tile writes ``ca``), then the mean and max over C of ``x * ca`` on its pixel tile (grid
   ``(B, tiles)``);
3. :func:`.kernels.blend_kernel`: each program computes its sample's router from the per-tile sums of the
   descriptors, the routed branch convolutions and the spatial gate on its pixel tile, then blends every channel
   there (grid ``(B, tiles)``).

Saved for backward: ``ca`` ``(B, C)`` and ``sa`` ``(B, H * W)`` in ``x``'s dtype (``1 / (H W) + 1 / C`` of the
input; at most 0.022x at the stage shapes). Everything else is recomputed.

Backward, seven kernels (1-3 in :mod:`.kernels_backward_spatial`, 4-7 in :mod:`.kernels_backward_channel`):

1. ``backward_pool_kernel``, the two-axis reduction (grid ``(B, tiles)``): over C, the descriptors
   again, the ties at their max and ``sum_c g * alpha * y`` (the spatial map's gradient); over H, W, per tile, the
   channel pooling's sum, max and ties; alpha's gradient per tile;
2. ``backward_spatial_kernel`` (grid ``(B, tiles of 32 pixels)``): the spatial gate's backward and
   ``g_logit`` on the tile, and the tile's parts of the gradients of the branch kernels, biases, router weights and
   spatial temperature;
3. ``backward_router_kernel`` (grid ``(B,)``): those parts summed per sample, and the router's
   backward;
4. ``backward_channel_reduce_kernel`` (grid ``(B, tiles)``): the descriptors' gradient on the tile
   (the branches' transposed convolutions) and ``sum_hw g_y * x`` per channel (``ca``'s gradient);
5. ``backward_channel_kernel`` (grid ``(B,)``): the channel gate, fusion and MLP backward per sample;
6. ``backward_input_kernel`` (grid ``(B, tiles)``): the gradient of ``x``, written once (skipped
   where it is not needed);
7. ``finish_kernel``: the parameters' gradients summed over the batch (below).

Every reduction is a fixed-order sum of partials (one row per sample or per tile), with no atomics, so two runs
give bitwise-equal results. The per-sample kernels write the parameters' gradients to rows of a packed ``(B, P)``
buffer; the last kernel (``finish_kernel``) sums them over the batch and applies the chain rule of the
fusion softmax and the temperatures, so that the gradients come back as views of one buffer (cast only where a
parameter's dtype differs from float32).

Not given a kernel (:func:`supports` says why; route them to the reference): more than :data:`MAX_BRANCHES`
branches, branch kernels over :data:`MAX_KERNEL_SIZE`, dtypes other than float16/bfloat16/float32/float64, and
inputs on different devices. :func:`block_backward` is not itself differentiable: a backward pass with
``create_graph=True`` (double backward) must go through the reference. A non-contiguous (e.g. channels_last) ``x``
or ``grad_out`` is copied to contiguous first.

The block shapes (pixels per tile, channels per chunk, 4 warps) are chosen for the H200 by reasoning and by the
compiler's register counts (no spills at sm_90), not yet by measurement.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["MAX_BRANCHES", "MAX_KERNEL_SIZE", "block_backward", "block_forward", "saved_like", "supports"]

MAX_BRANCHES = 4
MAX_KERNEL_SIZE = 15

_ACTS = {"relu": 0, "silu": 1}  # the kernels' ACT and GATE codes
_GATES = {"sigmoid": 0, "hardsigmoid": 1}
_TILE = 2048  # elements of one (channels x pixels) tile: 16 per thread at 4 warps


@functools.lru_cache(maxsize=1)
def _kernels() -> SimpleNamespace:
    """The kernels of :mod:`.kernels`, :mod:`.kernels_backward_spatial` and :mod:`.kernels_backward_channel`, imported
    on first launch (so that :func:`saved_like` and :func:`supports` need no triton)."""
    from . import kernels, kernels_backward_channel, kernels_backward_spatial

    modules = (kernels, kernels_backward_spatial, kernels_backward_channel)
    found = {name: getattr(module, name) for module in modules for name in dir(module)
             if name.endswith("_kernel")}
    return SimpleNamespace(**found)


@functools.lru_cache(maxsize=1)
def _dtypes() -> dict:
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
            torch.float64: tl.float64}


def _pow2(n: int, low: int = 2) -> int:
    return max(low, 1 << max(0, int(n) - 1).bit_length())


def _launch(kernel, grid, *args, **meta) -> None:
    """Launch ``kernel`` directly on plain tensors, and through ``torch.library.wrap_triton`` while the call is traced
    (fake or functional tensors: torch.compile tracing a ``triton_op`` that calls these functions), so that the
    compiler sees the kernel. (``wrap_triton`` outside a ``triton_op`` dispatches through a higher-order operator in
    eager, about a millisecond per launch.)"""
    traced = any(isinstance(a, Tensor) and type(a) not in (Tensor, torch.nn.Parameter) for a in args)
    wrap = getattr(torch.library, "wrap_triton", None)
    (wrap(kernel) if traced and wrap is not None else kernel)[grid](*args, **meta)


def supports(x: Tensor, *tensors: Tensor | None, kernel_sizes: list[int] | None = None) -> str | None:
    """``None`` where the kernels run on these inputs, else the reason they do not (route those to the reference)."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        return f"dtype {x.dtype} has no kernel"
    if x.dim() != 4:
        return f"x must be (B, C, H, W), but got shape {tuple(x.shape)}"
    if any(t is not None and t.device != x.device for t in tensors):
        return "the tensors are on different devices"
    if kernel_sizes is not None:
        if not 1 <= len(kernel_sizes) <= MAX_BRANCHES:
            return f"{len(kernel_sizes)} branches: the kernels take 1 to {MAX_BRANCHES}"
        if max(kernel_sizes) > MAX_KERNEL_SIZE:
            return f"branch kernels up to {MAX_KERNEL_SIZE}, but got {max(kernel_sizes)}"
    return None


class _Plan(NamedTuple):
    """Sizes and block shapes of one call, shared by forward and backward (so backward's recomputation of the
    descriptors adds in forward's order)."""

    B: int
    C: int
    H: int
    W: int
    N: int
    RM: int
    RH: int
    K: int
    NB: int  # pixels per tile
    NBS: int  # pixels per chunk of the spatial backward (its tap tiles are taps x NBS)
    CB: int  # channels per chunk
    tiles: int
    NB1: int  # pixels per chunk of the channel pooling
    CB1: int  # channels per program of the channel pooling
    RB: int
    CBM: int
    RHB: int
    KB: int
    TPB: int
    branch_meta: dict
    acc: torch.dtype


def _plan(x: Tensor, fc1_weight: Tensor, router_fc1_weight: Tensor | None, branch_weights: list[Tensor],
          dilations: list[int]) -> _Plan:
    B, C, H, W = x.shape
    N = H * W
    RM = fc1_weight.shape[0]
    RH = 1 if router_fc1_weight is None else router_fc1_weight.shape[0]
    count = len(branch_weights)
    NB = min(64, _pow2(N, 16))
    CB = max(2, min(_pow2(C), _TILE // NB))
    NB1 = min(1024, _pow2(N, 16))
    CB1 = max(2, min(_pow2(C), _TILE // NB1))
    RB = _pow2(RM)
    tiles = -(-N // NB)
    meta = {}
    for k in range(MAX_BRANCHES):
        size = int(branch_weights[k].shape[-1]) if k < count else 1
        meta[f"KS{k}"] = size
        meta[f"D{k}"] = int(dilations[k]) if k < count else 1
        meta[f"TB{k}"] = _pow2(size * size)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    CBM = max(2, min(_pow2(C), _TILE // RB))
    return _Plan(B, C, H, W, N, RM, RH, count, NB, min(32, NB), CB, tiles, NB1, CB1, RB, CBM, _pow2(RH),
                 _pow2(count), min(1024, _pow2(tiles)), meta, acc)


def _c(t: Tensor | None, fallback: Tensor) -> Tensor:
    """``t`` contiguous, or ``fallback`` (a pointer the kernel never reads) where ``t`` is None."""
    if t is None:
        return fallback
    return t if t.is_contiguous() else t.contiguous()


def _branches(branch_weights: list[Tensor], branch_biases: list[Tensor]) -> list[Tensor]:
    """The branch kernels and biases interleaved, padded to MAX_BRANCHES with the first (never read there)."""
    out = []
    for k in range(MAX_BRANCHES):
        j = k if k < len(branch_weights) else 0
        out += [_c(branch_weights[j], branch_weights[0]), _c(branch_biases[j], branch_biases[0])]
    return out


def saved_like(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor, fc2_weight: Tensor, fc2_bias: Tensor,
               fusion_logits: Tensor | None, ca_temperature: Tensor, sa_temperature: Tensor, alpha: Tensor | None,
               router_fc1_weight: Tensor | None, router_fc1_bias: Tensor | None, router_fc2_weight: Tensor | None,
               router_fc2_bias: Tensor | None, branch_weights: list[Tensor], branch_biases: list[Tensor],
               dilations: list[int], act: str, ca_gate: str, sa_gate: str) -> list[Tensor]:
    """Empty tensors shaped as :func:`block_forward`'s ``saved`` (no data access: fake and meta tensors work)."""
    B, C, H, W = x.shape
    return [x.new_empty((B, C)), x.new_empty((B, H * W))]


def block_forward(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor, fc2_weight: Tensor, fc2_bias: Tensor,
                  fusion_logits: Tensor | None, ca_temperature: Tensor, sa_temperature: Tensor, alpha: Tensor | None,
                  router_fc1_weight: Tensor | None, router_fc1_bias: Tensor | None,
                  router_fc2_weight: Tensor | None, router_fc2_bias: Tensor | None, branch_weights: list[Tensor],
                  branch_biases: list[Tensor], dilations: list[int], act: str, ca_gate: str,
                  sa_gate: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
    """The block in three kernels (module docstring).

    Returns:
        tuple: ``(out, ca (B, C, 1, 1), sa (B, 1, H, W), fusion_w (2,), router_w (B, K), saved)``, the maps in
        ``x``'s dtype; ``saved`` goes to :func:`block_backward`.
    """
    K = _kernels()
    x = _c(x, x)
    p = _plan(x, fc1_weight, router_fc1_weight, branch_weights, dilations)
    xdt = _dtypes()[x.dtype]
    acc = _dtypes()[p.acc]
    avg = x.new_empty((p.B, p.C), dtype=p.acc)
    mx = x.new_empty((p.B, p.C), dtype=p.acc)
    _launch(K.channel_pool_kernel, (p.B, -(-p.C // p.CB1)), x, avg, mx, p.C, p.N, CB=p.CB1, NB=p.NB1, ACC=acc)

    ca = x.new_empty((p.B, p.C, 1, 1))
    ca_saved = x.new_empty((p.B, p.C))
    fusion_w = x.new_empty((2,))
    s = x.new_empty((p.B, 2, p.N), dtype=p.acc)
    spart = x.new_empty((p.B, p.tiles, 2), dtype=p.acc)
    _launch(K.spatial_pool_kernel, (p.B, p.tiles), x, avg, mx, _c(fc1_weight, x), _c(fc1_bias, x),
            _c(fc2_weight, x), _c(fc2_bias, x), _c(fusion_logits, x), _c(ca_temperature, x), ca, ca_saved, fusion_w,
            s, spart, p.C, p.N, p.RM, p.tiles, HAS_FUSION=fusion_logits is not None, ACT=_ACTS[act],
            GATE=_GATES[ca_gate], CB=p.CB, NB=p.NB, RB=p.RB, CBM=p.CBM, XDT=xdt, ACC=acc)

    out = torch.empty_like(x)
    sa = x.new_empty((p.B, 1, p.H, p.W))
    sa_saved = x.new_empty((p.B, p.N))
    router_w = x.new_empty((p.B, p.K))
    _launch(K.blend_kernel, (p.B, p.tiles), x, s, spart, _c(router_fc1_weight, x), _c(router_fc1_bias, x),
            _c(router_fc2_weight, x), _c(router_fc2_bias, x), *_branches(branch_weights, branch_biases),
            _c(sa_temperature, x), _c(alpha, x), ca_saved, out, sa, sa_saved, router_w, p.C, p.H, p.W, p.N, p.RH,
            p.tiles, K=p.K, **p.branch_meta, GATE=_GATES[sa_gate], HAS_ALPHA=alpha is not None, CB=p.CB, NB=p.NB,
            RHB=p.RHB, KB=p.KB, TPB=p.TPB, XDT=xdt, ACC=acc)
    return out, ca, sa, fusion_w, router_w, [ca_saved, sa_saved]


def _layout(p: _Plan) -> dict[str, int]:
    """Offsets in a row of the packed per-sample gradient buffer; ``"P"`` is the row's length."""
    sizes = [("fc1w", p.RM * p.C), ("fc1b", p.RM), ("fc2w", p.C * p.RM), ("fc2b", p.C), ("fw", 2), ("tca", 1),
             ("tsa", 1), ("alpha", 1), ("router", (3 * p.RH + p.K * p.RH + p.K) if p.K > 1 else 0), ("bias", p.K)]
    sizes += [(f"branch{k}", 2 * p.branch_meta[f"KS{k}"] ** 2 if k < p.K else 0) for k in range(MAX_BRANCHES)]
    offsets, at = {}, 0
    for name, size in sizes:
        offsets[name] = at
        at += size
    offsets["P"] = at
    return offsets


def block_backward(grad_out: Tensor | None, grad_ca: Tensor | None, grad_sa: Tensor | None,
                   grad_fusion_w: Tensor | None, grad_router_w: Tensor | None, x: Tensor, fc1_weight: Tensor,
                   fc1_bias: Tensor, fc2_weight: Tensor, fc2_bias: Tensor, fusion_logits: Tensor | None,
                   ca_temperature: Tensor, sa_temperature: Tensor, alpha: Tensor | None,
                   router_fc1_weight: Tensor | None, router_fc1_bias: Tensor | None,
                   router_fc2_weight: Tensor | None, router_fc2_bias: Tensor | None, branch_weights: list[Tensor],
                   branch_biases: list[Tensor], saved: list[Tensor], dilations: list[int], act: str, ca_gate: str,
                   sa_gate: str, needs: list[bool]) -> list[Tensor | None]:
    """The gradients of ``[x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, fusion_logits, ca_temperature,
    sa_temperature, alpha, router_fc1_weight, router_fc1_bias, router_fc2_weight, router_fc2_bias, *branch_weights,
    *branch_biases]`` in seven kernels (module docstring), each in its input's dtype and shape; ``None`` where the
    input is None or not needed. Any ``grad_*`` may be None (zero)."""
    K = _kernels()
    x = _c(x, x)
    p = _plan(x, fc1_weight, router_fc1_weight, branch_weights, dilations)
    xdt = _dtypes()[x.dtype]
    acc = _dtypes()[p.acc]
    ca, sa = saved
    grad_out = torch.zeros_like(x) if grad_out is None else _c(grad_out, x)
    has_alpha = alpha is not None
    new = lambda *shape: x.new_empty(shape, dtype=p.acc)  # noqa: E731

    s, ties_c, gsum, spart = new(p.B, 2, p.N), new(p.B, p.N), new(p.B, p.N), new(p.B, p.tiles, 2)
    psum, pmax, pcnt, palpha = new(p.B, p.tiles, p.C), new(p.B, p.tiles, p.C), new(p.B, p.tiles, p.C), new(
        p.B, p.tiles)
    _launch(K.backward_pool_kernel, (p.B, p.tiles), x, grad_out, ca, sa, _c(alpha, x), s, ties_c, gsum, spart, psum,
            pmax, pcnt, palpha, p.C, p.N, p.tiles, HAS_ALPHA=has_alpha, CB=p.CB, NB=p.NB, XDT=xdt, ACC=acc)

    lay = _layout(p)
    grads = new(p.B, lay["P"])
    # The spatial backward's per-tile parts: [T_sa, router (K), then biases and kernels as in grad's rows].
    Q = 1 + p.K + (lay["P"] - lay["bias"])
    q_branch = [1 + p.K + lay[f"branch{k}"] - lay["bias"] for k in range(1, MAX_BRANCHES)]
    tiles_s = -(-p.N // p.NBS)
    glogit, part, gpool = new(p.B, p.N), new(p.B, tiles_s, Q), new(p.B, 2)
    router_args = (_c(router_fc1_weight, x), _c(router_fc1_bias, x), _c(router_fc2_weight, x), _c(router_fc2_bias, x))
    branch_args = _branches(branch_weights, branch_biases)
    _launch(K.backward_spatial_kernel, (p.B, tiles_s), s, spart, gsum, _c(grad_sa, x), *router_args, *branch_args,
            _c(sa_temperature, x), glogit, part, Q, *q_branch, p.H, p.W, p.N, p.RH, p.tiles, tiles_s, K=p.K,
            **p.branch_meta, GATE=_GATES[sa_gate], HAS_GSA=grad_sa is not None, NB=p.NBS, RHB=p.RHB, KB=p.KB,
            TPB=p.TPB, ACC=acc)
    _launch(K.backward_router_kernel, (p.B,), part, Q, tiles_s, spart, _c(grad_router_w, x), *router_args, gpool,
            grads, lay["P"], lay["tsa"], lay["router"], lay["bias"], p.N, p.RH, p.tiles, K=p.K,
            HAS_GRW=grad_router_w is not None, QB=_pow2(Q), RHB=p.RHB, KB=p.KB, TPB=p.TPB, ACC=acc)

    gs, pg = new(p.B, 2, p.N), new(p.B, p.tiles, p.C)
    _launch(K.backward_channel_reduce_kernel, (p.B, p.tiles), x, grad_out, ca, sa, _c(alpha, x), s, ties_c, spart,
            *router_args, *branch_args, glogit, gpool, gs, pg, p.C, p.H, p.W, p.N, p.RH, p.tiles, K=p.K,
            **p.branch_meta, HAS_ALPHA=has_alpha, CB=p.CB, NB=p.NB, RHB=p.RHB, KB=p.KB, TPB=p.TPB, XDT=xdt, ACC=acc)

    avg, mx, ties_hw, g_avg, g_max = (new(p.B, p.C) for _ in range(5))
    _launch(K.backward_channel_kernel, (p.B,), psum, pmax, pcnt, pg, palpha, _c(grad_ca, x), _c(fc1_weight, x),
            _c(fc1_bias, x), _c(fc2_weight, x), _c(fc2_bias, x), _c(fusion_logits, x), _c(ca_temperature, x), avg,
            mx, ties_hw, g_avg, g_max, grads, lay["P"], lay["fc1w"], lay["fc1b"], lay["fc2w"], lay["fc2b"],
            lay["fw"], lay["tca"], lay["alpha"], p.C, p.N, p.RM, p.tiles, HAS_FUSION=fusion_logits is not None,
            HAS_GCA=grad_ca is not None, ACT=_ACTS[act], GATE=_GATES[ca_gate], CB=p.CB, RB=p.RB, CBM=p.CBM,
            TPB=p.TPB, ACC=acc)

    grad_x = None
    if needs[0]:
        grad_x = torch.empty_like(x)
        _launch(K.backward_input_kernel, (p.B, p.tiles), x, grad_out, ca, sa, _c(alpha, x), s, ties_c, gs, g_avg,
                g_max, mx, ties_hw, grad_x, p.C, p.N, HAS_ALPHA=has_alpha, CB=p.CB, NB=p.NB, XDT=xdt, ACC=acc)

    P = lay["P"]
    total = x.new_empty((P + 4,), dtype=p.acc)
    _launch(K.finish_kernel, (-(-P // 1024),), grads, total, _c(fusion_logits, x), _c(grad_fusion_w, x),
            _c(ca_temperature, x), _c(sa_temperature, x), p.B, P, lay["fw"], lay["tca"], lay["tsa"],
            HAS_FUSION=fusion_logits is not None, HAS_GFW=grad_fusion_w is not None, PB=1024, ACC=acc)
    at = lambda name, size: total[lay[name] : lay[name] + size]  # noqa: E731
    found: list[Tensor | None] = [
        grad_x,
        at("fc1w", p.RM * p.C),
        at("fc1b", p.RM),
        at("fc2w", p.C * p.RM),
        at("fc2b", p.C),
        total[P : P + 2] if fusion_logits is not None else None,
        total[P + 2],
        total[P + 3],
        at("alpha", 1) if has_alpha else None,
    ]
    router = at("router", 3 * p.RH + p.K * p.RH + p.K) if p.K > 1 else None
    if router is None:
        found += [None] * 4
    else:
        found += [router[: 2 * p.RH], router[2 * p.RH : 3 * p.RH], router[3 * p.RH : 3 * p.RH + p.K * p.RH],
                  router[3 * p.RH + p.K * p.RH :]]
    found += [at(f"branch{k}", 2 * p.branch_meta[f"KS{k}"] ** 2) for k in range(p.K)]
    found += [at("bias", p.K)[k : k + 1] for k in range(p.K)]

    inputs = [x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, fusion_logits, ca_temperature, sa_temperature, alpha,
              router_fc1_weight, router_fc1_bias, router_fc2_weight, router_fc2_bias, *branch_weights,
              *branch_biases]
    result: list[Tensor | None] = []
    for grad, tensor, need in zip(found, inputs, needs, strict=True):
        if grad is None or tensor is None or not need:
            result.append(None)
            continue
        result.append(grad.reshape(tensor.shape).to(tensor.dtype))
    return result
