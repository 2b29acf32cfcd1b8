"""The demo: Cluttered Digits, a small ResNet with each attention variant, training, and the report.

Run it with ``cbam-dsa demo`` (see ``cbam-dsa demo --help``). The pieces are importable on their own:

* :mod:`cbam_dsa.demo.data`: :func:`make_cluttered_digits`, :class:`ClutteredDigitsConfig`, :func:`load_image_folder`
* :mod:`cbam_dsa.demo.model`: :class:`DemoNet` and the variants ``none``, ``cbam``, ``dsa``, ``dsa-learnable-alpha``
* :mod:`cbam_dsa.demo.train`: :class:`TrainConfig`, :func:`train_variant`, :func:`localisation_lift`
* :mod:`cbam_dsa.demo.report`: :func:`write_report`

Names are imported on first use, so ``import cbam_dsa.demo`` (and ``cbam-dsa --help``) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ClutteredDigitsConfig": "data",
    "ImageSet": "data",
    "load_image_folder": "data",
    "make_cluttered_digits": "data",
    "VARIANTS": "model",
    "DemoNet": "model",
    "build_model": "model",
    "TrainConfig": "train",
    "localisation_lift": "train",
    "train_variant": "train",
    "write_report": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
