"""Depth sources for DepthG's depth guidance (sec. 3.2, supplement C.4 and Table 3).

Every source is a :class:`DepthEstimator`; :func:`get_estimator` builds one by name and
:func:`estimate_normalized` turns images into min-max normalised [0, 1] maps (larger = farther)
plus the raw range of each map.

========================  =====================  ==========================================
name                      kind                   output of ``predict``
========================  =====================  ==========================================
``"zoedepth"``            ``metric``             metres (ZoeD_N, best in DepthG)
``"midas"``               ``relative_inverse``   disparity up to scale/shift (MiDaS v3/DPT)
``"sensor"``              ``metric``             metres, holes filled (NYUv2 sensor depth)
``"image_plane"``         ``normalized``         constant 1.0 (placebo)
``"perspective_plane"``   ``normalized``         ground plane in [0, 1] (placebo)
========================  =====================  ==========================================

Depth sources that are not estimators here: ``"kbr"`` / ``"files"`` read per-image maps computed
elsewhere (:mod:`repro.depth.files`); ``"mde_features"`` (ZoeDepth's penultimate-layer features,
:class:`repro.depth.hf.ZoeDepthFeatures`) and ``"semseg"`` (the crop's labels) are guidance signals
that are not depth maps (:mod:`repro.method.guidance`).

The transformers-based estimators are imported lazily, so ``import repro.depth`` stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from repro.depth.base import KINDS, DepthEstimator, estimate_normalized, normalize_depth, normalize_prediction
from repro.depth.planes import PLANES, PlaneEstimator, image_plane, perspective_plane
from repro.depth.sensor import SensorDepth, read_depth_png
from repro.utils.files import content_sha256

__all__ = [
    "ESTIMATORS",
    "KINDS",
    "DepthEstimator",
    "MidasEstimator",
    "PlaneEstimator",
    "SensorDepth",
    "ZoeDepthEstimator",
    "estimate_normalized",
    "get_estimator",
    "image_plane",
    "normalize_depth",
    "normalize_prediction",
    "perspective_plane",
    "read_depth_png",
    "weights_sha256",
    "save_random_model",
]

#: Names accepted by :func:`get_estimator`.
ESTIMATORS = ("zoedepth", "midas", "sensor", "image_plane", "perspective_plane")


def get_estimator(name: str, weights: str | Path | None = None, device: str | torch.device | None = None,
                  **kwargs: Any) -> DepthEstimator:
    """Build a depth source by name.

    Args:
        name: one of :data:`ESTIMATORS`.
        weights: local weights folder for ``"zoedepth"`` / ``"midas"``; ``None`` means
            ``zoedepth-nyu`` (ZoeD_N) / ``dpt-hybrid-midas`` in the weights folder
            (``$REPRO_WEIGHTS``, default ``./weights``). Ignored by the other sources.
        device: torch device; default CUDA when available for the networks, CPU otherwise.
        **kwargs: passed to the estimator, e.g. ``tta=True`` (ZoeDepth: ``infer``'s flip + reflect padding; MiDaS: flip) / ``dtype`` (networks),
            ``invalid="raise"`` (sensor), ``horizon=0.4`` (perspective plane). The sensor and the
            planes have no test-time augmentation: ``tta`` is ignored for them (the data stages pass
            ``data.depth_tta`` whatever the source).

    Returns:
        The estimator.

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
        repro.utils.errors.MissingFileError: if network weights are missing (names the download command).
    """
    if name in ("zoedepth", "midas"):
        from repro.depth import hf

        from repro.models.backbone import default_weights_dir

        folder = Path(weights) if weights is not None else default_weights_dir() / hf.DEFAULT_WEIGHTS[name].name
        cls = hf.ZoeDepthEstimator if name == "zoedepth" else hf.MidasEstimator
        return cls(folder, device=device, **kwargs)
    if name in ("sensor", *PLANES):  # no network, so no test-time augmentation: ``tta`` is accepted and ignored
        kwargs.pop("tta", None)
    if name == "sensor":
        return SensorDepth(device=device, **kwargs)
    if name in PLANES:
        return PlaneEstimator(name, device=device, **kwargs)
    raise ValueError(f"unknown depth estimator {name!r}; known: {', '.join(ESTIMATORS)}")


def __getattr__(attr: str) -> Any:
    """Lazy access to the transformers-based names (keeps ``import repro.depth`` light)."""
    if attr in ("ZoeDepthEstimator", "MidasEstimator", "save_random_model"):
        from repro.depth import hf

        return getattr(hf, attr)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def weights_sha256(source: str, weights: str | Path | None) -> str | None:
    """Content identity of a network depth estimator's weights folder (None for sensor and plane sources).

    ``weights`` None means the estimator's default folder (:func:`repro.depth.get_estimator`); a
    missing folder gives None (the estimator then names the download).
    """
    from repro.depth import hf  # transformers-based: imported on first use

    if source not in hf.DEFAULT_WEIGHTS:
        return None
    if weights is None:
        from repro.models.backbone import default_weights_dir

        weights = default_weights_dir() / hf.DEFAULT_WEIGHTS[source].name
    return content_sha256(weights)
