"""Measuring in the benchmark tool (``cbam_dsa.bench``): saved-tensor bytes, the statistics over rounds, the
interleaved order of the contenders, the contenders themselves, the per-call overhead, one shape's rows and the
network step. That it measures the right things, not its numbers.
"""

from __future__ import annotations

import collections
import itertools
import json
import mmap
import os
import platform
import subprocess
import sys

import pytest
import torch
from torch import nn

from bench_helpers import fake_results
from cbam_dsa import CBAMResidualDynamicSA, bench

pytest.importorskip("timm")
pytest.importorskip("matplotlib")


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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="minor page faults from getrusage (Linux)")
def test_counting_faults_counts_the_pages_each_call_touches_first():
    pages = 256
    counts: list[int] = []

    def touch_fresh_pages() -> str:
        with mmap.mmap(-1, pages * mmap.PAGESIZE) as memory:  # mapped, not yet touched
            for page in range(pages):
                memory[page * mmap.PAGESIZE] = 1
        return "done"

    counted = bench.counting_faults(touch_fresh_pages, counts)
    assert [counted(), counted()] == ["done", "done"]  # the function's result passes through
    assert len(counts) == 2 and all(pages <= count < pages + 64 for count in counts)
    bench.counting_faults(lambda: None, counts)()
    assert counts[2] < pages // 4  # a call that maps nothing faults (almost) never


