"""Training, localisation lift, the `--quick` end-to-end run, and a two-process `torchrun` run on CPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cbam_dsa.checkpoint import load_checkpoint
from cbam_dsa.cli import main
from cbam_dsa.demo.data import ImageSet
from cbam_dsa.demo.localisation import box_coverage, localisation_lift
from cbam_dsa.demo.model import VARIANTS, build_model
from cbam_dsa.demo.train import TrainConfig, train_variant, warmup_cosine

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


# --- localisation lift -------------------------------------------------------------------------------------------


def test_box_coverage_of_whole_and_half_images():
    whole = box_coverage(torch.tensor([[0, 0, 8, 8]]), (2, 2), (8, 8))
    torch.testing.assert_close(whole, torch.ones(1, 2, 2, dtype=torch.float64))
    left = box_coverage(torch.tensor([[0, 0, 4, 8]]), (2, 2), (8, 8))
    torch.testing.assert_close(left, torch.tensor([[[1.0, 0.0], [1.0, 0.0]]], dtype=torch.float64))


def test_box_coverage_of_partial_cells():
    # cells of 4 px; the box covers columns 2..5 (half of each of the two cells) and rows 0..3 (the first cell)
    coverage = box_coverage(torch.tensor([[2, 0, 6, 4]]), (2, 2), (8, 8))
    torch.testing.assert_close(coverage, torch.tensor([[[0.5, 0.5], [0.0, 0.0]]], dtype=torch.float64))


def test_lift_is_one_for_a_uniform_map_and_the_inverse_box_share_for_a_map_inside_the_box():
    boxes = torch.tensor([[0, 0, 4, 4], [2, 2, 8, 6]])  # shares 1/4 and 24/64
    uniform = torch.full((2, 1, 8, 8), 0.7)
    assert localisation_lift(uniform, boxes, (8, 8)) == pytest.approx(1.0)
    inside = torch.zeros(2, 1, 8, 8)
    inside[0, 0, 0:4, 0:4] = 1.0
    inside[1, 0, 2:6, 2:8] = 0.3
    per_image = localisation_lift(inside, boxes, (8, 8), reduce=False)
    torch.testing.assert_close(per_image, torch.tensor([4.0, 64 / 24], dtype=torch.float64))
    outside = 1.0 - inside.clamp(max=1).ceil()
    assert localisation_lift(outside, boxes, (8, 8)) == pytest.approx(0.0)


def test_lift_on_a_coarser_map_than_the_image():
    sa = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])  # all mass in the top-left cell of a 2x2 map over 8x8 px
    lift = localisation_lift(sa, torch.tensor([[0, 0, 2, 2]]), (8, 8))
    # the box covers a quarter of that cell: share inside = 1/4, box share = 4/64
    assert lift == pytest.approx((1 / 4) / (4 / 64))


def test_lift_refuses_bad_shapes():
    with pytest.raises(ValueError, match=r"sa must have shape \(N, 1, h, w\)"):
        localisation_lift(torch.ones(2, 8, 8), torch.zeros(2, 4), (8, 8))
    with pytest.raises(ValueError, match=r"boxes must have shape \(2, 4\)"):
        localisation_lift(torch.ones(2, 1, 8, 8), torch.zeros(3, 4), (8, 8))


# --- schedule and training ---------------------------------------------------------------------------------------


def test_warmup_cosine_rises_then_decays_to_the_floor():
    factor = warmup_cosine(100, warmup_share=0.2, floor=0.01)
    values = [factor(step) for step in range(100)]
    assert values[0] == pytest.approx(1 / 20)
    assert values[19] == pytest.approx(1.0)
    rising, falling = values[:20], values[19:]
    assert rising == sorted(rising)
    assert falling == sorted(falling, reverse=True)
    assert factor(100) == pytest.approx(0.01)
    assert warmup_cosine(1)(0) == pytest.approx(1.0)


def _toy_data(n: int, seed: int) -> ImageSet:
    """Two classes told apart by where a bright square sits (left or right half)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = 0.1 * torch.rand(n, 1, 16, 16, generator=generator)
    boxes = torch.zeros(n, 4, dtype=torch.int64)
    for i in range(n):
        x = int(torch.randint(0, 4, (1,), generator=generator)) + (8 if labels[i] else 0)
        y = int(torch.randint(0, 12, (1,), generator=generator))
        images[i, 0, y : y + 4, x : x + 4] = 1.0
        boxes[i] = torch.tensor([x, y, x + 4, y + 4])
    return ImageSet(images, labels, ["left", "right"], boxes=boxes)


TOY_MODEL = {"num_classes": 2, "in_channels": 1, "widths": [8, 8], "attention": {}}


@pytest.mark.parametrize("variant", ["none", "dsa"])
def test_training_learns_an_easy_task(variant):
    train, test = _toy_data(128, 0), _toy_data(64, 1)
    config = TrainConfig(epochs=4, batch_size=16, lr=1e-2, curve_images=32)
    result = train_variant(dict(TOY_MODEL, variant=variant), train, test, config, seed=0, progress=False)
    assert result.test_accuracy >= 0.9
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert result.history[0]["test_images"] == 32 and result.history[-1]["test_images"] == 64
    assert result.params == sum(p.numel() for p in result.model.parameters())
    assert not result.model.training
    if variant == "none":
        assert result.lift is None
    else:
        assert set(result.lift) == {"stages.0.attention", "stages.1.attention"}
        assert all(math.isfinite(v) and v > 0 for v in result.lift.values())


