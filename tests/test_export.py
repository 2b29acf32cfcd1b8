"""Export and compilation: ONNX (both exporters), TorchScript, torch.export, torch.compile, and ``cbam-dsa export``."""

from __future__ import annotations

import copy
import os
import pickle
import shutil
import sys

import pytest
import torch

from cbam_dsa import CBAMResidualDynamicSA
from cbam_dsa.checkpoint import save_checkpoint
from cbam_dsa.cli import main
from cbam_dsa.export import (
    ExportError,
    export_onnx,
    export_program,
    export_torchscript,
    onnx_op_types,
    verify_onnx,
    verify_torchscript,
)

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

CHANNELS = 16
CONFIGS = {
    "sigmoid": {},
    "hardsigmoid": {"ca_gate": "hardsigmoid", "sa_gate": "hardsigmoid"},
    "sum-single-branch-no-residual": {
        "ca_fusion": "sum",
        "sa_kernels": (7,),
        "sa_use_dilated": False,
        "residual": False,
        "ca_act": "silu",
    },
    "learnable-dilated-only": {
        "learnable_temperature": True,
        "learnable_alpha": True,
        "alpha_init": 0.3,
        "sa_kernels": (),
        "ca_temperature": 0.5,
        "sa_temperature": 2.0,
    },
}
MAP_NAMES = ("out", "ca", "sa", "fusion_w", "router_w")


def _block(config: str, **extra) -> CBAMResidualDynamicSA:
    """A block whose parameters are all non-trivial (trained-looking), so every one of them shows in the output."""
    torch.manual_seed(0)
    block = CBAMResidualDynamicSA(CHANNELS, **CONFIGS[config], **extra)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return block.eval()


