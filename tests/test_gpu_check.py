"""``benchmarks/gpu_check.py``, the check a lent GPU runs before its benchmark, kept working without one: its kernel
cases under Triton's interpreter, and its checks of the operator on the CPU operator (what they compare is the
same on both devices), including that a wrong result fails them."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cbam_dsa
from cbam_dsa import ops

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_the_kernel_cases_run_under_the_interpreter(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(Path(cbam_dsa.__file__).resolve().parents[1]))
    report = tmp_path / "check.json"
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--limit", "2", "--jobs", "2", "--json", str(report)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    found = json.loads(report.read_text())
    assert found["failed"] == [] and len(found["cases"]) == 2
    for case in found["cases"].values():
        assert case["bitwise"] and case["problems"] == [] and len(case["errors"]) >= 15
    assert "2 of 2 checks ok" in done.stdout


@pytest.mark.parametrize(
    ("kind", "args"),
    [
        ("block", ("learnable", torch.float32, (2, 8, 5, 6), "channels_last", "cpu")),
        ("block", ("sum_hard_one_branch", torch.bfloat16, (2, 8, 5, 6), "contiguous", "cpu")),
        ("opcheck", ("default", "cpu")),
    ],
)
def test_the_operator_checks_pass_on_a_correct_operator(gpu_check, kind, args):
    ok, found = gpu_check._operator_task(kind, *args)
    assert ok, found["detail"]


def test_the_operator_checks_fail_on_a_wrong_output(gpu_check, monkeypatch):
    forward = ops.FORWARD

    def off_by_a_little(*args):
        out = forward(*args)
        return [out[0] * 1.01, *out[1:]]

    monkeypatch.setattr(ops, "FORWARD", off_by_a_little)  # fused_block calls the operator through this attribute
    ok, found = gpu_check._operator_task("block", "default", torch.float32, (2, 8, 5, 6), "contiguous", "cpu")
    assert not ok and "error vs float64" in found["detail"]