def test_training_is_deterministic_under_a_seed():
    train, test = _toy_data(64, 0), _toy_data(32, 1)
    config = TrainConfig(epochs=2, batch_size=16)
    runs = [
        train_variant(dict(TOY_MODEL, variant="dsa"), train, test, config, seed=s, progress=False) for s in (3, 3, 4)
    ]
    for key, value in runs[0].model.state_dict().items():
        assert torch.equal(value, runs[1].model.state_dict()[key]), key
    assert [h["train_loss"] for h in runs[0].history] == [h["train_loss"] for h in runs[1].history]
    assert runs[0].history[0]["train_loss"] != runs[2].history[0]["train_loss"]


def test_train_config_refuses_bad_values():
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        TrainConfig(lr=0.0)
    with pytest.raises(ValueError, match="weight_decay"):
        TrainConfig(weight_decay=float("nan"))


# --- the whole demo ----------------------------------------------------------------------------------------------

TINY = ["--quick", "--max-scans", "30", "--epochs", "1", "--no-progress", "--threads", "1"]


@pytest.mark.slow
def test_quick_demo_writes_the_whole_report(tmp_path):
    out = tmp_path / "report"
    assert main(["demo", *TINY, "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    variants = list(VARIANTS)
    assert "dsa-zero-start" in variants
    assert list(metrics["variants"]) == variants
    for variant in variants:
        entry = metrics["variants"][variant]
        accuracy = entry["accuracy"]["mean"]
        assert 0.0 <= accuracy <= 1.0
        assert f"`{variant}` | {100 * accuracy:.1f} ± 0.0 | {entry['params']:,}" in report
        assert (entry["lift"] is None) == (variant == "none")
        state, config = load_checkpoint(out / "weights" / f"{variant}.safetensors")
        model = build_model(config["model"])
        model.load_state_dict(state)
        assert config["model"]["variant"] == variant
        assert config["data"]["canvas"] == 64 and config["data"]["max_scans"] == 30
    assert metrics["variants"]["dsa"]["params"] > metrics["variants"]["none"]["params"]
    assert set(metrics["variants"]["dsa"]["lift"]) == {f"stages.{i}.attention" for i in range(3)}
    spatial = metrics["variants"]["dsa"]["spatial_mean"]
    assert all(0.0 < spatial[f"stages.{i}.attention"]["mean"] < 1.0 for i in range(3))
    assert "`dsa`: mean spatial map" in report and "This was a `--quick` run" in report
    zero = metrics["variants"]["dsa-zero-start"]
    assert zero["attention"] == {"alpha_init": 0.0, "learnable_alpha": True}
    stages = {f"stages.{i}.attention" for i in range(3)}
    for variant in ("cbam", "dsa", "dsa-learnable-alpha", "dsa-zero-start"):
        assert set(metrics["variants"][variant]["effective_lift"]) == stages, variant
    assert "alpha" not in metrics["variants"]["cbam"]  # no blend
    assert all(entry["mean"] == 1.0 for entry in metrics["variants"]["dsa"]["alpha"].values())
    for stage in stages:  # alpha moved from 0 after one epoch, and the history records it
        learned = [epoch["alpha"][stage] for epoch in metrics["histories"]["dsa-zero-start"][0]]
        assert zero["alpha"][stage]["mean"] == learned[-1] != 0.0
    assert "| `dsa-zero-start` | stage 1 |" in report and "**Effective lift**" in report
    figures = ["learning_curves.png", "alpha_per_stage.png"] + [
        f"{v}_{kind}.png"
        for v in ("dsa", "dsa-learnable-alpha", "dsa-zero-start")
        for kind in ("gallery", "router", "fusion", "channels")
    ]
    figures += ["cbam_gallery.png", "cbam_channels.png"]
    for name in figures:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
        assert f"]({name})" in report
    assert not (out / "cbam_router.png").exists()  # one branch: nothing to route
    assert "Command: `cbam-dsa demo --quick --out" in report
    assert "What was measured" in report and "**Lift on sa**" in report


@pytest.mark.slow
def test_demo_on_an_image_folder(tmp_path):
    from PIL import Image

    for name, color in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (20, 20), color=(color[0], color[1] + 3 * i, color[2])).save(
                tmp_path / "data" / name / f"{i}.png"
            )
    out = tmp_path / "report"
    args = ["demo", "--data", str(tmp_path / "data"), "--canvas", "32", "--epochs", "1", "--batch-size", "4"]
    assert main([*args, "--variants", "none", "dsa", "--no-progress", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["classes"] == ["blue", "red"]
    assert metrics["variants"]["dsa"]["lift"] is None  # no boxes, no lift
    _, config = load_checkpoint(out / "weights" / "dsa.safetensors")
    assert config["model"]["in_channels"] == 3 and config["model"]["num_classes"] == 2
    assert (out / "dsa_gallery.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_two_process_torchrun_on_cpu(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "report"
    command = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "cbam_dsa.cli",
        "demo",
        *TINY,
        "--variants",
        "none",
        "dsa",
        "--no-figures",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    try:
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"torchrun with two processes did not finish within 150 s: {error.stderr!r}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("cbam-dsa demo: wrote") == 1  # only rank 0 writes
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["processes"] == 2
    assert set(metrics["variants"]) == {"none", "dsa"}
    history = metrics["histories"]["dsa"][0]
    assert len(history) == 1 and math.isfinite(history[0]["train_loss"])
    assert (out / "weights" / "dsa.safetensors").is_file()
    assert not list(out.glob("*.png"))