def _inputs(seed: int = 1) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The export example and inputs of other batch, height and width (sizes 1 included)."""
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(2, CHANNELS, 12, 10, generator=generator)
    others = [torch.randn(*shape, generator=generator) for shape in [(3, CHANNELS, 17, 7), (1, CHANNELS, 1, 5)]]
    return example, others


def _run_onnx(path, x: torch.Tensor) -> list[torch.Tensor]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(a) for a in session.run(None, {session.get_inputs()[0].name: x.numpy()})]


def _check_onnx_file(path, block: CBAMResidualDynamicSA, opset: int) -> None:
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == opset
    (graph_input,) = model.graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "", "height", "width"]
    assert dims[1].dim_value == CHANNELS
    # Max pooling over H, W is a ReduceMax: no (adaptive or global) max pooling operator in the graph.
    types = onnx_op_types(path)
    assert "ReduceMax" in types
    assert not any("MaxPool" in t for t in types), types
    assert "ATen" not in types and "PythonOp" not in types
    for gate in (block.ca.gate, block.sa.gate):
        assert {"sigmoid": "Sigmoid", "hardsigmoid": "HardSigmoid"}[gate] in types

    _, others = _inputs()
    with torch.no_grad():
        for x in others:
            expected = block(x)
            expected = expected if isinstance(expected, tuple) else (expected,)
            got = _run_onnx(path, x)
            assert len(got) == len(expected)
            for g, e in zip(got, expected, strict=True):
                assert g.shape == e.shape
                assert (g - e).abs().max() <= 1e-4


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("return_maps", [False, True])
def test_onnx_legacy_exporter_opset17_dynamic_shapes(tmp_path, config, return_maps):
    block = _block(config, return_maps=return_maps)
    example, others = _inputs()
    path = export_onnx(block, tmp_path / "block.onnx", example, dynamo=False)
    _check_onnx_file(path, block, opset=17)
    assert [o.name for o in onnx.load(str(path)).graph.output] == (list(MAP_NAMES) if return_maps else ["out"])
    assert verify_onnx(path, block, others) <= 1e-4


def test_onnx_static_shape(tmp_path):
    block = _block("sigmoid")
    example = torch.randn(1, CHANNELS, 5, 6)
    path = export_onnx(
        block, tmp_path / "static.onnx", example, dynamic_batch=False, dynamic_height=False, dynamic_width=False
    )
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, CHANNELS, 5, 6]
    assert verify_onnx(path, block, torch.randn(1, CHANNELS, 5, 6)) <= 1e-4


def test_export_leaves_module_mode_and_input_untouched(tmp_path):
    block = _block("sigmoid").train()
    example, _ = _inputs()
    before = example.clone()
    export_onnx(block, tmp_path / "block.onnx", example)
    assert block.training
    assert torch.equal(example, before)


def test_verify_onnx_reports_a_mismatch(tmp_path):
    block = _block("sigmoid")
    example, others = _inputs()
    path = export_onnx(block, tmp_path / "block.onnx", example)
    other_block = copy.deepcopy(block)
    with torch.no_grad():
        other_block.sa.branches[0].bias.add_(1.0)
    with pytest.raises(ExportError, match="output 'out' differs from PyTorch"):
        verify_onnx(path, other_block, others)
    with pytest.raises(ExportError, match="gives 1 outputs where PyTorch gives 5"):
        verify_onnx(path, _block("sigmoid", return_maps=True), others)


def test_export_onnx_argument_errors(tmp_path):
    block = _block("sigmoid")
    example, _ = _inputs()
    with pytest.raises(ValueError, match="opset must be >= 18 with dynamo=True"):
        export_onnx(block, tmp_path / "a.onnx", example, dynamo=True, opset=17)
    with pytest.raises(ValueError, match="a dynamic batch needs an example of size >= 2"):
        export_onnx(block, tmp_path / "a.onnx", torch.randn(1, CHANNELS, 8, 8))
    with pytest.raises(ValueError, match="shape \\(B, C, H, W\\)"):
        export_onnx(block, tmp_path / "a.onnx", torch.randn(CHANNELS, 8, 8))
    with pytest.raises(TypeError, match="dynamic_height must be True or False"):
        export_onnx(block, tmp_path / "a.onnx", example, dynamic_height=1)
    assert not (tmp_path / "a.onnx").exists()


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
@pytest.mark.parametrize(
    ("config", "return_maps"),
    [("sigmoid", False), ("sum-single-branch-no-residual", True), ("learnable-dilated-only", True)],
)
def test_torchscript_saved_loaded_equal(tmp_path, config, return_maps):
    block = _block(config, return_maps=return_maps)
    example, others = _inputs()
    path = export_torchscript(block, tmp_path / "block.pt", example, check_inputs=others[:1])
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        for x in others:
            expected = block(x)
            got = loaded(x)
            if not return_maps:
                expected, got = (expected,), (got,)
            assert len(got) == len(expected)
            for g, e in zip(got, expected, strict=True):
                torch.testing.assert_close(g, e)
    assert verify_torchscript(path, block, others) <= 1e-5


def test_torch_export_equal_to_eager(tmp_path):
    block = _block("learnable-dilated-only", return_maps=True)
    example, others = _inputs()
    program = export_program(block, example, path=tmp_path / "block.pt2")
    reloaded = torch.export.load(str(tmp_path / "block.pt2"))
    with torch.no_grad():
        for x in others:
            expected = block(x)
            for runner in (program.module(), reloaded.module()):
                for g, e in zip(runner(x), expected, strict=True):
                    torch.testing.assert_close(g, e)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="AOTInductor needs a C++ compiler")
def test_aot_inductor_package_of_the_exported_block_equals_eager(tmp_path):
    """AOTInductor compiles the exported program (standard operators only, dynamic batch, height and width) into a
    package that runs without cbam_dsa's operators and equals the block."""
    block = _block("sigmoid", return_maps=True)
    example, others = _inputs()
    program = export_program(block, example)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert targets and not any("cbam_dsa" in target for target in targets)
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "block.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        for x in (example, *others):
            for g, e in zip(runner(x), block(x), strict=True):
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def _train_step(module, x, target):
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    out = module(x)
    loss = (out - target).square().mean()
    loss.backward()
    grads = [p.grad.clone() for p in module.parameters()]
    optimizer.step()
    return out.detach(), x.grad, grads, [p.detach().clone() for p in module.parameters()]


