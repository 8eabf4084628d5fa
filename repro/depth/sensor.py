"""Sensor depth (NYUv2 Kinect) as a depth source with the same normalisation path.

DepthG trains on NYUv2 with the dataset's own depth (supplement Table 3, "sensor depth").
:class:`SensorDepth` is a :class:`~repro.depth.base.DepthEstimator` of kind ``"metric"``
whose "prediction" is the sensor map itself: :meth:`SensorDepth.from_sensor` cleans one map,
:meth:`SensorDepth.predict` stacks several, and ``to_depth`` / ``normalize_depth`` /
``estimate_normalized`` work exactly as for ZoeDepth.

Invalid pixels (0 = no reading, negative, NaN, inf) are FILLED with the value of the nearest
valid pixel (Euclidean distance; ties resolved by :func:`scipy.ndimage.distance_transform_edt`)
by default: the labelled NYUv2 maps are already in-painted, raw Kinect frames are not, and
one missing pixel must not turn a whole map into an error. ``invalid="raise"`` instead raises
on any invalid pixel. A map with no valid pixel always raises.

Where it happens in the pipeline: the NYUv2 adapter reads each depth PNG with
:func:`sensor_depth_from_png_array`, which fills the holes on the FULL frame, before five-crop
and bilinear resizing (filling after resizing would first smear the zeros into their
neighbours). The crops therefore hold hole-free metres, the ``sensor`` depth stage refuses a
crop map with any invalid pixel, and the number of filled pixels is kept in each sample's
metadata (``depth_holes_filled``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from repro.depth.base import DepthEstimator
from repro.utils.errors import MissingFileError

__all__ = ["SensorDepth", "fill_invalid_nearest", "read_depth_png", "sensor_depth_from_png_array"]


def fill_invalid_nearest(depth: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Replace every invalid pixel with the value of its nearest valid pixel.

    Args:
        depth: ``(H, W)`` map.
        valid: ``(H, W)`` bool mask of pixels to keep.

    Returns:
        ``(H, W)`` copy of ``depth`` with the invalid pixels filled.

    Raises:
        ValueError: if no pixel is valid or the shapes differ.
    """
    if depth.shape != valid.shape:
        raise ValueError(f"depth {depth.shape} and mask {valid.shape} differ in shape")
    if not valid.any():
        raise ValueError("sensor depth has no valid pixel (all 0 / non-finite)")
    if valid.all():
        return depth.copy()
    # distance to the nearest zero of the input = nearest valid pixel; indices point at it
    _, (rows, cols) = ndimage.distance_transform_edt(~valid, return_indices=True)
    return depth[rows, cols]


def sensor_depth_from_png_array(raw: np.ndarray, path: str | Path, scale: float = 1000.0) -> tuple[np.ndarray, int]:
    """A sensor depth PNG's pixels -> float32 metres with the holes (0) filled (:func:`fill_invalid_nearest`).

    Args:
        raw: ``(H, W)`` pixels as read from the PNG (NYUv2: uint16 millimetres, 0 = no reading).
        path: the file, for the error messages.
        scale: units per metre (1000 for millimetres).

    Returns:
        ``(depth_m, holes)``: ``(H, W)`` float32 metres, every pixel > 0, and the number of
        pixels that were filled.

    Raises:
        DatasetError: for a non-integer or 8-bit PNG (an 8-bit export cannot hold millimetres up
            to 10 m: re-export it as 16 bit), a map without any reading (all 0) or a constant one; each
            names the file.
    """
    from repro.utils.errors import DatasetError

    raw = np.asarray(raw)
    if raw.ndim != 2 or not np.issubdtype(raw.dtype, np.integer) or raw.dtype == np.bool_:
        raise DatasetError(f"{path}: expected a single-channel integer depth PNG, got {raw.dtype} {raw.shape}")
    if raw.dtype.itemsize < 2:
        raise DatasetError(f"{path}: 8-bit depth PNG ({raw.dtype}, values {int(raw.min())}..{int(raw.max())}); "
                           f"sensor depth must be 16-bit integers ({scale:g} per metre): re-export it as uint16")
    valid = raw > 0
    if not valid.any():
        raise DatasetError(f"{path}: depth map has no reading (every pixel is 0); re-export the file or leave it out")
    readings = raw[valid]
    if readings.min() == readings.max():
        raise DatasetError(f"{path}: depth map is constant (every reading is {int(readings[0])}, "
                           f"{readings[0] / scale:g} m): not a depth measurement; re-export the file or leave it out")
    depth = (raw.astype(np.float64) / scale).astype(np.float32)
    return fill_invalid_nearest(depth, valid), int((~valid).sum())


