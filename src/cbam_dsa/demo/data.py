"""Cluttered Digits: real handwritten digits placed among clutter, generated deterministically; and image folders.

After the cluttered-MNIST task of the Spatial Transformer Networks paper (Jaderberg et al., 2015,
https://arxiv.org/abs/1506.02025). The source is scikit-learn's bundled handwritten digits
(``sklearn.datasets.load_digits``: 1,797 real 8x8 scans shipped inside scikit-learn, nothing downloaded). Each
image is a square canvas holding one digit, upscaled by ``digit_scale``, at a random position among ``clutter``
square fragments cut from other digits; pixels combine by maximum. The label is the digit, and the digit's ink box
is kept for measuring where attention looks. Train and test are split by source scan, stratified by class: a scan
(as digit or as clutter) appears in one split only.

:func:`load_image_folder` reads a user's images in class-per-folder layout instead (no boxes then).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_int

__all__ = [
    "IMAGE_SUFFIXES",
    "ClutteredDigitsConfig",
    "ImageSet",
    "list_images",
    "load_image_folder",
    "load_scans",
    "make_cluttered_digits",
    "read_images",
    "split_scans",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SCAN_SIZE = 8  # load_digits scans are 8x8
INK_THRESHOLD = 0.1  # an upscaled pixel above this counts as ink for the digit's box


@dataclass(frozen=True)
class ClutteredDigitsConfig:
    """How Cluttered Digits is generated; the same config and seed always give the same tensors.

    Args:
        canvas (int): side of the square canvas in pixels. Default: ``64``.
        digit_scale (int): upscaling factor of the 8x8 scans (the digit is ``8 * digit_scale`` pixels). Default: ``3``.
        clutter (int): clutter fragments per canvas. Default: ``8``.
        fragment (int, optional): side of a clutter fragment in pixels; ``None`` means a third of the digit's
            side. Default: ``None``.
        train_per_scan (int): canvases made from each training scan (new position and clutter each). Default: ``2``.
        test_per_scan (int): canvases made from each test scan. Default: ``3``.
        test_fraction (float): share of the scans of each class held out for testing. Default: ``0.2``.
        seed (int): seed of the split, the positions and the clutter. Default: ``0``.
    """

    canvas: int = 64
    digit_scale: int = 3
    clutter: int = 8
    fragment: int | None = None
    train_per_scan: int = 2
    test_per_scan: int = 3
    test_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("canvas", self.canvas)
        check_int("digit_scale", self.digit_scale)
        check_int("clutter", self.clutter, minimum=0)
        check_int("train_per_scan", self.train_per_scan)
        check_int("test_per_scan", self.test_per_scan)
        check_int("seed", self.seed, minimum=0)
        if self.fragment is not None:
            check_int("fragment", self.fragment)
            if self.fragment > self.digit_size:
                raise ValueError(
                    f"fragment must be at most the digit's side ({self.digit_size} px with digit_scale="
                    f"{self.digit_scale}), but got {self.fragment}"
                )
        if self.digit_size > self.canvas:
            raise ValueError(
                f"canvas must be at least the digit's side 8 * digit_scale = {self.digit_size} px, but got "
                f"canvas={self.canvas} (lower digit_scale or raise canvas)"
            )
        if isinstance(self.test_fraction, bool) or not (0.0 < float(self.test_fraction) < 1.0):
            raise ValueError(f"test_fraction must be a number strictly between 0 and 1, but got {self.test_fraction!r}")

    @property
    def digit_size(self) -> int:
        """Side of the upscaled digit in pixels."""
        return SCAN_SIZE * self.digit_scale

    @property
    def fragment_size(self) -> int:
        """Side of a clutter fragment in pixels."""
        return self.fragment if self.fragment is not None else max(1, self.digit_size // 3)

    def to_dict(self) -> dict:
        """A JSON-serialisable copy: ``ClutteredDigitsConfig(**c.to_dict())`` rebuilds it."""
        return asdict(self)


@dataclass
class ImageSet:
    """Images with labels and, for Cluttered Digits, the digit's box and source scan.

    Attributes:
        images (Tensor): ``(N, C, H, W)`` float32 in ``[0, 1]``.
        labels (Tensor): ``(N,)`` int64 class indices.
        classes (list[str]): class names, indexed by label.
        boxes (Tensor, optional): ``(N, 4)`` int64 ``(x0, y0, x1, y1)`` of the digit's ink, ends exclusive.
        scan_ids (Tensor, optional): ``(N,)`` int64 index of the digit's source scan in ``load_digits``.
    """

    images: Tensor
    labels: Tensor
    classes: list[str]
    boxes: Tensor | None = None
    scan_ids: Tensor | None = None
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, count: int) -> ImageSet:
        """The first ``count`` samples (all of them if there are fewer)."""
        count = min(count, len(self))
        return ImageSet(
            self.images[:count],
            self.labels[:count],
            self.classes,
            None if self.boxes is None else self.boxes[:count],
            None if self.scan_ids is None else self.scan_ids[:count],
            self.sources[:count],
        )


def load_scans() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 bundled 8x8 scans of ``sklearn.datasets.load_digits``, scaled to ``[0, 1]``, and their labels.

    Shape:
        - Output: scans :math:`(1797, 8, 8)` float32, labels :math:`(1797,)` int64.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def split_scans(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split scan indices into train and test, per class, so that no scan is in both.

    Returns:
        tuple: sorted ``(train_indices, test_indices)``.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    train, test = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = max(1, round(len(members) * test_fraction))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _upscale(scans: np.ndarray, scale: int) -> np.ndarray:
    up = F.interpolate(torch.from_numpy(scans)[:, None], scale_factor=scale, mode="bilinear", align_corners=False)
    return up[:, 0].clamp(0, 1).numpy()


def _ink_box(patch: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero((patch > INK_THRESHOLD).any(axis=1))
    cols = np.flatnonzero((patch > INK_THRESHOLD).any(axis=0))
    if rows.size == 0:  # an empty scan: the whole patch
        return 0, 0, patch.shape[1], patch.shape[0]
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _fragment(rng: np.random.Generator, digit: np.ndarray, size: int) -> np.ndarray:
    """A ``size x size`` crop of ``digit`` holding some ink (the inkiest of a few random tries)."""
    best, best_ink = None, -1.0
    limit = digit.shape[0] - size
    for _ in range(4):
        y, x = rng.integers(0, limit + 1, size=2)
        crop = digit[y : y + size, x : x + size]
        ink = float(crop.mean())
        if ink > best_ink:
            best, best_ink = crop, ink
        if ink > 0.15:
            break
    return best


def _make_split(
    scans: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    per_scan: int,
    config: ClutteredDigitsConfig,
    stream: int,
) -> ImageSet:
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, stream]))
    digits = _upscale(scans[indices], config.digit_scale)
    side, size, frag = config.canvas, config.digit_size, config.fragment_size
    count = len(indices) * per_scan
    images = np.zeros((count, side, side), dtype=np.float32)
    boxes = np.zeros((count, 4), dtype=np.int64)
    sources = np.repeat(np.arange(len(indices)), per_scan)
    for i, source in enumerate(sources):
        canvas = images[i]
        for _ in range(config.clutter):
            other = int(rng.integers(0, len(indices) - 1))
            other += other >= source  # never the digit's own scan
            piece = _fragment(rng, digits[other], frag)
            y, x = rng.integers(0, side - frag + 1, size=2)
            np.maximum(canvas[y : y + frag, x : x + frag], piece, out=canvas[y : y + frag, x : x + frag])
        y, x = rng.integers(0, side - size + 1, size=2)
        np.maximum(canvas[y : y + size, x : x + size], digits[source], out=canvas[y : y + size, x : x + size])
        x0, y0, x1, y1 = _ink_box(digits[source])
        boxes[i] = (x + x0, y + y0, x + x1, y + y1)
    return ImageSet(
        images=torch.from_numpy(images)[:, None],
        labels=torch.from_numpy(labels[indices][sources]),
        classes=[str(d) for d in range(10)],
        boxes=torch.from_numpy(boxes),
        scan_ids=torch.from_numpy(indices[sources].astype(np.int64)),
    )


def make_cluttered_digits(
    config: ClutteredDigitsConfig | None = None, max_scans: int | None = None
) -> tuple[ImageSet, ImageSet]:
    """Generate the train and test splits of Cluttered Digits.

    Args:
        config (ClutteredDigitsConfig, optional): generation settings. Default: ``ClutteredDigitsConfig()``.
        max_scans (int, optional): use only this many scans of each split (the first after the split), for
            quick runs. Default: all.

    Returns:
        tuple: ``(train, test)`` :class:`ImageSet` with boxes and scan ids.

    Shape:
        - images: :math:`(N, 1, canvas, canvas)`; labels: :math:`(N,)`; boxes: :math:`(N, 4)`
    """
    config = config if config is not None else ClutteredDigitsConfig()
    scans, labels = load_scans()
    train_idx, test_idx = split_scans(labels, config.test_fraction, config.seed)
    if max_scans is not None:
        max_scans = check_int("max_scans", max_scans, minimum=2)
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, 3]))
        train_idx = np.sort(rng.permutation(train_idx)[:max_scans])
        test_idx = np.sort(rng.permutation(test_idx)[:max_scans])
    train = _make_split(scans, labels, train_idx, config.train_per_scan, config, stream=1)
    test = _make_split(scans, labels, test_idx, config.test_per_scan, config, stream=2)
    return train, test


def _class_folders(root: Path) -> list[Path]:
    if not root.exists():
        raise ValueError(f"data folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise ValueError(f"data folder {str(root)!r} is not a folder (expected one subfolder of images per class)")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) < 2:
        raise ValueError(
            f"data folder {str(root)!r} has {len(folders)} class folder(s); expected at least 2 subfolders "
            f"of images, one per class (for example {str(root / 'cat')!r} and {str(root / 'dog')!r})"
        )
    return folders


def _read_image(path: Path, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"image {str(path)!r} could not be read: {error}") from error


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_images(paths: list[Path], size: int) -> Tensor:
    """Read ``paths`` as RGB, resized to ``size x size``, in ``[0, 1]``.

    Shape:
        - Output: :math:`(N, 3, size, size)`
    """
    return torch.from_numpy(np.stack([_read_image(p, size) for p in paths])) if paths else torch.zeros(0, 3, size, size)


def load_image_folder(
    root: str | os.PathLike[str], size: int = 64, test_fraction: float = 0.2, seed: int = 0
) -> tuple[ImageSet, ImageSet]:
    """Read a class-per-folder image tree (``root/<class>/<image>``) and split it by file, per class.

    Images are converted to RGB and resized to ``size x size``. Each class with at least two images gives at
    least one test image; no file is in both splits.

    Raises:
        ValueError: the folder is missing, has fewer than two classes, a class has no images, or an image
            cannot be read.

    Shape:
        - images: :math:`(N, 3, size, size)`
    """
    size = check_int("size", size)
    if not (0.0 < float(test_fraction) < 1.0):
        raise ValueError(f"test_fraction must be a number strictly between 0 and 1, but got {test_fraction!r}")
    root = Path(root)
    folders = _class_folders(root)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 4]))
    splits: dict[str, list[tuple[Path, int]]] = {"train": [], "test": []}
    for label, folder in enumerate(folders):
        files = list_images(folder)
        if not files:
            raise ValueError(
                f"class folder {str(folder)!r} holds no images (looked for files ending in {', '.join(IMAGE_SUFFIXES)})"
            )
        order = rng.permutation(len(files))
        n_test = min(len(files) - 1, max(1, math.floor(len(files) * test_fraction + 0.5)))
        for rank, j in enumerate(order):
            splits["test" if rank < n_test else "train"].append((files[j], label))
    if not splits["test"]:
        raise ValueError(f"data folder {str(root)!r} has too few images to hold any out for testing (need 2 per class)")
    classes = [f.name for f in folders]
    out = []
    for name in ("train", "test"):
        items = sorted(splits[name])
        out.append(
            ImageSet(
                images=read_images([p for p, _ in items], size),
                labels=torch.tensor([label for _, label in items], dtype=torch.int64),
                classes=classes,
                sources=[str(p) for p, _ in items],
            )
        )
    return out[0], out[1]
