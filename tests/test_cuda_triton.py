"""The CUDA implementation (Triton, ``cbam_dsa.ops.cuda``) against the reference, under Triton's interpreter.

The interpreter must be switched on (``TRITON_INTERPRET=1``) before triton is imported, and other tests may import
triton first, so the cases run in one subprocess (``tests/triton_cases.py``) that prints its figures as JSON; the
tests here check them. Every case compares outputs, maps and every gradient (through the maps too, where the case
puts a loss on them) with autograd through :func:`cbam_dsa.functional.cbam_residual_dynamic_sa`, the non-finite
masks, and, for some, that two runs are bitwise equal. With ``CBAM_DSA_COMPILE_CHECK=1``, every kernel is also
compiled for sm_90 without a GPU (``tests/triton_compile.py``), which the interpreter does not do.
"""

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
import triton_cases  # tests/ is on sys.path under pytest, as for helpers.py

HERE = Path(__file__).resolve().parent

requires_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed (it ships with CUDA builds of torch)"
)

# Largest error relative to each reference tensor's largest finite magnitude, for float32 and float64 against the
# reference in the same dtype. float16 and bfloat16 are measured against the float64 reference on the same inputs:
# within FLOOR, or within 3x the reference's own error.
TOLERANCE = {torch.float32: 2e-4, torch.float64: 1e-10}
FLOOR = {torch.bfloat16: 2e-2, torch.float16: 3e-3}


@pytest.fixture(scope="module")
def figures() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    source = str(Path(cbam_dsa.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([source, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    done = subprocess.run([sys.executable, str(HERE / "triton_cases.py")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@requires_triton
@pytest.mark.parametrize("name", list(triton_cases.CASES))
def test_matches_reference(figures: dict, name: str) -> None:
    _, dtype, config = triton_cases.CASES[name]
    found = figures[name]
    assert found["shapes"] == [], f"shape, dtype or presence differs from the reference: {found['shapes']}"
    assert found["masks"] == [], f"non-finite positions differ from the reference: {found['masks']}"
    assert len(found["errors"]) >= 15, "too few results compared"
    if dtype in TOLERANCE:
        worst = {k: v for k, v in found["errors"].items() if not v <= TOLERANCE[dtype]}
        assert not worst, f"errors over {TOLERANCE[dtype]:g}: {worst}"
    else:
        limit = {k: max(FLOOR[dtype], 3 * found["reference_truth"][k]) for k in found["truth"]}
        worst = {k: (v, limit[k]) for k, v in found["truth"].items() if not v <= limit[k]}
        assert not worst, f"errors against float64 over their limits: {worst}"
    if config.get("repeat"):
        assert found["bitwise"], "two runs differ"


@requires_triton
def test_cases_cover_the_brief() -> None:
    configs = [config for _, _, config in triton_cases.CASES.values()]
    dtypes = {dtype for _, dtype, _ in triton_cases.CASES.values()}
    assert {torch.float32, torch.float64, torch.bfloat16, torch.float16} <= dtypes
    assert {config.get("special") for config in configs} >= {"ties", "nan", "inf"}
    assert any(len(config.get("kernels", [1, 2, 3])) == 1 for config in configs)
    assert any(config.get("alpha", 1.0) is None for config in configs)
    assert any(config.get("maps") for config in configs)
    assert any(config.get("no_out_grad") for config in configs) and any(config.get("skip") for config in configs)
    shapes = [shape for shape, _, _ in triton_cases.CASES.values()]
    assert any(h != w for _, _, h, w in shapes) and any(h == w == 1 for _, _, h, w in shapes)
    assert any(c == 1 for _, c, _, _ in shapes) and any(b == 1 for b, _, _, _ in shapes)


def test_import_needs_no_triton() -> None:
    code = "import sys, cbam_dsa.ops.cuda.block as b; assert 'triton' not in sys.modules; print(b.supports)"
    env = dict(os.environ, PYTHONPATH=str(Path(cbam_dsa.__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("shape", [(16, 64, 56, 56), (8, 256, 28, 28), (32, 512, 7, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_is_small(shape: tuple[int, int, int, int], dtype: torch.dtype) -> None:
    from cbam_dsa.ops.cuda import block

    case = triton_cases.build((1, 4, 2, 2), torch.float32, {})
    meta = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    meta["x"] = torch.empty(shape, dtype=dtype, device="meta")
    args = [meta[name] for name in triton_cases.GRAD_NAMES] + [meta["branch_weights"], meta["branch_biases"]]
    saved = block.saved_like(*args, meta["dilations"], meta["act"], meta["ca_gate"], meta["sa_gate"])
    assert all(t.device.type == "meta" and t.dtype == dtype for t in saved)
    size = sum(t.numel() * t.element_size() for t in saved)
    assert size <= 0.05 * meta["x"].numel() * meta["x"].element_size()


def test_supports_names_what_falls_back() -> None:
    from cbam_dsa.ops.cuda import block

    x = torch.empty(1, 4, 2, 2)
    assert block.supports(x, kernel_sizes=[3, 7, 7]) is None
    assert "branches" in block.supports(x, kernel_sizes=[3] * (block.MAX_BRANCHES + 1))
    assert "dtype" in block.supports(x.int(), kernel_sizes=[3])


@requires_triton
@pytest.mark.skipif(os.environ.get("CBAM_DSA_COMPILE_CHECK") != "1",
                    reason="compiling for sm_90 takes a minute or more here: set CBAM_DSA_COMPILE_CHECK=1")
def test_compiles_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(cbam_dsa.__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, str(HERE / "triton_compile.py"), "--all"], env=env, capture_output=True,
                          text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 10 * len(triton_compile_configs()), "every kernel of every config compiled"


def triton_compile_configs() -> list[str]:
    import triton_compile

    return list(triton_compile.CONFIGS)


@requires_triton
def test_the_cuda_registration_glue_equals_the_cpu_operators() -> None:
    """ops/cuda/impl.py, as the dispatcher calls it: the Triton kernels, and the PyTorch implementation for the
    configurations they do not cover, give what the CPU operators give, outputs, maps and gradients, laid out alike
    (a channels_last input's output and gradient channels_last)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    source = str(Path(cbam_dsa.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([source, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    done = subprocess.run([sys.executable, str(HERE / "triton_glue.py")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    worst = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(worst) == {"triton", "triton_channels_last", "triton_channels_last_weights", "fallback_five_branches",
                          "fallback_wide_kernel"}
    assert all(value < 1e-4 for value in worst.values()), worst
