"""The Triton block against the reference, run under Triton's interpreter on CPU tensors.

Run as a script (``python tests/triton_cases.py [NAME ...]``): it sets ``TRITON_INTERPRET=1`` before triton is
imported, runs the cases and prints one JSON object, ``{name: {"errors": {...}, "masks": [...], "bitwise": bool}}``.
``tests/test_cuda_triton.py`` runs it in a subprocess (other tests may have imported triton already) and checks the
figures. Also imported by ``benchmarks/gpu_check.py`` for the same comparison on a GPU.
"""

from __future__ import annotations

import json
import os
import sys

if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "1"

import torch

from cbam_dsa import functional as FA

# name: (shape, dtype, config). Config keys: kernels [(size, dilation)], fusion ("softmax"|"sum"), act, ca_gate,
# sa_gate, ca_t, sa_t, alpha (None = no residual), hidden, router_hidden, special ("ties"|"nan"|"inf"), maps
# (loss on the maps too), no_out_grad (no loss on the output: its gradient is None), skip (inputs whose gradient is
# not asked for), params (the parameters' dtype), repeat (check that two runs are bitwise equal).
CASES: dict[str, tuple[tuple[int, int, int, int], torch.dtype, dict]] = {
    "default_f32": ((2, 8, 5, 6), torch.float32, {"repeat": True}),
    # torch's hardsigmoid backward multiplies by a float32 1/6 even in float64, so the hard gates run in float32.
    "hard_gates_f32": ((2, 6, 4, 7), torch.float32,
                       {"ca_gate": "hardsigmoid", "sa_gate": "hardsigmoid", "ca_t": 0.7, "sa_t": 1.6, "alpha": 0.6}),
    "silu_sum_f64": ((2, 6, 4, 7), torch.float64, {"fusion": "sum", "act": "silu", "ca_t": 0.7, "sa_t": 1.6,
                                                    "alpha": 0.6}),
    "maps_bf16": ((2, 8, 5, 6), torch.bfloat16, {"maps": True, "repeat": True}),
    "maps_f16_params_f32": ((2, 8, 4, 5), torch.float16, {"maps": True, "params": torch.float32, "alpha": 0.8}),
    "one_branch_no_residual": ((2, 5, 6, 5), torch.float32, {"kernels": [(5, 1)], "alpha": None}),
    "four_branches_dilated": ((1, 4, 9, 8), torch.float32,
                              {"kernels": [(1, 1), (3, 1), (3, 3), (5, 2)], "alpha": 1.3, "router_hidden": 3}),
    "maps_temperatures": ((2, 8, 5, 5), torch.float32, {"maps": True, "ca_t": 1.4, "sa_t": 0.8, "alpha": 0.5}),
    # On a 1x1 map mean and max agree, so the fusion logits' gradient is 0 up to rounding: sum fusion there.
    "one_by_one_map_b1": ((1, 16, 1, 1), torch.float32, {"fusion": "sum"}),
    "one_channel": ((2, 1, 5, 4), torch.float32, {"hidden": 1}),
    "large_c_tiny_map": ((2, 300, 2, 3), torch.float32, {"hidden": 19}),
    "tiny_c_large_map": ((1, 2, 15, 13), torch.float32, {"hidden": 2}),
    "ties": ((2, 6, 4, 5), torch.float32, {"special": "ties"}),
    "ties_bf16_params_f32": ((2, 6, 4, 5), torch.bfloat16, {"special": "ties", "maps": True, "params": torch.float32}),
    "maps_only_partial_needs": ((2, 6, 4, 4), torch.float32,
                                {"maps": True, "no_out_grad": True, "skip": ["x", "fc2_bias", "alpha"]}),
    "nan": ((3, 6, 5, 4), torch.float32, {"special": "nan", "maps": True, "repeat": True}),
    "inf": ((3, 6, 5, 4), torch.float32, {"special": "inf", "ca_gate": "hardsigmoid"}),
}
LOW_PRECISION = (torch.bfloat16, torch.float16)

GRAD_NAMES = ["x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "fusion_logits", "ca_temperature",
              "sa_temperature", "alpha", "router_fc1_weight", "router_fc1_bias", "router_fc2_weight",
              "router_fc2_bias"]


