"""The effective spatial factor: what the block's attention really multiplies the features by, and its lift.

The block computes ``y = x * ca * sa`` and ``out = x + alpha * (y - x)``, so

    ``out = x * ((1 - alpha) + alpha * ca * sa)``.

The factor ``(1 - alpha) + alpha * ca[c] * sa[h, w]`` multiplies feature ``(c, h, w)``. Its mean over the
channels is, exactly (the factor is linear in ``ca``),

    ``F[h, w] = (1 - alpha) + alpha * mean_c(ca) * sa[h, w]``,

the *effective spatial factor* this module reports. Without a blend (classic CBAM, ``residual=False``) the
factor is ``mean_c(ca) * sa``, as with ``alpha = 1``. With ``alpha = 0`` it is 1 everywhere, whatever ``sa`` is:
a map that never reaches the features localises nothing, and its lift on ``sa`` alone says nothing.

The *effective lift* is :func:`~cbam_dsa.demo.localisation.localisation_lift` on ``F``: the mean of ``F`` inside the
digit's box divided by its mean over the whole map, i.e. how much more the box's features are kept than the
average feature. ``mean_c(ca)`` is one number per image, so with ``alpha = 1`` the effective lift equals the
lift on ``sa``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from ..maps import AttentionMaps
from .localisation import localisation_lift

__all__ = ["effective_lift", "effective_spatial_factor", "effective_stats"]


def _check_alpha(alpha: float | Tensor | None) -> float | None:
    if alpha is None:
        return None
    if isinstance(alpha, Tensor):
        if alpha.numel() != 1:
            raise ValueError(f"alpha must be one number, but got a tensor of shape {tuple(alpha.shape)}")
        alpha = float(alpha.detach())
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a float, a one-element tensor or None, but got {type(alpha).__name__}")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, but got {alpha}")
    return float(alpha)


def effective_spatial_factor(sa: Tensor, ca: Tensor | None = None, alpha: float | Tensor | None = None) -> Tensor:
    """The channel mean of the factor that multiplies the features: ``(1 - alpha) + alpha * mean_c(ca) * sa``.

    Args:
        sa (Tensor): spatial maps.
        ca (Tensor, optional): channel maps of the same images; ``None`` counts them as 1. Default: ``None``.
        alpha (float or Tensor, optional): the blend weight; ``None`` for a block without a blend
            (``residual=False``), whose factor is ``mean_c(ca) * sa``. Default: ``None``.

    Returns:
        Tensor: the factor, in float64.

    Raises:
        ValueError: if a shape does not fit or ``alpha`` is not finite.
        TypeError: if ``alpha`` is not a number.

    Shape:
        - sa: :math:`(N, 1, h, w)`
        - ca: :math:`(N, C, 1, 1)`
        - Output: :math:`(N, 1, h, w)`
    """
    if not isinstance(sa, Tensor) or sa.dim() != 4 or sa.shape[1] != 1:
        raise ValueError(f"sa must be a tensor of shape (N, 1, h, w), but got {getattr(sa, 'shape', sa)!r}")
    alpha = _check_alpha(alpha)
    scale = torch.ones(sa.shape[0], 1, 1, 1, dtype=torch.float64, device=sa.device)
    if ca is not None:
        if not isinstance(ca, Tensor) or ca.dim() != 4 or ca.shape[0] != sa.shape[0] or ca.shape[2:] != (1, 1):
            raise ValueError(
                f"ca must be a tensor of shape ({sa.shape[0]}, C, 1, 1), but got {getattr(ca, 'shape', ca)!r}"
            )
        scale = ca.to(torch.float64).mean(dim=1, keepdim=True)
    attended = scale * sa.to(torch.float64)
    if alpha is None:
        return attended
    return (1.0 - alpha) + alpha * attended


def effective_lift(
    sa: Tensor,
    boxes: Tensor,
    image_size: tuple[int, int],
    ca: Tensor | None = None,
    alpha: float | Tensor | None = None,
) -> float:
    """:func:`~cbam_dsa.demo.localisation.localisation_lift` of :func:`effective_spatial_factor`, averaged over images.

    ``alpha = 0`` gives 1.0 (chance) for any ``sa``; ``alpha = 1`` or ``None`` gives the lift of ``sa``.

    Args:
        sa (Tensor): spatial maps.
        boxes (Tensor): ``(x0, y0, x1, y1)`` in image pixels, ends exclusive.
        image_size (tuple): ``(H, W)`` of the images the boxes refer to.
        ca (Tensor, optional): channel maps; ``None`` counts them as 1. Default: ``None``.
        alpha (float or Tensor, optional): the blend weight; ``None`` for no blend. Default: ``None``.

    Shape:
        - sa: :math:`(N, 1, h, w)`; ca: :math:`(N, C, 1, 1)`; boxes: :math:`(N, 4)`
    """
    return localisation_lift(effective_spatial_factor(sa, ca, alpha), boxes, image_size)


def effective_stats(
    maps: Mapping[str, AttentionMaps],
    alphas: Mapping[str, float | None],
    boxes: Tensor | None = None,
    image_size: tuple[int, int] | None = None,
) -> dict[str, dict[str, float | None]]:
    """Per block: its ``alpha`` and the effective factor's mean, spread, minimum and (with boxes) lift.

    Args:
        maps (Mapping): block name -> its maps over the test images (from :func:`~cbam_dsa.viz.collect_maps`).
        alphas (Mapping): block name -> its ``alpha`` (``None`` or absent for a block without a blend).
        boxes (Tensor, optional): the digits' boxes; without them no lift. Default: ``None``.
        image_size (tuple, optional): ``(H, W)`` of the images; needed with ``boxes``. Default: ``None``.

    Returns:
        dict: ``{"alpha": {block: float or None}, "effective_mean": {...}, "effective_spread": {...},
        "effective_min": {...}}`` and ``"effective_lift"`` with boxes. ``effective_spread`` is the standard
        deviation of the factor within an image, averaged over images.

    Shape:
        - boxes: :math:`(N, 4)` for maps of :math:`N` images
    """
    if boxes is not None and image_size is None:
        raise ValueError("image_size must be given with boxes, but got None")
    stats: dict[str, dict[str, float | None]] = {
        "alpha": {},
        "effective_mean": {},
        "effective_spread": {},
        "effective_min": {},
    }
    if boxes is not None:
        stats["effective_lift"] = {}
    for name, block_maps in maps.items():
        alpha = alphas.get(name)
        factor = effective_spatial_factor(block_maps.sa, block_maps.ca, alpha)
        stats["alpha"][name] = None if alpha is None else float(alpha)
        stats["effective_mean"][name] = float(factor.mean())
        stats["effective_spread"][name] = float(factor.flatten(1).std(dim=1).mean()) if factor[0].numel() > 1 else 0.0
        stats["effective_min"][name] = float(factor.min())
        if boxes is not None:
            stats["effective_lift"][name] = effective_lift(block_maps.sa, boxes, image_size, block_maps.ca, alpha)
    return stats
