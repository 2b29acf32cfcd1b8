"""Figures from any model containing the block: map collection, each figure, draw_figures, lazy matplotlib."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from cbam_dsa import CBAMResidualDynamicSA, viz
from cbam_dsa.maps import AttentionMaps

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**block_kwargs) -> nn.Module:
    """A user's model: two blocks at two resolutions, named as the user named them."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        CBAMResidualDynamicSA(8, **block_kwargs),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        CBAMResidualDynamicSA(16, **block_kwargs),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )


def test_collect_maps_shapes_and_batching():
    model = _model().train()
    images = torch.randn(7, 3, 16, 16)
    maps = viz.collect_maps(model, images, batch_size=3)
    assert list(maps) == ["1", "3"]
    assert maps["1"].sa.shape == (7, 1, 16, 16) and maps["3"].sa.shape == (7, 1, 8, 8)
    assert maps["1"].ca.shape == (7, 8, 1, 1) and maps["3"].router_w.shape == (7, 3)
    assert maps["1"].fusion_w.shape == (2,)
    whole = viz.collect_maps(model, images, batch_size=100)
    for name in maps:
        torch.testing.assert_close(maps[name].sa, whole[name].sa)
        torch.testing.assert_close(maps[name].router_w, whole[name].router_w)
    assert model.training  # restored
    assert not maps["1"].sa.requires_grad


def test_collect_maps_uses_eval_mode():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), CBAMResidualDynamicSA(8))
    with torch.no_grad():
        model[1].running_mean.fill_(5.0)
    images = torch.randn(4, 3, 10, 10)
    maps = viz.collect_maps(model, images)
    model.eval()
    expected = model[2].sa(model[2].ca(model[1](model[0](images)))[0])[1]
    torch.testing.assert_close(maps["2"].sa, expected)


def test_collect_maps_of_a_model_without_blocks_is_empty():
    assert viz.collect_maps(nn.Conv2d(3, 3, 1), torch.randn(2, 3, 4, 4)) == {}


@pytest.mark.parametrize("images", [torch.randn(3, 16, 16), torch.zeros(0, 3, 8, 8), "images"])
def test_bad_images_are_refused(images):
    with pytest.raises((TypeError, ValueError), match="images must"):
        viz.collect_maps(_model(), images)


def test_branch_names_follow_the_router_order():
    assert viz.branch_names(CBAMResidualDynamicSA(8)) == ["3x3", "7x7", "7x7 d2"]
    assert viz.branch_names(CBAMResidualDynamicSA(8, sa_kernels=(5,), sa_use_dilated=False)) == ["5x5"]
    block = CBAMResidualDynamicSA(8, sa_kernels=(), sa_dilated_kernel=3, sa_dilated_d=3)
    assert viz.branch_names(block) == ["3x3 d3"]


def _fake_maps(n: int = 5) -> dict[str, AttentionMaps]:
    generator = torch.Generator().manual_seed(0)
    return {
        name: AttentionMaps(
            ca=torch.rand(n, c, 1, 1, generator=generator),
            sa=torch.rand(n, 1, s, s, generator=generator),
            fusion_w=torch.tensor([0.3, 0.7]),
            router_w=torch.softmax(torch.randn(n, 3, generator=generator), 1),
        )
        for name, c, s in (("a", 4, 8), ("b", 6, 4))
    }


def test_gallery_has_one_row_per_image_and_a_column_per_stage(tmp_path):
    images = torch.rand(5, 1, 16, 16)
    boxes = torch.tensor([[2, 2, 10, 12]] * 5)
    fig = viz.spatial_gallery(images, _fake_maps(), boxes=boxes, labels=[1] * 5, predictions=[2] * 5, count=3)
    assert len(fig.axes) == 3 * 3
    assert fig.axes[0].get_title() == "label 1, pred 2"
    assert fig.axes[1].get_title() == "a (8x8)"
    assert len(fig.axes[1].patches) == 1  # the box
    path = viz.save_figure(fig, tmp_path / "sub" / "gallery.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_gallery_draws_rgb_images():
    fig = viz.spatial_gallery(torch.rand(2, 3, 16, 16), _fake_maps(2), classes=["x", "y", "z"], labels=[2, 0])
    assert fig.axes[0].get_title() == "label z"
    assert fig.axes[0].images[0].get_array().shape == (16, 16, 3)


def test_router_fusion_channel_and_curve_figures():
    maps = _fake_maps()
    router = viz.router_weights_figure(maps, {"a": ["3x3", "7x7", "7x7 d2"]})
    assert len(router.axes) == 2
    assert [t.get_text() for t in router.axes[0].get_xticklabels()] == ["3x3", "7x7", "7x7 d2"]
    assert [t.get_text() for t in router.axes[1].get_xticklabels()] == ["branch 0", "branch 1", "branch 2"]
    fusion = viz.fusion_weights_figure(maps)
    heights = [round(p.get_height(), 3) for p in fusion.axes[0].patches]
    assert heights == [0.3, 0.3, 0.7, 0.7]
    channels = viz.channel_maps_figure(maps, count=2)
    assert channels.axes[0].images[0].get_array().shape == (2, 4)
    history = [{"epoch": 1, "train_loss": 2.0, "test_accuracy": 0.3}, {"epoch": 2, "train_loss": 1.0}]
    curves = viz.learning_curves_figure({"run": [history, history]})
    loss_ax, acc_ax = curves.axes[:2]
    assert list(loss_ax.lines[0].get_ydata()) == [2.0, 1.0]
    assert list(acc_ax.lines[0].get_ydata()) == [0.3]


def test_empty_inputs_are_refused():
    for draw in (viz.router_weights_figure, viz.fusion_weights_figure, viz.channel_maps_figure):
        with pytest.raises(ValueError, match="maps is empty"):
            draw({})
    with pytest.raises(ValueError, match="maps is empty"):
        viz.spatial_gallery(torch.rand(2, 1, 8, 8), {})
    with pytest.raises(ValueError, match="histories is empty"):
        viz.learning_curves_figure({})


@pytest.mark.parametrize(
    ("block_kwargs", "expected"),
    [
        ({}, {"gallery", "channels", "router", "fusion"}),
        ({"ca_fusion": "sum"}, {"gallery", "channels", "router"}),
        ({"sa_kernels": (7,), "sa_use_dilated": False}, {"gallery", "channels", "fusion"}),
    ],
)
def test_draw_figures_writes_what_the_model_has(tmp_path, block_kwargs, expected):
    model = _model(**block_kwargs)
    written = viz.draw_figures(model, torch.rand(4, 3, 16, 16), tmp_path, prefix="m_", count=2)
    assert set(written) == expected
    for kind, path in written.items():
        assert path == tmp_path / f"m_{kind}.png"
        assert path.read_bytes()[:8] == PNG_MAGIC


def test_draw_figures_refuses_a_model_without_blocks(tmp_path):
    with pytest.raises(ValueError, match="holds no CBAMResidualDynamicSA"):
        viz.draw_figures(nn.Conv2d(3, 3, 1), torch.rand(2, 3, 8, 8), tmp_path)


def test_importing_viz_does_not_import_matplotlib():
    code = "import sys, cbam_dsa.viz; print('matplotlib' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr
