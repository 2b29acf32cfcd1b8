"""The `cbam-dsa` command line: help for every subcommand, exit codes, one-line errors, and `visualize`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cbam_dsa import CBAMResidualDynamicSA
from cbam_dsa.checkpoint import save_checkpoint
from cbam_dsa.cli import COMMANDS, build_parser, main
from cbam_dsa.demo.data import ClutteredDigitsConfig
from cbam_dsa.demo.model import DemoNet
from cbam_dsa.demo.report import CHECKPOINT_FORMAT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLI = Path(sys.executable).with_name("cbam-dsa")


pytestmark = pytest.mark.usefixtures("one_thread")


def _available() -> list[str]:
    return list(build_parser()[1])


def test_top_level_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("demo", "visualize"):
        assert name in out


@pytest.mark.parametrize("command", _available())
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: cbam-dsa {command}" in capsys.readouterr().out


def test_demo_help_names_its_options(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    for option in ("--quick", "--seeds", "--epochs", "--out", "--data", "--variants", "--canvas", "--clutter"):
        assert option in out


def test_no_subcommand_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: cbam-dsa" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--seeds", "0"], "--seeds must be an integer >= 1, but got 0"),
        (["demo", "--epochs", "-1"], "--epochs must be an integer >= 1"),
        (["demo", "--clutter", "-2"], "--clutter must be an integer >= 0"),
        (["demo", "--lr", "nan"], "--lr must be a finite number > 0"),
        (["demo", "--data", "no/such/folder"], "--data 'no/such/folder' is not a folder"),
        (["demo", "--canvas", "16", "--quick", "--max-scans", "5"], "canvas must be at least"),
        (["demo", "--max-scans", "1"], "--max-scans must be an integer >= 2"),
        (["demo", "--sa-temperature", "0"], "--sa-temperature must be a number > 0"),
        (["visualize", "no/such.safetensors"], "does not exist or is not a file"),
    ],
)
def test_user_mistakes_give_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"cbam-dsa {argv[0]}: error: ") and message in err


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "taken")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def test_argparse_mistakes_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--variants", "se-net"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'se-net'" in capsys.readouterr().err


def test_installed_entry_point_reports_a_mistake_without_traceback(tmp_path):
    done = subprocess.run([str(CLI), "demo", "--seeds", "0"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr == "cbam-dsa demo: error: --seeds must be an integer >= 1, but got 0\n"


# --- visualize ---------------------------------------------------------------------------------------------------


def _demo_checkpoint(path: Path, variant: str = "dsa") -> Path:
    model = DemoNet(variant, widths=(8, 16))
    data = ClutteredDigitsConfig(canvas=40, digit_scale=2, clutter=3).to_dict() | {"max_scans": 12}
    config = {"format": CHECKPOINT_FORMAT, "model": model.get_config(), "data": data, "classes": list("0123456789")}
    return save_checkpoint(path, model, config)


def test_visualize_draws_the_demo_test_data(tmp_path, capsys):
    checkpoint = _demo_checkpoint(tmp_path / "weights" / "dsa.safetensors")
    assert main(["visualize", str(checkpoint), "--count", "3"]) == 0
    figures = tmp_path / "weights" / "dsa-figures"
    out = capsys.readouterr().out
    for kind in ("gallery", "channels", "router", "fusion"):
        assert (figures / f"{kind}.png").read_bytes()[:8] == PNG_MAGIC
        assert f"{kind}: {figures / kind}.png" in out


def test_visualize_draws_a_folder_of_images(tmp_path, capsys):
    from PIL import Image

    checkpoint = _demo_checkpoint(tmp_path / "cbam.safetensors", variant="cbam")
    (tmp_path / "images" / "class").mkdir(parents=True)
    Image.new("L", (30, 50), color=90).save(tmp_path / "images" / "a.png")
    Image.new("RGB", (64, 64), color=(10, 200, 30)).save(tmp_path / "images" / "class" / "b.jpg")
    out = tmp_path / "figures"
    assert main(["visualize", str(checkpoint), "--images", str(tmp_path / "images"), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sorted(line.split(":")[0] for line in lines) == ["channels", "gallery"]  # cbam: no router, sum fusion
    assert (out / "gallery.png").read_bytes()[:8] == PNG_MAGIC


def test_visualize_refuses_checkpoints_it_cannot_draw(tmp_path, capsys):
    plain = save_checkpoint(tmp_path / "block.safetensors", CBAMResidualDynamicSA(8), {"channels": 8})
    assert main(["visualize", str(plain)]) == 2
    assert "was not written by `cbam-dsa demo`" in capsys.readouterr().err
    none = _demo_checkpoint(tmp_path / "none.safetensors", variant="none")
    assert main(["visualize", str(none)]) == 2
    assert "has no attention block to draw" in capsys.readouterr().err
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"garbage")
    assert main(["visualize", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a valid safetensors file" in err
    dsa = _demo_checkpoint(tmp_path / "dsa.safetensors")
    assert main(["visualize", str(dsa), "--images", str(tmp_path / "nothing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["visualize", str(dsa), "--count", "0"]) == 2
    assert "--count must be an integer >= 1" in capsys.readouterr().err


def test_the_package_runs_as_a_module_for_torchrun(tmp_path):
    # README: `torchrun -m cbam_dsa.cli demo`, which needs cbam_dsa/cli/__main__.py
    done = subprocess.run(
        [sys.executable, "-m", "cbam_dsa.cli", "demo", "--seeds", "0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == "cbam-dsa demo: error: --seeds must be an integer >= 1, but got 0\n"


def test_user_error_lives_in_a_leaf_module():
    from cbam_dsa.cli import UserError, errors

    assert UserError is errors.UserError  # the demo's command imports it from cbam_dsa.cli until it moves
    assert COMMANDS["bench"] == "cbam_dsa.cli.bench" and COMMANDS["demo"] == "cbam_dsa.cli.demo"


def test_help_imports_no_tool_and_no_optional_dependency():
    # `cbam-dsa --help` builds every subcommand's parser; the heavy imports wait for `run`
    code = (
        "import sys; from cbam_dsa.cli import build_parser; build_parser()\n"
        "heavy = ('cbam_dsa.bench', 'cbam_dsa.export', 'cbam_dsa.viz', 'cbam_dsa.demo.train', 'timm', 'torchvision',"
        " 'matplotlib', 'onnx', 'onnxruntime', 'sklearn', 'PIL')\n"
        "print(sorted(name for name in heavy if name in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