def build(shape: tuple[int, int, int, int], dtype: torch.dtype, config: dict, device: str = "cpu",
          seed: int = 0) -> dict:
    """Inputs, parameters and output gradients for one case."""
    gen = torch.Generator().manual_seed(seed)
    B, C, H, W = shape
    pdt = config.get("params", dtype)
    kernels = config.get("kernels", [(3, 1), (7, 1), (7, 2)])
    hidden = config.get("hidden", max(2, C // 2))
    rh = config.get("router_hidden", 4)
    count = len(kernels)

    def rand(*size: int, scale: float = 1.0, dt: torch.dtype = pdt) -> torch.Tensor:
        return (torch.randn(size, generator=gen, dtype=torch.float64) * scale).to(dt).to(device)

    x = rand(*shape, dt=dtype)
    special = config.get("special")
    if special == "ties":  # exact ties in both maxima: repeated values over H, W and over C
        x = rand(B, C, 1, 1, dt=dtype).expand(B, C, H, W).clone()
        x[:, :, ::2] = rand(B, 1, 1, W, dt=dtype).abs() + 3.0
    elif special in ("nan", "inf"):
        value = float("nan") if special == "nan" else float("inf")
        x[1, 2, 1, 1] = value
        x[2, 0, 3, 2] = -value
    alpha = config.get("alpha", 1.0)
    return {
        "x": x,
        "fc1_weight": rand(hidden, C, 1, 1, scale=C**-0.5),
        "fc1_bias": rand(hidden, scale=0.1),
        "fc2_weight": rand(C, hidden, 1, 1, scale=hidden**-0.5),
        "fc2_bias": rand(C, scale=0.1),
        "fusion_logits": rand(2) if config.get("fusion", "softmax") == "softmax" else None,
        "ca_temperature": torch.tensor(config.get("ca_t", 1.0), dtype=pdt, device=device),
        "sa_temperature": torch.tensor(config.get("sa_t", 1.0), dtype=pdt, device=device),
        "alpha": None if alpha is None else torch.tensor(alpha, dtype=pdt, device=device),
        "router_fc1_weight": rand(rh, 2, 1, 1) if count > 1 else None,
        "router_fc1_bias": rand(rh, scale=0.1) if count > 1 else None,
        "router_fc2_weight": rand(count, rh, 1, 1, scale=rh**-0.5) if count > 1 else None,
        "router_fc2_bias": rand(count, scale=0.1) if count > 1 else None,
        "branch_weights": [rand(1, 2, k, k, scale=0.3 / k) for k, _ in kernels],
        "branch_biases": [rand(1, scale=0.1) for _ in kernels],
        "dilations": [d for _, d in kernels],
        "act": config.get("act", "relu"),
        "ca_gate": config.get("ca_gate", "sigmoid"),
        "sa_gate": config.get("sa_gate", "sigmoid"),
        "grad_out": None if config.get("no_out_grad") else rand(*shape, dt=dtype),
        "skip": list(config.get("skip", [])),
        "grad_maps": [rand(B, C, 1, 1, dt=dtype), rand(B, 1, H, W, dt=dtype), rand(2, dt=dtype),
                      rand(B, count, dt=dtype)] if config.get("maps") else [None] * 4,
    }


def _tensors(case: dict) -> list:
    return [case[name] for name in GRAD_NAMES] + case["branch_weights"] + case["branch_biases"]


def _leaves(case: dict) -> dict:
    out = dict(case)
    for name in GRAD_NAMES:
        if out[name] is not None:
            out[name] = out[name].detach().clone().requires_grad_()
    out["branch_weights"] = [t.detach().clone().requires_grad_() for t in case["branch_weights"]]
    out["branch_biases"] = [t.detach().clone().requires_grad_() for t in case["branch_biases"]]
    return out


def _reference_call(c: dict) -> tuple:
    router = None
    if c["router_fc1_weight"] is not None:
        router = (c["router_fc1_weight"], c["router_fc1_bias"], c["router_fc2_weight"], c["router_fc2_bias"])
    return FA.cbam_residual_dynamic_sa(
        c["x"], (c["fc1_weight"], c["fc1_bias"], c["fc2_weight"], c["fc2_bias"]), c["fusion_logits"],
        c["branch_weights"], c["branch_biases"], c["dilations"], router, c["alpha"], c["act"], c["ca_gate"],
        c["ca_temperature"], c["sa_gate"], c["sa_temperature"])


def reference_outputs(case: dict) -> tuple:
    """The reference's outputs alone (no autograd graph needed)."""
    return _reference_call(case)


def reference(case: dict) -> tuple[list, list]:
    """Outputs and gradients by autograd through :func:`functional.cbam_residual_dynamic_sa`."""
    c = _leaves(case)
    outs = _reference_call(c)
    loss = 0.0 if c["grad_out"] is None else (outs[0].double() * c["grad_out"].double()).sum()
    for out, grad in zip(outs[1:], c["grad_maps"], strict=True):
        if grad is not None:
            loss = loss + (out.double() * grad.double()).sum()
    leaves = [t for t in _tensors(c) if t is not None]
    found = iter(torch.autograd.grad(loss, leaves, allow_unused=True))
    grads = [None if t is None else next(found) for t in _tensors(c)]
    skipped = [name in c["skip"] for name in GRAD_NAMES] + [False] * (len(grads) - len(GRAD_NAMES))
    return [o.detach() for o in outs], [None if skip else g for g, skip in zip(grads, skipped, strict=True)]


def fused(case: dict) -> tuple[list, list]:
    """Outputs and gradients by :mod:`cbam_dsa.ops.cuda.block`."""
    from cbam_dsa.ops.cuda import block

    args = [case[name] for name in GRAD_NAMES] + [case["branch_weights"], case["branch_biases"]]
    spec = [case["dilations"], case["act"], case["ca_gate"], case["sa_gate"]]
    out, ca, sa, fw, rw, saved = block.block_forward(*args, *spec)
    assert [tuple(t.shape) for t in saved] == [tuple(t.shape) for t in block.saved_like(*args, *spec)]
    names = GRAD_NAMES + [""] * (len(case["branch_weights"]) + len(case["branch_biases"]))
    needs = [t is not None and name not in case["skip"] for t, name in zip(_tensors(case), names, strict=True)]
    grads = block.block_backward(case["grad_out"], *case["grad_maps"], *args, saved, *spec, needs)
    return [out, ca, sa, fw, rw], grads


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def upcast(case: dict) -> dict:
    """The case in float64 (the truth the low-precision results are measured against)."""
    def up(t):
        if isinstance(t, list):
            return [up(u) for u in t]
        return t.double() if isinstance(t, torch.Tensor) else t
    return {name: up(value) for name, value in case.items()}


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max |got - want|`` over want's finite entries, relative to want's largest finite magnitude."""
    w, g = want.double().cpu(), got.double().cpu()
    finite = torch.isfinite(w)
    if not finite.any():
        return 0.0
    scale = w[finite].abs().max().clamp_min(1e-6)
    return float(((w - g)[finite].abs().max() / scale).item())


def result_names(case: dict) -> list[str]:
    names = ["out", "ca", "sa", "fusion_w", "router_w"] + [f"grad_{n}" for n in GRAD_NAMES]
    names += [f"grad_branch_weight{k}" for k in range(len(case["branch_weights"]))]
    names += [f"grad_branch_bias{k}" for k in range(len(case["branch_biases"]))]
    return names


def _flat(results: tuple[list, list]) -> list:
    return [*results[0], *results[1]]


def compare(case: dict, repeat: bool = True) -> dict:
    """The fused results against the reference in the same dtype: ``errors`` (relative to each reference tensor's
    largest finite magnitude), ``masks`` (names whose NaN or non-finite masks differ), ``shapes`` (names whose
    shape, dtype or presence differ) and ``bitwise`` (two fused runs equal bit for bit, with ``repeat``). For
    float16 and bfloat16 also ``truth`` and ``reference_truth``: the fused and the reference errors against the
    reference in float64 on the same inputs."""
    want = _flat(reference(case))
    got = _flat(fused(case))
    again = _flat(fused(case)) if repeat else got
    truth = _flat(reference(upcast(case))) if case["x"].dtype in LOW_PRECISION else None
    report: dict = {"errors": {}, "masks": [], "shapes": [], "bitwise": True, "truth": {}, "reference_truth": {}}
    for i, name in enumerate(result_names(case)):
        w, g = want[i], got[i]
        if w is None or g is None:
            if (w is None) != (g is None):
                report["shapes"].append(name)
            continue
        if g.shape != w.shape or g.dtype != w.dtype or g.device != w.device:
            report["shapes"].append(name)
            continue
        report["bitwise"] &= _bits(g) == _bits(again[i])
        same_nan = torch.equal(torch.isnan(w), torch.isnan(g))
        if not same_nan or not torch.equal(torch.isfinite(w), torch.isfinite(g)):
            report["masks"].append(name)
            continue
        report["errors"][name] = _error(g, w)
        if truth is not None:
            report["truth"][name] = _error(g, truth[i])
            report["reference_truth"][name] = _error(w, truth[i])
    return report


def main(names: list[str]) -> None:
    results = {}
    for name in names or list(CASES):
        shape, dtype, config = CASES[name]
        results[name] = compare(build(shape, dtype, config), repeat=config.get("repeat", False))
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
