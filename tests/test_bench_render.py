"""Rendering in the benchmark tool (``cbam_dsa.bench``): the targets table, result files written by earlier versions,
and the per-call overhead sentence.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench_helpers import fake_results
from cbam_dsa import bench

pytest.importorskip("timm")
pytest.importorskip("matplotlib")


def test_targets_are_checked_against_their_limits():
    targets = bench.render_targets(fake_results())
    assert targets.startswith("### Targets (this run)")
    header, _, row = targets.splitlines()[2:5]
    assert "(<= 0.55)" in header and "(<= 0.35)" in header and "(<= 1.15)" in header and "(<= 0.5)" in header
    assert "(<= 0.8)" in header
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells == ["32x512x7x7", "0.500 (met)", "0.400 (missed)", "1.100 (met)", "0.600 (missed)", "0.790 (met)",
                     "0.010 (met)"]  # fmt: skip
    flipped = bench.render_targets(fake_results(forward=0.56, train=0.35, vs_eager=1.16, vs_timm=0.5, no_compiler=0.81))
    cells = [cell.strip() for cell in flipped.splitlines()[4].strip("|").split("|")]
    assert [cell.split()[1] for cell in cells[1:6]] == ["(missed)", "(met)", "(missed)", "(met)", "(missed)"]
    gpu = fake_results()
    gpu["settings"]["device"] = "cuda"
    assert bench.render_targets(gpu) is None


def test_results_written_before_the_operator_still_render():
    paths = sorted((Path(__file__).parents[1] / "benchmarks").glob("results-*.json"))
    for path in paths:
        results = json.loads(path.read_text())
        assert "## " in bench.render_markdown([results]) and bench.render_table(results)
    old = fake_results()
    old["shapes"][0]["contenders"]["ours_fast"] = old["shapes"][0]["contenders"].pop("ours_operator")
    del old["shapes"][0]["pairs"], old["shapes"][0]["contenders"]["ours_no_compiler"]
    markdown = bench.render_markdown([old])
    assert "This run predates the operator" in markdown
    assert "3 interleaved rounds, " in markdown  # no claim of balanced orders for results that do not record them
    assert "| 32x512x7x7 | 0.500 (met) | 0.400 (missed) | - | - | - | 0.010 (met) |" in markdown


def test_overhead_sentence_names_the_three_calls():
    overhead = {
        "shape": [32, 512, 7, 7],
        "calls_per_sample": 20,
        "fused_kernels": True,
        "median_us": {"block": 1000.0, "operator": 950.0, "implementation": 900.0},
        "min_us": {"block": 990.0, "operator": 940.0, "implementation": 890.0},
        "operator_overhead_us": 50.0,
        "module_overhead_us": 50.0,
        "operator_overhead_ratio": 0.05,
    }
    text = bench.render_overhead(overhead)
    assert "the operator adds 50.0 µs per call (5.0% of the block's call)" in text
    assert "below the autograd key: the C++ kernel over the C kernels" in text
    assert bench.render_overhead(None) is None
