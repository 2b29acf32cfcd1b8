"""The benchmark tool (``cbam_dsa.bench``, ``cbam-dsa bench``): that it runs and reports correctly, not its numbers."""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from cbam_dsa import CBAMResidualDynamicSA, bench, cli

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
    contenders = {"timm_cbam", "timm_se", "ours_operator", "ours_no_compiler", "ours_reference"}
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
        assert saved["ours_operator"] < saved["timm_cbam"] and saved["ours_operator"] < saved["ours_reference"]
        assert saved["ours_no_compiler"] < saved["ours_reference"]  # the PyTorch implementation of the operator
        assert entry["pairs"] == {}  # no compiled contenders in a quick run
    overhead = results["overhead"]
    assert overhead["shape"] == list(results["settings"]["overhead_shape"])
    assert set(overhead["median_us"]) == {"block", "operator", "implementation"}
    assert all(value > 0 for value in overhead["min_us"].values())
    assert isinstance(overhead["operator_overhead_us"], float) and isinstance(overhead["module_overhead_us"], float)
    network = results["network"]["variants"]
    assert set(network) == {"plain", "se", "cbam", "ours_operator", "ours_reference"}
    assert network["plain"]["overhead"] is None and all(v["step"]["min_ms"] > 0 for v in network.values())
    assert network["ours_operator"]["parameters"] == network["ours_reference"]["parameters"]
    assert network["plain"]["parameters"] < network["ours_operator"]["parameters"]
    paired = results["network"]["ours_vs_se"]
    assert paired["rounds"] >= 1 and 0 <= paired["faster_rounds"] <= paired["rounds"]
    if sys.platform.startswith("linux"):  # page faults counted per step (a training step touches fresh pages)
        assert all(v["page_faults"] >= 0 for v in network.values())
        assert max(v["page_faults"] for v in network.values()) > 0

    table = (out / "results-cpu-float32.txt").read_text()
    for label in bench.LABELS.values():
        assert label in table or label.endswith("+ compile")
    assert "resnet50" in table and "Per-call overhead at (2, 32, 7, 7)" in table
    png = (out / "results-cpu-float32.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    markdown = (out / "BENCHMARKS.md").read_text()
    assert markdown.startswith("# Benchmarks") and "| timm CbamModule |" in markdown
    assert "cbam-dsa bench --quick" in markdown
    assert "### Targets (this run)" in markdown and "issue" not in markdown.lower()
    assert "Per-call overhead at (2, 32, 7, 7)" in markdown


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


# --- contenders ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("before", [None, "1"])
def test_no_compiler_contender_sets_the_variable_around_each_call_and_restores_it(before, monkeypatch):
    if before is None:
        monkeypatch.delenv("CBAM_DSA_NATIVE", raising=False)
    else:
        monkeypatch.setenv("CBAM_DSA_NATIVE", before)
    seen = []
    step = bench.Contender(nn.Identity(), bench.NO_COMPILER).wrap(
        lambda: seen.append(os.environ.get("CBAM_DSA_NATIVE"))
    )
    step()
    step()
    assert seen == ["0", "0"] and os.environ.get("CBAM_DSA_NATIVE") == before

    def fails():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        bench.Contender(nn.Identity(), bench.NO_COMPILER).wrap(fails)()
    assert os.environ.get("CBAM_DSA_NATIVE") == before
    plain = bench.Contender(nn.Identity()).wrap(fails)
    assert plain is fails  # no environment: the step itself


def test_contenders_are_the_operator_its_no_compiler_path_the_reference_and_the_compiled_block(monkeypatch):
    from cbam_dsa.ops import pytorch

    contenders = bench.build_contenders(8, compile=True, device="cpu", dtype=torch.float32)  # compiles lazily
    assert list(contenders) == list(bench.LABELS)
    operator = contenders["ours_operator"].module
    assert operator.fast_path and contenders["ours_no_compiler"].module is operator
    assert contenders["ours_reference"].module.fast_path is False
    assert contenders["ours_compiled"].module._orig_mod is operator
    assert contenders["ours_no_compiler"].env == {"CBAM_DSA_NATIVE": "0"} and not contenders["ours_operator"].env

    calls = []
    original = pytorch.block_forward
    monkeypatch.setattr(pytorch, "block_forward", lambda *a: calls.append(1) or original(*a))
    x = torch.randn(2, 8, 6, 6, requires_grad=True)

    def step():
        operator(x).sum().backward()

    from cbam_dsa.ops.cpu import native

    contenders["ours_operator"].wrap(step)()
    c_kernels = native.library() is not None  # where no C compiler works, both run the PyTorch implementation
    assert calls == ([] if c_kernels else [1])
    calls.clear()
    contenders["ours_no_compiler"].wrap(step)()
    assert calls == [1]  # the operator's PyTorch implementation


def test_capture_operator_args_gives_what_the_block_passes_to_the_operator():
    from cbam_dsa import ops
    from cbam_dsa.ops.cpu import impl

    block = CBAMResidualDynamicSA(8)
    x = torch.randn(2, 8, 6, 6)
    args = bench.capture_operator_args(block, x)
    assert ops.FORWARD is torch.ops.cbam_dsa.block_forward.default  # restored
    with torch.no_grad():
        expected = block(x)
        torch.testing.assert_close(ops.FORWARD(*args)[0], expected)
        torch.testing.assert_close(impl.block_forward(*args)[0], expected)
    block.fast_path = False
    assert bench.capture_operator_args(block, x) == ()


def test_overhead_is_none_where_the_block_does_not_run_the_operator(monkeypatch):
    assert bench.measure_overhead(bench.Settings.quick(device="cuda"), torch.float32) is None
    monkeypatch.setattr(CBAMResidualDynamicSA, "fast_path", False)
    assert bench.measure_overhead(bench.Settings.quick(), torch.float32) is None


def test_measure_shape_pairs_compiled_rows_and_drops_a_failing_one(monkeypatch):
    from timm.layers.cbam import CbamModule

    from cbam_dsa.bench import measure

    class Fails(nn.Module):
        def forward(self, x):
            raise RuntimeError("no compiler here\nsecond line")

    def fake_contenders(channels, compile, device, dtype):  # eager modules under the compiled names: no compiling
        contenders = bench.build_contenders(channels, False, device, dtype)
        contenders["ours_compiled"] = bench.Contender(CBAMResidualDynamicSA(channels))
        contenders["timm_cbam_compiled"] = bench.Contender(CbamModule(channels))
        contenders["timm_se_compiled"] = bench.Contender(Fails())
        return contenders

    monkeypatch.setattr(measure, "build_contenders", fake_contenders)
    entry = bench.measure_shape(bench.Settings.quick(compile=True), (2, 8, 5, 5), torch.float32)
    assert entry["errors"] == {"timm_se_compiled": "RuntimeError: no compiler here"}
    assert "timm_se_compiled" not in entry["contenders"]
    assert set(entry["pairs"]) == {"ours_compiled/ours_operator", "ours_compiled/timm_cbam_compiled"}
    for pair in entry["pairs"].values():
        assert pair["forward"] > 0 and pair["forward_backward"] > 0
    assert entry["contenders"]["ours_compiled"]["saved_bytes"] is None  # not measured for compiled rows


def test_network_compares_compiled_variants_with_the_compiled_plain_network(monkeypatch):
    from cbam_dsa.bench import network

    def tiny(scale):
        return nn.Sequential(
            nn.Conv2d(3, 4 * scale, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * scale, 10)
        )

    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(1))

        def forward(self, x):
            raise RuntimeError("compile failed")

    def fake_variants(compile, device, dtype):
        assert compile
        variants = {name: tiny(1 + i) for i, name in enumerate(network.NETWORK_LABELS)}
        variants["cbam_compiled"] = Fails()
        return variants

    monkeypatch.setattr(network, "_variants", fake_variants)
    settings = bench.Settings.quick(network_compile=True, network_rounds=3, network_size=8)
    result = bench.measure_network(settings, torch.float32)
    variants = result["variants"]
    assert list(variants) == [name for name in network.NETWORK_LABELS if name != "cbam_compiled"]
    assert result["errors"] == {"cbam_compiled": "RuntimeError: compile failed"}
    assert variants["plain"]["overhead"] is None and variants["plain_compiled"]["overhead"] is None
    assert variants["ours_compiled"]["overhead"] is not None
    assert result["ours_vs_se_compiled"]["rounds"] == 3
    assert "compiled plain network" in bench.render_markdown([_fake_results(network=result)])


# --- targets and rendering -----------------------------------------------------------------------------------------


def _summary(ratio):
    return {"min_ms": 1.0, "median_ms": 1.0, "ratio": ratio}


def _fake_results(network=None, **ratios):
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


def test_targets_are_checked_against_their_limits():
    targets = bench.render_targets(_fake_results())
    assert targets.startswith("### Targets (this run)")
    header, _, row = targets.splitlines()[2:5]
    assert "(<= 0.55)" in header and "(<= 0.35)" in header and "(<= 1.15)" in header and "(<= 0.5)" in header
    assert "(<= 0.8)" in header
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells == ["32x512x7x7", "0.500 (met)", "0.400 (missed)", "1.100 (met)", "0.600 (missed)", "0.790 (met)",
                     "0.010 (met)"]  # fmt: skip
    flipped = bench.render_targets(
        _fake_results(forward=0.56, train=0.35, vs_eager=1.16, vs_timm=0.5, no_compiler=0.81)
    )
    cells = [cell.strip() for cell in flipped.splitlines()[4].strip("|").split("|")]
    assert [cell.split()[1] for cell in cells[1:6]] == ["(missed)", "(met)", "(missed)", "(met)", "(missed)"]
    gpu = _fake_results()
    gpu["settings"]["device"] = "cuda"
    assert bench.render_targets(gpu) is None


def test_results_written_before_the_operator_still_render():
    paths = sorted((Path(__file__).parents[1] / "benchmarks").glob("results-*.json"))
    for path in paths:
        results = json.loads(path.read_text())
        assert "## " in bench.render_markdown([results]) and bench.render_table(results)
    old = _fake_results()
    old["shapes"][0]["contenders"]["ours_fast"] = old["shapes"][0]["contenders"].pop("ours_operator")
    del old["shapes"][0]["pairs"], old["shapes"][0]["contenders"]["ours_no_compiler"]
    markdown = bench.render_markdown([old])
    assert "This run predates the operator" in markdown
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
    assert "`ops.cpu.impl.block_forward`, on the C kernels" in text
    assert bench.render_overhead(None) is None


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], {"compile": True, "network_compile": False, "overhead": True}),
        (["--network-compile"], {"compile": True, "network_compile": True}),
        (["--network-compile", "--no-compile"], {"compile": False, "network_compile": False}),
        (["--quick"], {"compile": False, "network_compile": False, "rounds": 2}),
        (["--no-overhead", "--no-network"], {"overhead": False, "network": False}),
    ],
)
def test_options_reach_the_settings(argv, expected, monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def run_benchmark(settings, log):
        seen.update(vars(settings))
        raise Stop

    monkeypatch.setattr(bench, "run_benchmark", run_benchmark)
    with pytest.raises(Stop):
        cli.main(["bench", *argv])
    assert {key: seen[key] for key in expected} == expected
