"""How a depth map is normalised and stored: float [0, 1], 8-bit (R4) or the Potsdam integer cast (R5).

``data.depth_encoding`` (docs/fidelity.md):

- ``"float"``: min-max to [0, 1] in float (eq. 4 of DepthG; :func:`repro.depth.normalize_depth`).
- ``"uint8"``: what the released code stored, 8-bit PNGs read back as integers 0..255. Two rules,
  by where the map came from:

  * estimated depth (``generate_depth.py``): ``(d - d.min()) / (d.max() - d.min())`` in NumPy
    float32, ``* 255``, ``.astype(np.uint8)``: TRUNCATION (:func:`quantize_estimate`);
  * NYUv2 sensor depth (``src/data.py NYUv2`` then ``src/crop_datasets.py``): min-max of the
    float32 metres per full frame, then ``mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)``:
    rounding half up (:func:`quantize_sensor`).

- ``"int_cast"``: ``src/data.py Potsdam`` read the 8-bit map with ``to_tensor`` (k / 255), resized
  it, and ``ToTargetTensor`` cast it to int64: 1 where k == 255, else 0 (:func:`int_cast`).

Depth travels to the trainer as float32 in [0, 1]: ``k / 255`` for ``uint8`` (``round(d * 255)``
gives k back exactly), ``{0.0, 1.0}`` for ``int_cast``.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["ENCODINGS", "quantize_estimate", "quantize_sensor", "int_cast", "uint8_to_unit", "unit_to_uint8"]

ENCODINGS = ("float", "uint8", "int_cast")


def _check(depth: np.ndarray) -> np.ndarray:
    d = np.asarray(depth)
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"depth must be one (H, W) map, got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError(f"depth holds {int((~np.isfinite(d)).sum())} non-finite value(s); fill them first")
    return d.astype(np.float32)


def quantize_estimate(depth: np.ndarray) -> np.ndarray:
    """8-bit map of an estimator's depth, as the released ``generate_depth.py`` wrote it.

    ``x = (d - d.min()) / (d.max() - d.min())`` in float32, then ``(x * 255).astype(np.uint8)``
    (truncation: only the maximum becomes 255). A constant map becomes all zeros (the released
    script would divide by zero).

    Args:
        depth: ``(H, W)`` depth (metres, larger = farther), any real dtype; cast to float32 first
            as the model output was.

    Returns:
        ``(H, W)`` uint8.

    Raises:
        ValueError: for a non-2-D map or non-finite values.
    """
    d = _check(depth)
    lo, hi = d.min(), d.max()
    if hi == lo:
        return np.zeros(d.shape, np.uint8)
    x = (d - lo) / (hi - lo)
    return (x * 255).astype(np.uint8)


def quantize_sensor(depth_m: np.ndarray) -> np.ndarray:
    """8-bit map of NYUv2 sensor depth, as the released DepthG code stored it per five-crop.

    ``src/data.py NYUv2``: float32 metres, min-max over the FULL frame with torch
    (``(d - d.min()) / (d.max() - d.min())``); ``src/crop_datasets.py``:
    ``mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)`` (rounding half up). The quantisation is
    per pixel, so quantising the frame and then five-cropping equals the released per-crop order.
    The released code divided its 1e-4 m PNG integers by 1e4; repro's NYUv2 adapter gives metres
    from millimetre PNGs (mm / 1000), which can round ties differently on a few pixels.

    Args:
        depth_m: ``(H, W)`` depth in metres (float32).

    Returns:
        ``(H, W)`` uint8. A constant frame becomes all zeros.

    Raises:
        ValueError: for a non-2-D map or non-finite values.
    """
    d = torch.from_numpy(_check(depth_m))
    lo, hi = d.min(), d.max()
    if bool(hi == lo):
        return np.zeros(tuple(d.shape), np.uint8)
    x = (d - lo) / (hi - lo)
    return x.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).numpy()


def int_cast(depth01: torch.Tensor | np.ndarray) -> np.ndarray:
    """``ToTargetTensor`` applied to a [0, 1] depth map: int64 truncation, as ``src/data.py Potsdam`` did.

    Args:
        depth01: ``(H, W)`` float map in [0, 1] (e.g. ``to_tensor`` of an 8-bit PNG, resized).

    Returns:
        ``(H, W)`` float32 in ``{0.0, 1.0}``: 1 exactly where the map is 1.0.

    Raises:
        ValueError: for values outside [0, 1].
    """
    t = torch.as_tensor(np.asarray(depth01, dtype=np.float32))
    if bool((t < 0).any()) or bool((t > 1).any()):
        raise ValueError("int_cast expects a depth map in [0, 1]")
    return torch.as_tensor(t.numpy(), dtype=torch.int64).numpy().astype(np.float32)


def uint8_to_unit(k: np.ndarray) -> np.ndarray:
    """8-bit depth ``k`` as the float32 [0, 1] value that travels to the trainer: ``k / 255``."""
    k = np.asarray(k)
    if k.dtype != np.uint8:
        raise TypeError(f"expected uint8 depth, got {k.dtype}")
    return k.astype(np.float32) / np.float32(255)


def unit_to_uint8(depth01: np.ndarray) -> np.ndarray:
    """Inverse of :func:`uint8_to_unit`: ``round(d * 255)``.

    Raises:
        ValueError: if the map is not exactly ``k / 255`` for integers k (it was not 8-bit depth).
    """
    d = np.asarray(depth01, dtype=np.float32)
    k = np.rint(d.astype(np.float64) * 255)
    if k.min(initial=0) < 0 or k.max(initial=0) > 255 or not np.array_equal(uint8_to_unit(k.astype(np.uint8)), d):
        raise ValueError("depth map is not 8-bit depth stored as k / 255")
    return k.astype(np.uint8)
