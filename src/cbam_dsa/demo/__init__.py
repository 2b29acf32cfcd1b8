"""The demo: Cluttered Digits, a small ResNet with each attention variant, training, and the report.

Run it with ``cbam-dsa demo`` (see ``cbam-dsa demo --help``). The pieces are importable on their own:

* :mod:`cbam_dsa.demo.data`: :func:`make_cluttered_digits`, :class:`ClutteredDigitsConfig`, :func:`load_image_folder`
* :mod:`cbam_dsa.demo.model`: :class:`DemoNet` and the variants ``none``, ``cbam``, ``dsa``, ``dsa-learnable-alpha``,
  ``dsa-zero-start``
* :mod:`cbam_dsa.demo.train`: :class:`TrainConfig`, :func:`train_variant`, :func:`train_model`
* :mod:`cbam_dsa.demo.distributed`: :func:`setup_distributed`, :func:`teardown_distributed` (one process or
  ``torchrun``)
* :mod:`cbam_dsa.demo.localisation`: :func:`localisation_lift`, :func:`box_coverage`
* :mod:`cbam_dsa.demo.effective`: :func:`effective_spatial_factor`, :func:`effective_lift` (what the attention
  really multiplies the features by, with the blend weight alpha)
* :mod:`cbam_dsa.demo.retrofit`: :func:`insert_blocks`, :func:`retrofit_experiment` (``cbam-dsa demo --retrofit``)
* :mod:`cbam_dsa.demo.report`, :mod:`cbam_dsa.demo.retrofit_report`: :func:`write_report`,
  :func:`write_retrofit_report`; :mod:`cbam_dsa.demo.verdicts`: the report's statistics and verdict sentences

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
    "localisation_lift": "localisation",
    "train_model": "train",
    "train_variant": "train",
    "effective_lift": "effective",
    "effective_spatial_factor": "effective",
    "insert_blocks": "retrofit",
    "retrofit_experiment": "retrofit",
    "write_report": "report",
    "write_retrofit_report": "retrofit_report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
