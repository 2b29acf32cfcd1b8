"""Localisation lift: how much of a spatial map's mass falls inside each image's box, against chance.

:func:`localisation_lift`: for each attention stage, the share of the spatial map's mass that falls inside the
digit's box, divided by the box's share of the image; 1.0 is chance, ``1 / box share`` is the most.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["box_coverage", "localisation_lift"]


def box_coverage(boxes: Tensor, map_size: tuple[int, int], image_size: tuple[int, int]) -> Tensor:
    """The share of each map cell's area that lies inside each box.

    A map of ``h x w`` cells covers the image of ``H x W`` pixels; cell ``(i, j)`` spans rows
    ``[i H / h, (i + 1) H / h)`` and columns ``[j W / w, (j + 1) W / w)``.

    Args:
        boxes (Tensor): ``(N, 4)`` ``(x0, y0, x1, y1)`` in image pixels, ends exclusive.
        map_size (tuple): ``(h, w)``.
        image_size (tuple): ``(H, W)``.

    Shape:
        - Output: :math:`(N, h, w)` with values in ``[0, 1]``.
    """

    def overlap(lo: Tensor, hi: Tensor, cells: int, pixels: int) -> Tensor:
        edges = torch.arange(cells + 1, dtype=torch.float64) * (pixels / cells)
        start, end = edges[:-1].unsqueeze(0), edges[1:].unsqueeze(0)
        covered = torch.minimum(end, hi.unsqueeze(1)) - torch.maximum(start, lo.unsqueeze(1))
        return covered.clamp(min=0) / (pixels / cells)

    boxes = boxes.to(torch.float64)
    fy = overlap(boxes[:, 1], boxes[:, 3], map_size[0], image_size[0])
    fx = overlap(boxes[:, 0], boxes[:, 2], map_size[1], image_size[1])
    return fy.unsqueeze(2) * fx.unsqueeze(1)


def localisation_lift(sa: Tensor, boxes: Tensor, image_size: tuple[int, int], reduce: bool = True) -> Tensor | float:
    """Share of spatial-attention mass inside each box, divided by the box's share of the image.

    Args:
        sa (Tensor): spatial maps ``(N, 1, h, w)``, non-negative.
        boxes (Tensor): ``(N, 4)`` ``(x0, y0, x1, y1)`` in image pixels, ends exclusive.
        image_size (tuple): ``(H, W)`` of the images the boxes refer to.
        reduce (bool): return the mean over images (a float) rather than one value per image. Default: ``True``.

    Returns:
        float or Tensor: the lift (``1.0`` = chance).
    """
    if sa.dim() != 4 or sa.shape[1] != 1:
        raise ValueError(f"sa must have shape (N, 1, h, w), but got {tuple(sa.shape)}")
    if boxes.shape != (sa.shape[0], 4):
        raise ValueError(f"boxes must have shape ({sa.shape[0]}, 4), but got {tuple(boxes.shape)}")
    mass = sa[:, 0].to(torch.float64)
    coverage = box_coverage(boxes, (mass.shape[1], mass.shape[2]), image_size)
    inside = (mass * coverage).sum(dim=(1, 2)) / mass.sum(dim=(1, 2)).clamp(min=1e-12)
    box_share = coverage.sum(dim=(1, 2)) / (mass.shape[1] * mass.shape[2])
    lift = inside / box_share.clamp(min=1e-12)
    return float(lift.mean()) if reduce else lift