HEAP_LOOP = """
import json, sys, torch
from cbam_dsa import bench
kept = bench.keep_freed_memory() if sys.argv[1] == "keep" else None
counts = []


def three_tensors():  # 16 MiB each, freed oldest first: the last free joins all three to the top of the heap
    a, b, c = (torch.empty(4 << 20).fill_(1.0) for _ in range(3))
    del a, b, c


step = bench.counting_faults(three_tensors, counts)
for _ in range(16):
    step()
print(json.dumps({"kept": kept, "faults": counts[8:]}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator (mallopt)")
def test_keep_freed_memory_lets_glibc_reuse_freed_tensors_without_faults():
    """In a new process, three 16 MiB tensors allocated and freed in a loop, after keep_freed_memory: no fault once
    the heap has grown. With glibc's defaults some processes fault on all their pages in every iteration (2 of 10
    tried); with the trim threshold set alone, every process would (the mmap threshold stays at 128 KiB). Growing
    takes a few iterations, more on a busy machine (faults in the fifth and sixth in 4 of 30 processes beside a
    2-thread matrix product), so the last 8 of 16 are counted."""
    run = subprocess.run([sys.executable, "-c", HEAP_LOOP, "keep"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout.splitlines()[-1])
    assert found["kept"] == "glibc mallopt " + ", ".join(f"{k}={v}" for k, v in bench.KEPT_HEAP.items())
    assert len(found["faults"]) == 8 and max(found["faults"]) < 3 * (16 << 20) // mmap.PAGESIZE // 100


def test_timed_faults_is_the_median_of_the_timed_calls_only():
    assert bench.timed_faults([900, 800, 3, 1, 2], rounds=3) == 2  # two warm-up calls first
    assert bench.timed_faults([5, 7], rounds=2) == 6
    assert bench.timed_faults([], rounds=3) is None  # nothing counted (Windows)


def test_interleaved_rounds_follow_the_balanced_seeded_orders():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    times = bench.interleaved_times(fns, rounds=40, warmup=1, seed=3)
    assert calls[:4] == ["a", "b", "c", "d"]  # warm-up
    rounds = [calls[i : i + 4] for i in range(4, len(calls), 4)]
    assert rounds == [["abcd"[i] for i in order] for order in bench.balanced_orders(4, 40, seed=3)]
    assert len({tuple(order) for order in rounds}) > 10  # not one fixed or rotating order
    # over ten blocks of four rounds, every function runs right after every other one ten times
    followers = collections.Counter(pair for order in rounds for pair in itertools.pairwise(order))
    assert followers == {(x, y): 10 for x in "abcd" for y in "abcd" if x != y}
    assert all(len(values) == 40 for values in times.values())
    calls.clear()
    bench.interleaved_times(fns, rounds=40, warmup=1, seed=3)
    assert [calls[i : i + 4] for i in range(4, len(calls), 4)] == rounds  # the same seed, the same orders


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 8, 9])
@pytest.mark.parametrize("blocks", [1, 3])
def test_balanced_orders_give_every_predecessor_and_position_equally_often(count, blocks):
    size = count if count % 2 == 0 else 2 * count  # an odd count's block holds the mirrored rows too
    orders = bench.balanced_orders(count, blocks * size, seed=count)
    assert len(orders) == blocks * size and all(sorted(order) == list(range(count)) for order in orders)
    pairs = {(x, y) for x in range(count) for y in range(count) if x != y}
    for start in range(0, len(orders), size):  # each block on its own
        block = orders[start : start + size]
        followers = collections.Counter(pair for order in block for pair in itertools.pairwise(order))
        assert set(followers) == pairs and set(followers.values()) <= {size // count}
        positions = collections.Counter((place, value) for order in block for place, value in enumerate(order))
        assert positions == {(place, value): size // count for place in range(count) for value in range(count)}
    if count > 2:  # the labels are drawn per seed, and per block
        assert bench.balanced_orders(count, size, seed=count + 1) != orders[:size]
        if blocks > 1:
            assert orders[:size] != orders[size : 2 * size]


def test_balanced_orders_cut_a_partial_block_and_reject_bad_counts():
    assert bench.balanced_orders(4, 6, seed=0)[:4] == bench.balanced_orders(4, 4, seed=0)
    assert len(bench.balanced_orders(4, 6, seed=0)) == 6 and bench.balanced_orders(3, 0) == []
    with pytest.raises(ValueError, match=r"count must be at least 1.*count=0"):
        bench.balanced_orders(0, 4)
    with pytest.raises(ValueError, match="rounds=-1"):
        bench.balanced_orders(3, -1)


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


def test_off_the_cpu_the_operator_row_says_what_it_runs_and_there_is_no_no_compiler_path(monkeypatch):
    from cbam_dsa.bench import contenders as module
    from cbam_dsa.ops import library

    contenders = bench.build_contenders(8, compile=False, device="meta", dtype=torch.float32)
    assert "ours_no_compiler" not in contenders and "ours_operator" in contenders  # CBAM_DSA_NATIVE is the CPU's
    assert module.label("ours_operator", "cpu") == bench.LABELS["ours_operator"]
    monkeypatch.setattr(library, "devices", lambda: frozenset({"cpu"}))
    assert (
        module.label("ours_operator", "cuda")
        == "ours, operator (no CUDA implementation registered: the reference path)"
    )
    monkeypatch.setattr(library, "devices", lambda: frozenset({"cpu", "cuda"}))
    assert module.label("ours_operator", "cuda") == "ours, operator (Triton kernels)"
    assert module.label("timm_cbam", "cuda") == bench.LABELS["timm_cbam"]


def test_training_step_clears_every_gradient_first():
    """Each step's gradients are that step's alone (as after an optimizer's ``zero_grad``), not added to the last."""
    from cbam_dsa.bench.contenders import training_step

    module = CBAMResidualDynamicSA(8, learnable_alpha=True)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    grad_out = torch.randn(2, 8, 6, 6)
    step = training_step(module, x, grad_out)
    step()
    first = [t.grad.clone() for t in (x, *module.parameters())]
    step()
    for before, t in zip(first, (x, *module.parameters()), strict=True):
        assert torch.allclose(t.grad, before, rtol=1e-6, atol=1e-7)


def test_capture_operator_args_gives_what_the_block_passes_to_the_operator():
    from cbam_dsa import ops
    from cbam_dsa.bench.measure import cpu_kernel

    block = CBAMResidualDynamicSA(8)
    x = torch.randn(2, 8, 6, 6)
    args = bench.capture_operator_args(block, x)
    assert ops.FORWARD is ops.library.FORWARD  # restored
    with torch.no_grad():
        expected = block(x)
        torch.testing.assert_close(ops.FORWARD(*args)[0], expected)
        torch.testing.assert_close(cpu_kernel(*args)[0], expected)
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
    assert variants["plain_channels_last"]["overhead"] is None
    assert variants["ours_compiled"]["overhead"] is not None and variants["ours_channels_last"]["overhead"] is not None
    assert result["ours_vs_se_compiled"]["rounds"] == 3 and result["ours_vs_se_channels_last"]["rounds"] == 3
    markdown = bench.render_markdown([fake_results(network=result)])
    assert "compiled plain network" in markdown and "plain network in channels_last" in markdown
    assert "ours against SE (eager, channels_last)" in markdown


@pytest.mark.parametrize("mixed", [None, "bfloat16"])
def test_network_step_runs_under_autocast_when_asked(mixed, monkeypatch):
    from cbam_dsa.bench import network

    seen = []

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 10)

        def forward(self, x):
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return self.fc(self.conv(x).mean(dim=(2, 3)))

    monkeypatch.setattr(
        network,
        "_variants",
        lambda compile, device, dtype: {n: Tiny() for n in network.NETWORK_LABELS if not n.endswith("_compiled")},
    )
    settings = bench.Settings.quick(network_rounds=2, network_size=8, network_autocast=mixed)
    result = bench.measure_network(settings, torch.float32)
    assert result["autocast"] == mixed
    assert seen and all(enabled == (mixed is not None) for enabled, _ in seen)
    if mixed:
        assert all(dtype == torch.bfloat16 for _, dtype in seen)
    title = bench.render_markdown([fake_results(network=result)])
    assert ("under bfloat16 autocast" in title) == (mixed is not None)


@pytest.mark.parametrize("kind", ["channels_last", "strided", "float16", "bfloat16"])
def test_other_inputs_are_of_their_kind(kind):
    x = bench.make_input(kind, (2, 3, 4, 5))
    assert x.shape == (2, 3, 4, 5) and (x >= 0).all()
    assert x.is_contiguous() == (kind in ("float16", "bfloat16"))
    assert x.is_contiguous(memory_format=torch.channels_last) == (kind == "channels_last")
    assert x.dtype == (getattr(torch, kind) if kind.endswith("float16") else torch.float32)


def test_an_unknown_input_kind_is_refused():
    with pytest.raises(ValueError, match=r"kind must be one of 'channels_last', .* but got 'sparse'"):
        bench.make_input("sparse", (2, 3, 4, 5))