def _compile_matches_eager(config: str, backend: str, **extra) -> None:
    eager = _block(config, **extra).train()
    compiled_source = copy.deepcopy(eager)
    compiled = torch.compile(compiled_source, fullgraph=True, backend=backend)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, CHANNELS, 12, 10, generator=generator)
    target = torch.randn(2, CHANNELS, 12, 10, generator=generator)
    got = _train_step(compiled, x.clone().requires_grad_(), target)
    expected = _train_step(eager, x.clone().requires_grad_(), target)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)  # forward
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)  # input gradient
    for g, e in zip(got[2], expected[2], strict=True):  # parameter gradients
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    for g, e in zip(got[3], expected[3], strict=True):  # parameters after the step
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    initial = [p.detach() for p in _block(config, **extra).parameters()]
    assert any(not torch.equal(p, q) for p, q in zip(got[3], initial, strict=True)), "the step changed nothing"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="inductor on CPU needs a C++ compiler")
def test_torch_compile_fullgraph_inductor_training_step():
    _compile_matches_eager("learnable-dilated-only", backend="inductor")


@pytest.mark.slow
def test_torch_compile_fullgraph_hardsigmoid_single_branch():
    # aot_eager traces forward and backward graphs like inductor does, without generating C++ (cheaper).
    _compile_matches_eager(
        "sum-single-branch-no-residual", backend="aot_eager", ca_gate="hardsigmoid", sa_gate="hardsigmoid"
    )