def read_depth_png(path: str | Path, scale: float = 1000.0) -> np.ndarray:
    """Read an integer depth PNG and convert it to float32 metres (``value / scale``).

    Args:
        path: 16-bit depth PNG, e.g. NYUv2 ``depth/NNNN.png`` in millimetres.
        scale: units per metre (1000 for millimetres).

    Returns:
        ``(H, W)`` float32 metres; 0 (no reading) stays 0.

    Raises:
        MissingFileError: if the file does not exist.
        ValueError: if the PNG does not hold one integer channel.
    """
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise MissingFileError("sensor depth PNG", path, "check the dataset root (NYUv2: depth/NNNN.png, uint16 mm)")
    with Image.open(path) as im:
        raw = np.array(im)
    if raw.ndim != 2 or not np.issubdtype(raw.dtype, np.integer):
        raise ValueError(f"{path}: expected a single-channel integer depth PNG, got {raw.dtype} {raw.shape}")
    return (raw.astype(np.float64) / scale).astype(np.float32)


class SensorDepth(DepthEstimator):
    """Depth from a sensor, in metres (kind ``"metric"``; ``to_depth`` is the identity).

    Args:
        invalid: ``"fill"`` (default): invalid pixels take the nearest valid value;
            ``"raise"``: any invalid pixel raises ``ValueError``.
        device: device of the tensors :meth:`predict` returns (default CPU).

    Raises:
        ValueError: for an unknown ``invalid`` policy.
    """

    name = "sensor"
    kind = "metric"

    def __init__(self, invalid: str = "fill", device: str | torch.device | None = None) -> None:
        if invalid not in ("fill", "raise"):
            raise ValueError(f"invalid must be 'fill' or 'raise', got {invalid!r}")
        self.invalid = invalid
        self.device = torch.device(device or "cpu")

    def from_sensor(self, depth_m: np.ndarray) -> np.ndarray:
        """Validate one sensor map and fill its holes.

        Args:
            depth_m: ``(H, W)`` depth in metres (float; 0 or non-finite = no reading).

        Returns:
            ``(H, W)`` float32 metres, every pixel finite and > 0.

        Raises:
            TypeError: for an RGB-looking ``(H, W, 3)`` input or a non-numeric dtype.
            ValueError: for a wrong shape, no valid pixel, or any invalid pixel with
                ``invalid="raise"``.
        """
        d = np.asarray(depth_m)
        if d.ndim == 3 and d.shape[-1] in (3, 4):
            raise TypeError("SensorDepth takes (H, W) depth in metres, not RGB images")
        if d.ndim != 2:
            raise ValueError(f"sensor depth must be (H, W), got shape {d.shape}")
        if not (np.issubdtype(d.dtype, np.floating) or np.issubdtype(d.dtype, np.integer)):
            raise TypeError(f"sensor depth must be numeric, got {d.dtype}")
        d = d.astype(np.float32)
        valid = np.isfinite(d) & (d > 0)
        if self.invalid == "raise" and not valid.all():
            raise ValueError(f"sensor depth has {int((~valid).sum())} invalid pixel(s) (0 / negative / non-finite)")
        return fill_invalid_nearest(d, valid)

    def predict(self, images: Sequence[np.ndarray] | Tensor) -> Tensor:
        """Stack cleaned sensor maps (the "images" of this estimator are depth maps).

        Args:
            images: list of ``(H, W)`` metre maps of one size, or a ``(B, H, W)`` tensor.

        Returns:
            ``(B, H, W)`` float32 metres on :attr:`device`.

        Raises:
            TypeError / ValueError: see :meth:`from_sensor`; ValueError for mixed sizes.
        """
        if isinstance(images, Tensor):
            if images.ndim != 3:
                raise ValueError(f"a sensor depth tensor must be (B, H, W), got {tuple(images.shape)}")
            images = list(images.detach().cpu().numpy())
        maps = [self.from_sensor(d) for d in images]
        if not maps:
            raise ValueError("empty batch")
        if len({m.shape for m in maps}) != 1:
            raise ValueError(f"maps in one batch must share a size, got {sorted({m.shape for m in maps})}")
        return torch.from_numpy(np.stack(maps)).to(self.device)
