"""The retrofit: inserting the block at alpha 0 changes nothing, the experiment's four steps, and `--retrofit`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cbam_dsa.checkpoint import load_checkpoint
from cbam_dsa.cli import main
from cbam_dsa.demo.model import DemoNet, build_model
from cbam_dsa.demo.retrofit import insert_blocks, retrofit_experiment, same_outputs
from cbam_dsa.demo.train import TrainConfig
from cbam_dsa.maps import find_blocks
from test_demo_train import PNG_MAGIC, TINY, _toy_data

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def _trained_looking(widths=(8, 16), in_channels=1, num_classes=10) -> DemoNet:
    """A plain network whose BatchNorm statistics and weights are not the initial ones (as after training)."""
    net = DemoNet("none", num_classes=num_classes, in_channels=in_channels, widths=widths)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return net.eval()


@pytest.mark.parametrize("widths", [(8,), (8, 16, 32)])
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("attention", [None, {"sa_temperature": 0.5}, {"ca_fusion": "sum", "sa_kernels": (5,)}])
def test_inserting_the_block_leaves_the_outputs_exactly_unchanged(widths, in_channels, attention):
    plain = _trained_looking(widths, in_channels)
    retrofitted = insert_blocks(plain, attention)
    assert list(find_blocks(retrofitted)) == [f"stages.{i}.attention" for i in range(len(widths))]
    assert all(float(b.alpha.detach()) == 0.0 and b.learnable_alpha for b in find_blocks(retrofitted).values())
    images = torch.randn(5, in_channels, 32, 32)
    assert same_outputs(plain, retrofitted, images)
    with torch.no_grad():
        assert torch.equal(retrofitted.eval()(images), plain.eval()(images))
        # in training mode too (BatchNorm on batch statistics)
        assert torch.equal(retrofitted.train()(images), plain.train()(images))


def test_same_outputs_sees_a_change_and_restores_the_modes():
    plain = _trained_looking().train()
    retrofitted = insert_blocks(plain)
    images = torch.randn(3, 1, 32, 32)
    next(iter(find_blocks(retrofitted).values())).alpha.data.fill_(1e-3)
    assert not same_outputs(plain, retrofitted, images)
    assert plain.training and retrofitted.training


def test_the_retrofit_copies_the_weights_and_leaves_the_plain_network_alone():
    plain = _trained_looking()
    before = {key: value.clone() for key, value in plain.state_dict().items()}
    retrofitted = insert_blocks(plain)
    for key, value in plain.state_dict().items():
        assert torch.equal(retrofitted.state_dict()[key], value), key
    with torch.no_grad():
        for parameter in retrofitted.parameters():
            parameter.add_(1.0)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert retrofitted.get_config()["variant"] == "dsa-zero-start"
    assert build_model(retrofitted.get_config()).state_dict().keys() == retrofitted.state_dict().keys()


@pytest.mark.parametrize(
    ("plain", "error", "match"),
    [
        (torch.nn.Linear(2, 2), TypeError, "plain must be a DemoNet, but got Linear"),
        (DemoNet("dsa", widths=(8,)), ValueError, "plain must be a DemoNet of variant 'none', but got variant 'dsa'"),
    ],
)
def test_insert_blocks_refuses_what_it_cannot_retrofit(plain, error, match):
    with pytest.raises(error, match=match):
        insert_blocks(plain)


def test_the_experiment_fine_tunes_both_networks_from_the_pretrained_one():
    train, test = _toy_data(64, 0), _toy_data(32, 1)
    pretrain = TrainConfig(epochs=2, batch_size=16, lr=1e-2, curve_images=16)
    finetune = TrainConfig(epochs=1, batch_size=16, lr=1e-2, curve_images=16)
    result = retrofit_experiment(train, test, pretrain, finetune, 2, num_classes=2, progress=False, widths=(8, 8))
    assert result.exact is True
    assert result.seed == 2
    assert [len(r.history) for r in (result.pretrained, result.plain, result.retrofit)] == [2, 1, 1]
    assert result.retrofit.params > result.plain.params == result.pretrained.params
    assert all(set(h["alpha"]) == {"stages.0.attention", "stages.1.attention"} for h in result.retrofit.history)
    assert all(value != 0.0 for value in result.retrofit.history[-1]["alpha"].values())  # alpha was learned
    assert set(result.retrofit.map_stats["effective_lift"]) == {"stages.0.attention", "stages.1.attention"}
    # the pretrained network is kept as trained; the fine-tuned copies moved away from it
    pre, plain = result.pretrained.model.state_dict(), result.plain.model.state_dict()
    assert not torch.equal(pre["head.weight"], plain["head.weight"])
    assert not torch.equal(pre["head.weight"], result.retrofit.model.state_dict()["head.weight"])
    # both fine-tunes saw the same batches: the plain one is repeatable from the pretrained weights alone
    again = retrofit_experiment(train, test, pretrain, finetune, 2, num_classes=2, progress=False, widths=(8, 8))
    assert torch.equal(again.plain.model.state_dict()["head.weight"], plain["head.weight"])


@pytest.mark.slow
def test_quick_retrofit_writes_its_report(tmp_path):
    out = tmp_path / "retrofit"
    assert main(["demo", "--retrofit", *TINY, "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    summary = metrics["retrofit"]
    assert summary["exact"] == [True]
    finetuned = summary["finetuned"]
    assert list(finetuned) == ["none", "dsa-zero-start"]
    stages = {f"stages.{i}.attention" for i in range(3)}
    for key in ("alpha", "effective_lift", "lift", "effective_mean"):
        assert set(finetuned["dsa-zero-start"][key]) == stages, key
    assert metrics["settings"]["finetune"]["epochs"] == 1  # --quick
    for row in ("`none`, trained (step 1)", "`none`, fine-tuned (step 4)", "retrofit, fine-tuned (step 3)"):
        assert row in report
    accuracy = finetuned["dsa-zero-start"]["accuracy"]["mean"]
    assert f"| retrofit, fine-tuned (step 3) | {100 * accuracy:.1f} ± 0.0 |" in report
    assert "exactly unchanged (`torch.equal`) on 1 of 1 seed" in report
    assert "This was a `--quick` run" in report and "Effective lift" in report
    for name in ("finetune_curves.png", "alpha_per_stage.png", "retrofit_gallery.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
        assert f"]({name})" in report
    state, config = load_checkpoint(out / "weights" / "dsa-zero-start-retrofit.safetensors")
    model = build_model(config["model"])
    model.load_state_dict(state)
    assert config["model"]["variant"] == "dsa-zero-start"
    assert (out / "weights" / "none-pretrained.safetensors").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--retrofit", "--variants", "dsa"], "--variants does not apply with --retrofit"),
        (["--finetune-epochs", "2"], "--finetune-epochs and --finetune-lr apply only with --retrofit"),
        (["--retrofit", "--finetune-epochs", "0"], "--finetune-epochs must be an integer >= 1, but got 0"),
        (["--retrofit", "--finetune-lr", "-1"], "--finetune-lr must be a finite number > 0, but got -1.0"),
        (["--retrofit", "--alpha-init", "0.5"], "--alpha-init does not apply with --retrofit"),
    ],
)
def test_retrofit_options_are_checked(tmp_path, capsys, argv, message):
    assert main(["demo", *TINY, *argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_torchrun_retrofit_on_cpu(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "report"
    command = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "cbam_dsa.cli", "demo", "--retrofit", *TINY]
    command += ["--no-figures", "--device", "cpu", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    try:
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"torchrun --retrofit with two processes did not finish within 150 s: {error.stderr!r}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("cbam-dsa demo: wrote") == 1  # only rank 0 writes
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["processes"] == 2
    assert metrics["retrofit"]["exact"] == [True]
    assert len(metrics["histories"]["dsa-zero-start"][0]) == 1
