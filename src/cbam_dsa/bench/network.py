"""The whole-network figure: one training step of timm's resnet50 with each attention layer, eager (contiguous and
channels_last) and compiled."""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..block import CBAMResidualDynamicSA
from .memory import counting_faults
from .timing import interleaved_times, paired_comparison, round_ratio, timed_faults

__all__ = ["NETWORK_LABELS", "measure_network"]

NETWORK_LABELS = {
    "plain": "resnet50, no attention",
    "se": "+ timm SEModule",
    "cbam": "+ timm CbamModule",
    "ours_operator": "+ ours, operator",
    "ours_reference": "+ ours, reference path",
    "plain_channels_last": "resnet50 in channels_last, no attention",
    "se_channels_last": "+ timm SEModule, channels_last",
    "cbam_channels_last": "+ timm CbamModule, channels_last",
    "ours_channels_last": "+ ours, channels_last",
    "plain_compiled": "resnet50 + compile, no attention",
    "se_compiled": "+ timm SEModule, compiled",
    "cbam_compiled": "+ timm CbamModule, compiled",
    "ours_compiled": "+ ours, compiled",
}
"""Display names, in the order of the table."""

_KINDS = ("_channels_last", "_compiled")
"""The variants' kinds besides eager on contiguous tensors: each kind's overhead is against its own plain network."""


def _baseline(name: str) -> str:
    return "plain" + next((kind for kind in _KINDS if name.endswith(kind)), "")


_ATTENTION = {"plain": None, "se": "se", "cbam": "cbam", "ours": CBAMResidualDynamicSA}


def _network(attn: Any, num_classes: int, device: str, dtype: torch.dtype) -> nn.Module:
    import timm

    block_args = {} if attn is None else {"block_args": {"attn_layer": attn}}
    model = timm.create_model("resnet50", pretrained=False, num_classes=num_classes, **block_args)
    return model.to(device=device, dtype=dtype).train()


def _variants(compile: bool, device: str, dtype: torch.dtype) -> dict[str, nn.Module]:
    variants = {
        "plain": _network(None, 10, device, dtype),
        "se": _network("se", 10, device, dtype),
        "cbam": _network("cbam", 10, device, dtype),
        "ours_operator": _network(CBAMResidualDynamicSA, 10, device, dtype),
        "ours_reference": _network(CBAMResidualDynamicSA, 10, device, dtype),
    }
    for module in variants["ours_reference"].modules():
        if isinstance(module, CBAMResidualDynamicSA):
            module.fast_path = False
    for name, attn in _ATTENTION.items():  # the model and its input in channels_last, as for a GPU or after inductor
        variants[f"{name}_channels_last"] = _network(attn, 10, device, dtype).to(memory_format=torch.channels_last)
    if compile:
        for name, attn in _ATTENTION.items():
            variants[f"{name}_compiled"] = torch.compile(_network(attn, 10, device, dtype), fullgraph=True)
    return variants


def measure_network(
    settings: Any, dtype: torch.dtype, log: Callable[[str], None] = lambda line: None
) -> dict[str, Any]:
    """The time of one training step (forward, cross-entropy, backward, SGD step) of timm's resnet50 with each
    attention layer, and each one's overhead over the plain network: the median over rounds of
    ``time / plain time - 1`` (compiled variants against the compiled plain network).

    ``settings`` is a :class:`.measure.Settings`; ``settings.network_compile`` adds the compiled variants, whose
    compilation (the first step) is not timed. A compiled variant that fails is dropped and its error reported. The
    ``*_channels_last`` variants run the model and its input in channels_last (overhead against the plain network so).
    """
    device = settings.device
    torch.manual_seed(settings.seed)
    variants = _variants(settings.network_compile, device, dtype)
    size = settings.network_size
    images = torch.randn(settings.network_batch, 3, size, size, device=device, dtype=dtype)
    images_channels_last = images.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 10, (settings.network_batch,), device=device)
    faults: dict[str, list[int]] = {name: [] for name in variants}
    mixed = settings.network_autocast
    autocast = torch.autocast(device, dtype=getattr(torch, mixed)) if mixed else contextlib.nullcontext()

    def step(model: nn.Module, name: str) -> Callable[[], None]:
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        inputs = images_channels_last if name.endswith("_channels_last") else images

        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = nn.functional.cross_entropy(model(inputs), targets)
            loss.backward()
            optimizer.step()

        return run

    fns = {name: counting_faults(step(model, name), faults[name]) for name, model in variants.items()}
    errors: dict[str, str] = {}
    for name in [n for n in fns if n.endswith("_compiled")]:
        log(f"  compiling {name} ...")
        try:  # compile outside the timing; a compiler missing on this machine drops the compiled rows only
            fns[name]()
        except Exception as error:  # reported in the results
            errors[name] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            del fns[name]
    times = interleaved_times(fns, settings.network_rounds, 1, device, settings.seed)
    results = {}
    for name, values in times.items():
        plain = _baseline(name)
        ratio = round_ratio(times, name, plain)
        results[name] = {
            "label": NETWORK_LABELS[name],
            "step": {"min_ms": min(values) * 1e3, "median_ms": statistics.median(values) * 1e3},
            "overhead": None if name == plain or ratio is None else ratio - 1.0,
            "parameters": sum(p.numel() for p in variants[name].parameters()),
            "page_faults": timed_faults(faults[name], len(values)),
        }
    network = {
        "model": "timm resnet50, num_classes=10",
        "input": [settings.network_batch, 3, size, size],
        "autocast": mixed,
        "variants": results,
        "errors": errors,
        "ours_vs_se": paired_comparison(times["ours_operator"], times["se"]),
    }
    for kind in _KINDS:
        if f"ours{kind}" in times and f"se{kind}" in times:
            network[f"ours_vs_se{kind}"] = paired_comparison(times[f"ours{kind}"], times[f"se{kind}"])
    return network
