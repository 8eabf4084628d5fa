"""Placebo depth maps without scene information (DepthG supplement Table 3 guidance ablations).

DepthG's supplement compares its depth guidance with two maps that carry no information about
the scene, "image plane" and "perspective plane". The paper gives no formulas; ours are:

* :func:`image_plane`: a fronto-parallel plane, i.e. every pixel at the same depth. Min-max
  normalisation would turn any constant map into all zeros, so we define it directly in the
  normalised domain as the constant **1.0** and skip normalisation (estimator kind
  ``"normalized"``). Why 1.0 rather than 0: with DepthG's product kernel ``D_ij = d_i d_j``
  (sec. 3.2), 1.0 gives ``D_ij = 1`` for every pair, i.e. "all points are equally similar in
  depth", which is what a plane says; the depth term then exerts the same pull ``1 - b`` on
  every pair. A zero map would give ``D_ij = 0`` for every pair, which reads as "no two points
  share depth" and turns the term into a uniform push ``-b``. Either way nothing depends on
  scene content; the guided sampling and 3D-LHP see a constant ``z`` and reduce to their 2D
  forms.
* :func:`perspective_plane`: an infinite ground plane seen by a level pinhole camera. A ground
  point imaged at normalised row ``v`` (pixel centre, 0 = top, 1 = bottom) below the horizon
  row ``h`` lies at depth ``Z = c / (v - h)`` (``c`` = camera height x focal length, dropped
  by the normalisation). The map is::

      v_b   = (H - 0.5) / H                        # bottom row centre (nearest point)
      z(v)  = 1 / max(v - h, (v_b - h) / r)        # r = max_ratio, clips the far field
      map   = (z - min z) / (max z - min z)        # in [0, 1], 0 at the bottom row

  Rows at or just below the horizon (and everything above it, the "sky") take the clipped
  farthest value ``r`` times the nearest depth. Every column is the same. The map is
  non-decreasing towards the top and strictly increasing between the bottom and the clip row.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from repro.depth.base import DepthEstimator, ImageBatch, as_image_list

__all__ = ["image_plane", "perspective_plane", "PlaneEstimator", "PLANES"]


def image_plane(h: int, w: int) -> np.ndarray:
    """Fronto-parallel placebo plane (supplement Table 3, "image plane").

    Args:
        h: height in pixels.
        w: width in pixels.

    Returns:
        ``(h, w)`` float32, every value 1.0 (already normalised; see the module docstring for
        why 1.0 and why it must not be min-max normalised again).

    Raises:
        ValueError: if ``h`` or ``w`` is not positive.
    """
    _check_size(h, w)
    return np.ones((h, w), dtype=np.float32)


def perspective_plane(h: int, w: int, *, horizon: float = 0.5, max_ratio: float = 10.0) -> np.ndarray:
    """Ground plane in perspective (supplement Table 3, "perspective plane").

    Depth ``1 / (v - horizon)`` per row, clipped at ``max_ratio`` times the nearest depth and
    min-max normalised (exact formula in the module docstring).

    Args:
        h: height in pixels.
        w: width in pixels.
        horizon: horizon row as a fraction of the height from the top, in ``[0, 1)``.
        max_ratio: far/near depth ratio at which the far field is clipped (> 1). The default
            10 is about the NYUv2 sensor range (roughly 1 m to 10 m).

    Returns:
        ``(h, w)`` float32 in [0, 1]: 0 on the bottom row, 1 at and above the clip row.

    Raises:
        ValueError: for a non-positive size, ``horizon`` outside ``[0, 1)``, ``max_ratio <= 1``,
            or an image too short to have a row centre below the horizon.
    """
    _check_size(h, w)
    if not 0.0 <= horizon < 1.0:
        raise ValueError(f"horizon must be in [0, 1), got {horizon}")
    if not max_ratio > 1.0:
        raise ValueError(f"max_ratio must be > 1, got {max_ratio}")
    v = (np.arange(h, dtype=np.float64) + 0.5) / h
    v_bottom = v[-1]
    if v_bottom <= horizon:
        raise ValueError(f"no row of a {h}-pixel image lies below horizon={horizon}")
    z = 1.0 / np.maximum(v - horizon, (v_bottom - horizon) / max_ratio)
    span = z.max() - z.min()
    if span <= 0:  # a single row: nothing to order
        col = np.zeros(h)
    else:
        col = (z - z.min()) / span
    return np.repeat(col[:, None], w, axis=1).astype(np.float32)


def _check_size(h: int, w: int) -> None:
    if int(h) <= 0 or int(w) <= 0:
        raise ValueError(f"plane size must be positive, got {h}x{w}")


#: Registry names of the placebo planes.
PLANES = ("image_plane", "perspective_plane")


class PlaneEstimator(DepthEstimator):
    """Estimator that returns a placebo plane of the input size and ignores image content.

    ``kind`` is ``"normalized"``: the maps are already in [0, 1] (larger = farther) and
    :func:`repro.depth.base.estimate_normalized` keeps them as they are, so the image plane
    stays at 1.0.

    Args:
        name: ``"image_plane"`` or ``"perspective_plane"``.
        horizon: horizon of the perspective plane (ignored by the image plane).
        max_ratio: far-field clip of the perspective plane (ignored by the image plane).
        device: device of the returned tensors (default CPU).

    Raises:
        ValueError: for an unknown ``name``.
    """

    kind = "normalized"

    def __init__(self, name: str, *, horizon: float = 0.5, max_ratio: float = 10.0,
                 device: str | torch.device | None = None) -> None:
        if name not in PLANES:
            raise ValueError(f"unknown plane {name!r}; expected one of {PLANES}")
        self.name = name
        self.horizon, self.max_ratio = horizon, max_ratio
        self.device = torch.device(device or "cpu")

    def plane(self, h: int, w: int) -> np.ndarray:
        """The ``(h, w)`` float32 map this estimator returns for any image of that size."""
        if self.name == "image_plane":
            return image_plane(h, w)
        return perspective_plane(h, w, horizon=self.horizon, max_ratio=self.max_ratio)

    def predict(self, images: ImageBatch) -> Tensor:
        """Return ``(B, H, W)`` float32 planes of the input size (image content is ignored).

        Raises:
            TypeError / ValueError: for images that are not ``(H, W, 3)`` uint8 of one size.
        """
        imgs = as_image_list(images)
        sizes = {img.shape[:2] for img in imgs}
        if len(sizes) != 1:
            raise ValueError(f"images in one batch must share a size, got {sorted(sizes)}")
        one = torch.from_numpy(self.plane(*imgs[0].shape[:2]))
        return one.expand(len(imgs), *one.shape).clone().to(self.device)
