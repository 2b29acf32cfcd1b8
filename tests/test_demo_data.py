"""Cluttered Digits and the image-folder loader: determinism, the split by scan, options, boxes, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cbam_dsa.demo.data import (
    ClutteredDigitsConfig,
    load_image_folder,
    load_scans,
    make_cluttered_digits,
    split_scans,
)

SMALL = 40  # scans per split in most tests: fast, still every class


def _make(**kwargs):
    return make_cluttered_digits(ClutteredDigitsConfig(**kwargs), max_scans=SMALL)


def test_same_config_gives_identical_data():
    first_train, first_test = _make(seed=3)
    second_train, second_test = _make(seed=3)
    for a, b in ((first_train, second_train), (first_test, second_test)):
        assert torch.equal(a.images, b.images)
        assert torch.equal(a.labels, b.labels)
        assert torch.equal(a.boxes, b.boxes)
        assert torch.equal(a.scan_ids, b.scan_ids)


def test_another_seed_gives_other_data():
    train_a, _ = _make(seed=0)
    train_b, _ = _make(seed=1)
    assert not torch.equal(train_a.images, train_b.images)


def test_split_by_scan_is_disjoint_complete_and_stratified():
    _, labels = load_scans()
    train, test = split_scans(labels, test_fraction=0.2, seed=0)
    assert set(train.tolist()).isdisjoint(test.tolist())
    assert sorted(train.tolist() + test.tolist()) == list(range(len(labels)))
    for digit in range(10):
        share = (labels[test] == digit).sum() / (labels == digit).sum()
        assert 0.15 < share < 0.25


def test_no_scan_in_both_splits_of_the_full_dataset():
    train, test = make_cluttered_digits(ClutteredDigitsConfig(train_per_scan=1, test_per_scan=1))
    assert set(train.scan_ids.tolist()).isdisjoint(test.scan_ids.tolist())
    assert len(set(train.scan_ids.tolist())) + len(set(test.scan_ids.tolist())) == 1797
    assert set(test.labels.tolist()) == set(range(10))


@pytest.mark.parametrize("canvas", [40, 64])
@pytest.mark.parametrize("digit_scale", [2, 3])
@pytest.mark.parametrize("per_scan", [1, 2])
def test_shapes_follow_the_options(canvas, digit_scale, per_scan):
    train, test = _make(canvas=canvas, digit_scale=digit_scale, train_per_scan=per_scan, test_per_scan=1)
    assert train.images.shape == (SMALL * per_scan, 1, canvas, canvas)
    assert test.images.shape == (SMALL, 1, canvas, canvas)
    assert train.images.dtype == torch.float32
    assert float(train.images.min()) >= 0.0 and float(train.images.max()) <= 1.0
    side = train.boxes[:, 2:] - train.boxes[:, :2]
    assert bool((side > 0).all()) and bool((side <= 8 * digit_scale).all())
    assert bool((train.boxes[:, :2] >= 0).all()) and bool((train.boxes[:, 2:] <= canvas).all())


@pytest.mark.parametrize("digit_scale", [2, 3])
def test_without_clutter_the_canvas_holds_exactly_the_labelled_scan(digit_scale):
    train, _ = _make(clutter=0, digit_scale=digit_scale, train_per_scan=1)
    scans, labels = load_scans()
    for i in range(0, len(train), 7):
        scan = int(train.scan_ids[i])
        assert int(train.labels[i]) == int(labels[scan])
        up = F.interpolate(torch.from_numpy(scans[scan])[None, None], scale_factor=digit_scale, mode="bilinear")
        up = up[0, 0].clamp(0, 1)
        image = train.images[i, 0]
        x0, y0, x1, y1 = train.boxes[i].tolist()
        ink = (up > 0.1).nonzero()
        oy, ox = y0 - int(ink[:, 0].min()), x0 - int(ink[:, 1].min())  # where the patch's corner landed
        size = up.shape[0]
        torch.testing.assert_close(image[oy : oy + size, ox : ox + size], up)
        outside = image.clone()
        outside[oy : oy + size, ox : ox + size] = 0
        assert float(outside.abs().max()) == 0.0
        assert x1 - x0 == int(ink[:, 1].max()) - int(ink[:, 1].min()) + 1
        assert y1 - y0 == int(ink[:, 0].max()) - int(ink[:, 0].min()) + 1


@pytest.mark.parametrize("clutter", [0, 4, 12])
def test_clutter_puts_ink_outside_the_digit(clutter):
    train, _ = _make(clutter=clutter, train_per_scan=1)
    outside = []
    for image, (x0, y0, x1, y1) in zip(train.images[:, 0], train.boxes.tolist(), strict=True):
        masked = image.clone()
        masked[max(0, y0 - 4) : y1 + 4, max(0, x0 - 4) : x1 + 4] = 0
        outside.append(float(masked.sum()))
    if clutter == 0:
        assert max(outside) == 0.0
    else:
        assert np.mean(outside) > 5.0 * clutter / 4


def test_more_clutter_means_more_ink():
    few, _ = _make(clutter=2)
    many, _ = _make(clutter=12)
    assert float(many.images.mean()) > float(few.images.mean())


def test_boxes_hold_the_ink_of_the_digit():
    train, _ = _make(clutter=0)
    for image, (x0, y0, x1, y1) in zip(train.images[:, 0], train.boxes.tolist(), strict=True):
        assert float(image[y0:y1, x0:x1].sum()) == pytest.approx(float(image.sum()), rel=0.02)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"canvas": 20}, ValueError, "canvas must be at least"),
        ({"digit_scale": 0}, ValueError, "digit_scale"),
        ({"clutter": -1}, ValueError, "clutter"),
        ({"fragment": 30}, ValueError, "fragment must be at most"),
        ({"test_fraction": 1.0}, ValueError, "test_fraction"),
        ({"canvas": 64.0}, TypeError, "canvas must be an integer"),
        ({"train_per_scan": True}, TypeError, "train_per_scan"),
    ],
)
def test_bad_options_are_refused_by_name(kwargs, error, match):
    with pytest.raises(error, match=match):
        ClutteredDigitsConfig(**kwargs)


def test_config_round_trips_through_a_dict():
    config = ClutteredDigitsConfig(canvas=48, clutter=3, fragment=5)
    assert ClutteredDigitsConfig(**config.to_dict()) == config
    assert config.fragment_size == 5
    assert ClutteredDigitsConfig(digit_scale=3).fragment_size == 8


def test_max_scans_limits_each_split():
    train, test = make_cluttered_digits(ClutteredDigitsConfig(train_per_scan=1, test_per_scan=1), max_scans=25)
    assert len(set(train.scan_ids.tolist())) == 25
    assert len(set(test.scan_ids.tolist())) == 25


def test_subset_keeps_everything_aligned():
    train, _ = _make()
    part = train.subset(5)
    assert len(part) == 5
    assert torch.equal(part.boxes, train.boxes[:5])
    assert torch.equal(part.scan_ids, train.scan_ids[:5])
    assert len(train.subset(10_000)) == len(train)


def _write_images(folder, count, color, size=(12, 10)):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", size, color=tuple(min(255, c + i) for c in color)).save(folder / f"img{i}.png")


def test_image_folder_is_split_by_file_and_resized(tmp_path):
    _write_images(tmp_path / "cat", 5, (200, 10, 10))
    _write_images(tmp_path / "dog", 4, (10, 10, 200))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    train, test = load_image_folder(tmp_path, size=16, seed=0)
    assert train.classes == ["cat", "dog"] == test.classes
    assert len(train) + len(test) == 9
    assert set(train.sources).isdisjoint(test.sources)
    assert set(test.labels.tolist()) == {0, 1}
    assert train.images.shape[1:] == (3, 16, 16)
    assert train.boxes is None
    red = train.images[train.labels == 0]
    assert bool((red[:, 0] > red[:, 2]).all())  # the cat images are red, and stay so


def test_image_folder_split_is_deterministic(tmp_path):
    _write_images(tmp_path / "a", 6, (50, 50, 50))
    _write_images(tmp_path / "b", 6, (150, 150, 150))
    first = load_image_folder(tmp_path, size=8, seed=1)[1].sources
    assert load_image_folder(tmp_path, size=8, seed=1)[1].sources == first


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "file.png").write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        load_image_folder(tmp_path / "file.png")
    _write_images(tmp_path / "only", 3, (1, 2, 3))
    with pytest.raises(ValueError, match="at least 2 subfolders"):
        load_image_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        load_image_folder(tmp_path)
    (tmp_path / "empty" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="could not be read"):
        load_image_folder(tmp_path)
