"""The benchmark command (``cbam-dsa bench``): a quick run writes its results, table, chart and markdown; markdown
is rendered again from result files; options reach the settings; user errors exit 2 with one line. That it runs and
reports correctly, not its numbers.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

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
            if sys.platform.startswith("linux"):  # minor page faults per timed call, both figures
                assert set(result["page_faults"]) == {"forward", "forward_backward"}
                assert all(count >= 0 for count in result["page_faults"].values())
            if name == "timm_cbam":
                assert result["forward"]["ratio"] == result["forward_backward"]["ratio"] == 1.0
        # the fast path keeps far less for backward than timm (which keeps about the input's size again)
        saved = {name: result["saved_bytes"] for name, result in entry["contenders"].items()}
        assert saved["ours_operator"] < saved["timm_cbam"] and saved["ours_operator"] < saved["ours_reference"]
        assert saved["ours_no_compiler"] < saved["ours_reference"]  # the PyTorch implementation of the operator
        assert entry["pairs"] == {}  # no compiled contenders in a quick run
    inputs = results["inputs"]
    assert [(e["shape"], e["kind"]) for e in inputs] == [
        (list(shape), kind) for shape in bench.QUICK_SHAPES for kind in bench.INPUT_KINDS
    ]
    for entry in inputs:
        assert entry["dtype"] == (entry["kind"] if entry["kind"].endswith("float16") else "float32")
        assert set(entry["contenders"]) == {"timm_cbam", "ours_operator", "ours_no_compiler"}
        for result in entry["contenders"].values():
            assert 0 < result["forward_backward"]["min_ms"] <= result["forward_backward"]["median_ms"]
        assert entry["operator_vs_pytorch"] > 0
    overhead = results["overhead"]
    assert overhead["shape"] == list(results["settings"]["overhead_shape"])
    assert set(overhead["median_us"]) == {"block", "operator", "implementation"}
    assert all(value > 0 for value in overhead["min_us"].values())
    assert isinstance(overhead["operator_overhead_us"], float) and isinstance(overhead["module_overhead_us"], float)
    network = results["network"]["variants"]
    layouts = {f"{name}_channels_last" for name in ("plain", "se", "cbam", "ours")}
    assert set(network) == {"plain", "se", "cbam", "ours_operator", "ours_reference", *layouts}
    assert network["plain"]["overhead"] is None and all(v["step"]["min_ms"] > 0 for v in network.values())
    assert network["plain_channels_last"]["overhead"] is None and network["ours_channels_last"]["overhead"] is not None
    assert network["ours_operator"]["parameters"] == network["ours_reference"]["parameters"]
    assert network["plain"]["parameters"] < network["ours_operator"]["parameters"]
    paired = results["network"]["ours_vs_se"]
    assert paired["rounds"] >= 1 and 0 <= paired["faster_rounds"] <= paired["rounds"]
    if sys.platform.startswith("linux"):  # page faults counted per step (a training step touches fresh pages)
        assert all(v["page_faults"] >= 0 for v in network.values())
        assert max(v["page_faults"] for v in network.values()) > 0

    table = (out / "results-cpu-float32.txt").read_text()
    assert "fwd+bwd page faults" in table
    for label in bench.LABELS.values():
        assert label in table or label.endswith("+ compile")
    assert "resnet50" in table and "Per-call overhead at (2, 32, 7, 7)" in table
    assert "other inputs, forward + backward" in table and "channels_last" in table
    png = (out / "results-cpu-float32.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    markdown = (out / "BENCHMARKS.md").read_text()
    assert markdown.startswith("# Benchmarks") and "| timm CbamModule |" in markdown
    assert "cbam-dsa bench --quick" in markdown and "2 interleaved rounds in balanced orders," in markdown
    assert "### Targets (this run)" in markdown and "issue" not in markdown.lower()
    assert "Per-call overhead at (2, 32, 7, 7)" in markdown
    assert "### Other inputs, forward + backward" in markdown and "| 2x16x14x14 | bfloat16 |" in markdown


def test_markdown_holds_one_section_per_run(quick_run):
    _, out = quick_run
    results = json.loads((out / "results-cpu-float32.json").read_text())
    other = json.loads(json.dumps(results))
    other["settings"]["device"], other["machine"]["gpu"], other["machine"]["cuda"] = "cuda", "Some GPU", "12.0"
    markdown = bench.render_markdown([results, other])
    assert markdown.count("\n## ") == 2
    assert "## CPU float32" in markdown and "## CUDA float32 (Some GPU)" in markdown


def test_markdown_says_whether_the_allocator_kept_freed_memory(quick_run):
    _, out = quick_run
    results = json.loads((out / "results-cpu-float32.json").read_text())
    assert results["machine"]["heap"] == "system default"  # a quick run leaves the allocator alone
    assert "kept freed memory" not in bench.render_markdown([results])
    results["machine"]["heap"] = "glibc mallopt M_MMAP_THRESHOLD=33554432, M_TRIM_THRESHOLD=1073741824"
    assert "The C allocator kept freed memory for reuse (`glibc mallopt M_MMAP" in bench.render_markdown([results])
    del results["machine"]["heap"]  # results written before it was recorded
    assert "kept freed memory" not in bench.render_markdown([results])


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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rounds", "0"], "--rounds must be an integer >= 1"),
        (["--network-rounds", "-1"], "--network-rounds must be an integer >= 1, but got -1"),
        (["--threads", "0"], "--threads must be an integer >= 1"),
        (["--network-batch", "0"], "--network-batch must be an integer >= 1, but got 0"),
        (["--network-size", "-3"], "--network-size must be an integer >= 1, but got -3"),
        (["--shapes", "2,8,6"], "--shapes takes B,C,H,W with four integers >= 1 (e.g. 16,64,56,56), but got '2,8,6'"),
        (["--shapes", "2,8,6,6", "2,0,6,6"], "but got '2,0,6,6'"),
        (["--shapes", "2,8,x,6"], "but got '2,8,x,6'"),
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


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], {"compile": True, "network_compile": False, "overhead": True, "keep_heap": True}),
        (["--system-heap"], {"keep_heap": False}),
        (["--network-compile"], {"compile": True, "network_compile": True}),
        (["--network-compile", "--no-compile"], {"compile": False, "network_compile": False}),
        (["--quick"], {"compile": False, "network_compile": False, "rounds": 2, "keep_heap": False}),
        (["--no-overhead", "--no-network"], {"overhead": False, "network": False}),
        (["--no-inputs"], {"inputs": False, "overhead": True}),
        ([], {"shapes": bench.SHAPES, "network_batch": 8, "network_size": 160, "network_autocast": None}),
        (["--shapes", "2,8,6,6", "1,4,5,7"], {"shapes": [(2, 8, 6, 6), (1, 4, 5, 7)]}),
        (["--quick", "--shapes", "3,4,5,6"], {"shapes": [(3, 4, 5, 6)], "rounds": 2}),
        (
            [
                "--network-batch",
                "64",
                "--network-size",
                "224",
                "--network-autocast",
                "bfloat16",
                "--network-rounds",
                "5",
            ],
            {"network_batch": 64, "network_size": 224, "network_autocast": "bfloat16", "network_rounds": 5},
        ),
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