# ----------------------------------------------------------------------------------------------- cbam-dsa export


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["export", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_cli_exports_a_configuration(tmp_path, capsys):
    onnx_path, ts_path = tmp_path / "out" / "block.onnx", tmp_path / "block.pt"
    code, out, err = _cli(
        capsys,
        "--channels", str(CHANNELS),
        "--set", "sa_kernels=3,5",
        "--set", "sa_use_dilated=false",
        "--set", "ca_gate=hardsigmoid",
        "--set", "learnable_alpha=true",
        "--set", "alpha_init=0.25",
        "--set", "return_maps=yes",
        "--seed", "7",
        "-o", str(onnx_path),
        "--torchscript", str(ts_path),
    )  # fmt: skip
    assert code == 0, err
    assert "onnxruntime matches PyTorch" in out and str(onnx_path) in out and str(ts_path) in out
    torch.manual_seed(7)
    expected_block = CBAMResidualDynamicSA(
        CHANNELS,
        sa_kernels=(3, 5),
        sa_use_dilated=False,
        ca_gate="hardsigmoid",
        learnable_alpha=True,
        alpha_init=0.25,
        return_maps=True,
    )
    assert "HardSigmoid" in onnx_op_types(onnx_path)
    x = torch.randn(3, CHANNELS, 11, 6)
    with torch.no_grad():
        expected = expected_block(x)
    got = _run_onnx(onnx_path, x)
    assert got[4].shape == (3, 2)  # two routed branches
    for g, e in zip(got, expected, strict=True):
        assert (g - e).abs().max() <= 1e-4
    for g, e in zip(torch.jit.load(str(ts_path))(x), expected, strict=True):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_cli_exports_a_checkpoint(tmp_path, capsys, suffix):
    block = _block("learnable-dilated-only")
    checkpoint = save_checkpoint(tmp_path / f"block{suffix}", block, block.get_config())
    code, out, err = _cli(capsys, "--checkpoint", str(checkpoint), "-o", str(tmp_path / "ck.onnx"), "--static")
    assert code == 0, err
    assert "static shape" in out
    x = torch.randn(2, CHANNELS, 32, 32)
    with torch.no_grad():
        assert (_run_onnx(tmp_path / "ck.onnx", x)[0] - block(x)).abs().max() <= 1e-4


@pytest.mark.slow
def test_cli_dynamo_exporter_both_gates(tmp_path, capsys):
    # The one export through the torch.export-based exporter (it is slow): a sigmoid channel gate, a hard-sigmoid
    # spatial gate and the maps as outputs, through the CLI and so through export_onnx(dynamo=True).
    path = tmp_path / "d.onnx"
    settings = ["--set", "sa_gate=hardsigmoid", "--set", "return_maps=true"]
    code, out, err = _cli(capsys, "--channels", str(CHANNELS), *settings, "--dynamo", "--seed", "3", "-o", str(path))
    assert code == 0, err
    assert "torch.export-based exporter, opset 18" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.onnx"], "weights belong inside the file"
    torch.manual_seed(3)
    block = CBAMResidualDynamicSA(CHANNELS, sa_gate="hardsigmoid", return_maps=True).eval()
    _check_onnx_file(path, block, opset=18)
    assert [o.name for o in onnx.load(str(path)).graph.output] == list(MAP_NAMES)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--channels", "16", "--set", "colour=red"], "--set colour: unknown argument"),
        (["--channels", "16", "--set", "reduction=four"], "reduction takes an integer"),
        (["--channels", "16", "--set", "sa_kernels=3,x"], "comma-separated integers"),
        (["--channels", "16", "--set", "residual=maybe"], "residual takes true or false"),
        (["--channels", "16", "--set", "ca_gate=relu"], "ca_gate must be one of"),
        (["--channels", "16", "--set", "sa_kernels=4"], "odd integers"),
        (["--channels", "16", "--set", "ca_gate"], "--set takes KEY=VALUE"),
        (["--channels", "16", "--set", "reduction=2", "--set", "reduction=4"], "given more than once"),
        (["--channels", "16", "--set", "channels=8"], "with --channels"),
        (["--channels", "0"], "--channels must be >= 1"),
        (["--channels", "16", "--batch", "1"], "dynamic batch needs an example of size >= 2"),
        (["--channels", "16", "--width", "0", "--static"], "--width must be >= 1"),
        (["--channels", "16", "--dynamo", "--opset", "17"], "opset must be >= 18"),
        (["--channels", "16", "--atol", "nan"], "--atol must be >= 0"),
        (["--checkpoint", "missing.pt"], "does not exist"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, argv, message):
    output = tmp_path / "never.onnx"
    argv = [a.replace("missing.pt", str(tmp_path / "missing.pt")) for a in argv]
    code, out, err = _cli(capsys, *argv, "-o", str(output))
    assert code == 2 and out == ""
    assert err.startswith("cbam-dsa export: error: ") and err.count("\n") == 1, err
    assert message in err
    assert "Traceback" not in err
    assert not output.exists()


def test_cli_refuses_output_folder_and_same_file(tmp_path, capsys):
    code, _, err = _cli(capsys, "--channels", "8", "-o", str(tmp_path))
    assert code == 2 and "is a folder" in err
    same = str(tmp_path / "x")
    code, _, err = _cli(capsys, "--channels", "8", "-o", same, "--torchscript", same)
    assert code == 2 and "name the same file" in err


class _MakesFolder:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_cli_refuses_a_crafted_checkpoint_without_running_it(tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"state_dict": {}, "config": _MakesFolder(str(marker))}, protocol=2))
    code, _, err = _cli(capsys, "--checkpoint", str(evil), "-o", str(tmp_path / "x.onnx"))
    assert code == 2
    assert "was refused" in err and err.count("\n") == 1
    assert not marker.exists()
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("failing", ["verify_onnx", "verify_torchscript"])
def test_cli_writes_nothing_when_verification_fails(tmp_path, capsys, monkeypatch, failing):
    import cbam_dsa.export as export_module

    def mismatch(*args, **kwargs):
        raise ExportError("onnxruntime on input (3, 8, 39, 37): output 'out' differs from PyTorch by up to 0.5")

    monkeypatch.setattr(export_module, failing, mismatch)
    onnx_path, ts_path = tmp_path / "bad.onnx", tmp_path / "bad.pt"
    ts_path.write_bytes(b"an earlier file")
    code, out, err = _cli(capsys, "--channels", "8", "-o", str(onnx_path), "--torchscript", str(ts_path))
    assert code == 2 and out == ""
    assert "differs from PyTorch" in err and "nothing was written" in err
    assert not onnx_path.exists()
    assert ts_path.read_bytes() == b"an earlier file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]


def test_missing_export_extra_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now fails
    block = _block("sigmoid")
    example, _ = _inputs()
    path = export_onnx(block, tmp_path / "block.onnx", example)
    with pytest.raises(ImportError, match=r"pip install 'cbam-dsa\[export\]'"):
        verify_onnx(path, block, example)
    code, out, err = _cli(capsys, "--channels", "8", "-o", str(tmp_path / "x.onnx"))
    assert code == 2 and out == "" and "cbam-dsa[export]" in err and err.count("\n") == 1
    assert not (tmp_path / "x.onnx").exists()
