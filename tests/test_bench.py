"""The benchmark tool (``cbam_dsa.bench``, ``cbam-dsa bench``): that it runs and reports correctly, not its numbers."""

from __future__ import annotations

import itertools
import json
import sys

import pytest
import torch
from torch import nn

from cbam_dsa import bench, cli

pytest.importorskip("timm")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``cbam-dsa bench --quick`` run, with the resnet50 step, written to a temporary folder."""
    out = tmp_path_factory.mktemp("bench")
    code = cli.main(["bench", "--quick", "--seed", "5", "--out", str(out), "--markdown", str(out / "BENCHMARKS.md")])
    return code, out


@pytest.mark.slow
def test_quick_run_writes_json_table_chart_and_markdown(quick_run, capsys):
    code, out = quick_run
    assert code == 0
    results = json.loads((out / "results-cpu-float32.json").read_text())
    assert results["settings"]["shapes"] == [list(s) for s in bench.QUICK_SHAPES]
    assert results["settings"]["seed"] == 5
    assert results["machine"]["torch"] == torch.__version__
    contenders = {"timm_cbam", "timm_se", "ours_reference", "ours_fast"}
    for entry in results["shapes"]:
        assert set(entry["contenders"]) == contenders
        b, c, h, w = entry["shape"]
        assert entry["input_bytes"] == b * c * h * w * 4
        for name, result in entry["contenders"].items():
            for figure in ("forward", "forward_backward"):
                summary = result[figure]
                assert 0 < summary["min_ms"] <= summary["median_ms"]
                assert summary["ratio"] > 0
            assert result["saved_ratio"] == pytest.approx(result["saved_bytes"] / entry["input_bytes"])
            assert result["peak_bytes"] is None or result["peak_bytes"] >= 0
            if name == "timm_cbam":
                assert result["forward"]["ratio"] == result["forward_backward"]["ratio"] == 1.0
        # the fast path keeps far less for backward than timm (which keeps about the input's size again)
        saved = {name: result["saved_bytes"] for name, result in entry["contenders"].items()}
        assert saved["ours_fast"] < saved["timm_cbam"] and saved["ours_fast"] < saved["ours_reference"]
    network = results["network"]["variants"]
    assert set(network) == {"plain", "se", "cbam", "ours_fast", "ours_reference"}
    assert network["plain"]["overhead"] is None and all(v["step"]["min_ms"] > 0 for v in network.values())
    assert network["ours_fast"]["parameters"] == network["ours_reference"]["parameters"]
    assert network["plain"]["parameters"] < network["ours_fast"]["parameters"]
    paired = results["network"]["ours_vs_se"]
    assert paired["rounds"] >= 1 and 0 <= paired["faster_rounds"] <= paired["rounds"]
    if sys.platform.startswith("linux"):  # page faults counted per step (a training step touches fresh pages)
        assert all(v["page_faults"] >= 0 for v in network.values())
        assert max(v["page_faults"] for v in network.values()) > 0

    table = (out / "results-cpu-float32.txt").read_text()
    for label in ("timm CbamModule", "timm SEModule", "ours, fast path", "ours, reference path", "resnet50"):
        assert label in table
    png = (out / "results-cpu-float32.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    markdown = (out / "BENCHMARKS.md").read_text()
    assert markdown.startswith("# Benchmarks") and "| timm CbamModule |" in markdown
    assert "cbam-dsa bench --quick" in markdown


def test_markdown_holds_one_section_per_run(quick_run):
    _, out = quick_run
    results = json.loads((out / "results-cpu-float32.json").read_text())
    other = json.loads(json.dumps(results))
    other["settings"]["device"], other["machine"]["gpu"], other["machine"]["cuda"] = "cuda", "Some GPU", "12.0"
    markdown = bench.render_markdown([results, other])
    assert markdown.count("\n## ") == 2
    assert "## CPU float32" in markdown and "## CUDA float32 (Some GPU)" in markdown


def test_render_rewrites_markdown_from_result_files_without_measuring(quick_run, tmp_path, capsys):
    _, out = quick_run
    markdown = tmp_path / "B.md"
    source = str(out / "results-cpu-float32.json")
    assert cli.main(["bench", "--render", source, "--markdown", str(markdown)]) == 0
    assert markdown.read_text() == (out / "BENCHMARKS.md").read_text()
    assert "timm CbamModule" in capsys.readouterr().out
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"settings": {}, "machine": {}, "shapes": [{}]}))
    assert cli.main(["bench", "--render", str(broken)]) == 2


class Sigmoid(nn.Module):
    def forward(self, x):
        return torch.sigmoid(x)  # saves its output: one input-sized tensor


class ScaleByParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x[:, :2] * self.weight  # saves a view of x and the parameter: nothing beyond them


class TwoSavedResults(nn.Module):
    def forward(self, x):
        y = torch.exp(x)  # saves y
        return y * torch.sigmoid(x)  # saves y again (same storage) and the sigmoid's output


def test_saved_tensor_bytes_on_known_cases():
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    nbytes = x.numel() * x.element_size()
    assert bench.saved_tensor_bytes(Sigmoid(), x) == nbytes
    assert bench.saved_tensor_bytes(ScaleByParameter(), x) == 0
    assert bench.saved_tensor_bytes(TwoSavedResults(), x) == 2 * nbytes
    assert bench.saved_tensor_bytes(Sigmoid(), x.double()) == 2 * nbytes


def test_summarize_takes_min_median_and_the_median_of_round_ratios():
    times = {"base": [2.0, 2.0, 4.0], "other": [1.0, 3.0, 2.0]}
    summary = bench.summarize(times, "base")
    assert summary["other"]["min_ms"] == 1000.0
    assert summary["other"]["median_ms"] == 2000.0
    assert summary["other"]["ratio"] == 0.5  # ratios 0.5, 1.5, 0.5
    assert summary["base"]["ratio"] == 1.0


def test_paired_comparison_is_round_by_round():
    paired = bench.paired_comparison([1.0, 3.0, 2.0], [2.0, 2.0, 4.0])  # ratios 0.5, 1.5, 0.5; diffs -1, 1, -2 s
    assert paired == {"median_ratio": -0.5, "median_diff_ms": -1000.0, "faster_rounds": 2, "rounds": 3}


def test_interleaved_rounds_draw_a_seeded_order_per_round():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    times = bench.interleaved_times(fns, rounds=40, warmup=1, seed=3)
    assert calls[:4] == ["a", "b", "c", "d"]  # warm-up
    rounds = [calls[i : i + 4] for i in range(4, len(calls), 4)]
    assert all(sorted(order) == ["a", "b", "c", "d"] for order in rounds)  # each once per round
    assert len({tuple(order) for order in rounds}) > 10  # not one fixed or rotating order
    # every function runs right after every other one in some round
    followers = {pair for order in rounds for pair in itertools.pairwise(order)}
    assert followers == {(x, y) for x in "abcd" for y in "abcd" if x != y}
    assert all(len(values) == 40 for values in times.values())
    calls.clear()
    bench.interleaved_times(fns, rounds=40, warmup=1, seed=3)
    assert [calls[i : i + 4] for i in range(4, len(calls), 4)] == rounds  # the same seed, the same orders


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rounds", "0"], "--rounds must be an integer >= 1"),
        (["--network-rounds", "-1"], "--network-rounds must be an integer >= 1, but got -1"),
        (["--threads", "0"], "--threads must be an integer >= 1"),
        (["--with-results", "missing.json", "--markdown", "x.md"], "cannot read a results file"),
    ],
)
def test_user_errors_exit_2_with_one_line(argv, message, capsys, tmp_path):
    assert cli.main(["bench", "--quick", "--out", str(tmp_path), *argv]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


def test_with_results_needs_markdown(tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"settings": {}, "machine": {}, "shapes": []}))
    assert cli.main(["bench", "--quick", "--with-results", str(path)]) == 2
    assert "give --markdown" in capsys.readouterr().err
