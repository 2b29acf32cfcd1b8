"""Helpers shared by the benchmark tool's tests (``test_bench*.py``): a results file's content, made up."""

from __future__ import annotations

__all__ = ["fake_results"]


def _summary(ratio):
    return {"min_ms": 1.0, "median_ms": 1.0, "ratio": ratio}


def fake_results(network=None, **ratios):
    def contender(label, forward, train, saved=0.01):
        return {
            "label": label,
            "forward": _summary(forward),
            "forward_backward": _summary(train),
            "saved_bytes": 10,
            "saved_ratio": saved,
            "peak_bytes": None,
        }

    entry = {
        "shape": [32, 512, 7, 7],
        "input_bytes": 1000,
        "contenders": {
            "timm_cbam": contender("timm CbamModule", 1.0, 1.0, 1.0),
            "ours_operator": contender("ours, operator", ratios.get("forward", 0.5), ratios.get("train", 0.4)),
            "ours_no_compiler": contender("ours, no compiler", 0.7, ratios.get("no_compiler", 0.79)),
        },
        "pairs": {
            "ours_compiled/ours_operator": {"forward": 1.0, "forward_backward": ratios.get("vs_eager", 1.1)},
            "ours_compiled/timm_cbam_compiled": {"forward": 0.4, "forward_backward": ratios.get("vs_timm", 0.6)},
        },
        "errors": {},
        "peak_memory_method": "not measured",
    }
    results = {
        "settings": {"device": "cpu", "dtype": "float32", "rounds": 3, "command": "cbam-dsa bench"},
        "machine": {
            "date": "d",
            "cpu": "A CPU",
            "threads": 2,
            "cpu_count": 2,
            "torch": "2.x",
            "python": "3",
            "platform": "p",
        },
        "shapes": [entry],
    }
    if network is not None:
        results["network"] = network
    return results
