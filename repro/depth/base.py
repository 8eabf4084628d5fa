"""Depth-map normalisation, the estimator interface and the batched estimation loop.

DepthG (Sick et al., CVPR 2024) guides feature learning with a depth map per training
crop. The maps come from a monocular estimator (ZoeDepth best, MiDaS second; supplement
Table 3) or from the sensor (NYUv2), and "All maps are Min-Max normalized" (supplement
C.4; sec. 3.2, eq. 4 uses the normalised depth d in [0, 1]). This module holds the parts
that every depth source shares:

* :func:`normalize_depth`: per-map min-max normalisation with the raw range kept.
* :class:`DepthEstimator`: ``predict`` (raw output at the input resolution) and
  ``to_depth`` (orientation so that larger = farther, which DepthG's product kernel
  ``D_ij = d_i d_j`` needs).
* :func:`estimate_normalized`: batches, progress bar (images/s), ``torch.inference_mode``.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = [
    "KINDS",
    "ImageBatch",
    "DepthEstimator",
    "as_image_list",
    "normalize_depth",
    "normalize_prediction",
    "estimate_normalized",
]

#: Output kinds of :meth:`DepthEstimator.predict`.
#: ``"metric"``: depth in metres (ZoeDepth, sensor). ``"relative_inverse"``: affine-invariant
#: inverse depth / disparity, larger = nearer (MiDaS). ``"normalized"``: already a [0, 1]
#: depth-like map, larger = farther, that must NOT be re-normalised (the placebo planes).
KINDS = ("metric", "relative_inverse", "normalized")

#: A batch of RGB images: a list of ``(H, W, 3)`` uint8 arrays or a ``(B, H, W, 3)`` uint8 tensor.
ImageBatch = Union[Sequence[np.ndarray], Tensor]


def normalize_depth(depth: np.ndarray | Tensor) -> tuple[np.ndarray | Tensor, tuple]:
    """Min-max normalise each depth map to [0, 1] (DepthG sec. 3.2 / eq. 4, supplement C.4).

    Every trailing ``(H, W)`` map is normalised on its own: ``(d - d_min) / (d_max - d_min)``.
    A constant map (``d_max == d_min``) becomes all zeros and keeps its range.

    Args:
        depth: ``(..., H, W)`` depth-like map(s), any real dtype, numpy or torch. Units are
            whatever the source gives (metres for metric sources).

    Returns:
        ``(normalized, (d_min, d_max))``: ``normalized`` has the input's shape and container
        type (numpy -> numpy, torch -> torch on the same device), dtype float32, values in
        [0, 1] with exactly 0 at the minimum and exactly 1 at the maximum of each
        non-constant map. For a single ``(H, W)`` map ``d_min``/``d_max`` are Python floats;
        for ``(..., H, W)`` they are arrays/tensors of shape ``(...)``.

    Raises:
        ValueError: if the input has fewer than 2 dimensions, an empty map, or any NaN/inf.
    """
    is_numpy = not isinstance(depth, Tensor)
    t = torch.from_numpy(np.asarray(depth)) if is_numpy else depth
    if t.ndim < 2 or t.shape[-1] == 0 or t.shape[-2] == 0:
        raise ValueError(f"depth must be (..., H, W) with H, W > 0; got shape {tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"depth must be real-valued, got dtype {t.dtype}")
    # float64 for the arithmetic so that the extremes map to exactly 0 and 1
    t64 = t.to(torch.float64)
    if not bool(torch.isfinite(t64).all()):
        bad = int((~torch.isfinite(t64)).sum())
        raise ValueError(f"depth holds {bad} non-finite value(s) (NaN/inf); fill or mask them first")
    lo = t64.amin(dim=(-2, -1), keepdim=True)
    hi = t64.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    safe = torch.where(span > 0, span, torch.ones_like(span))
    norm = torch.where(span > 0, (t64 - lo) / safe, torch.zeros_like(t64)).clamp_(0.0, 1.0).to(torch.float32)
    lo, hi = lo[..., 0, 0], hi[..., 0, 0]
    if t.ndim == 2:
        rng: tuple = (float(lo), float(hi))
    elif is_numpy:
        rng = (lo.numpy(), hi.numpy())
    else:
        rng = (lo, hi)
    return (norm.numpy() if is_numpy else norm), rng


def as_image_list(images: ImageBatch) -> list[np.ndarray]:
    """Check a batch of RGB images and return it as a list of ``(H, W, 3)`` uint8 arrays.

    Args:
        images: list of ``(H, W, 3)`` uint8 arrays, or a ``(B, H, W, 3)`` uint8 tensor.

    Returns:
        The images as C-contiguous numpy arrays (a tensor is moved to the CPU).

    Raises:
        TypeError: for a non-uint8 image. ValueError: for a wrong shape or an empty batch.
    """
    if isinstance(images, Tensor):
        if images.ndim != 4:
            raise ValueError(f"an image tensor must be (B, H, W, 3); got shape {tuple(images.shape)}")
        images = list(images.detach().cpu().numpy())
    out = []
    for i, img in enumerate(images):
        img = np.asarray(img)
        if img.dtype != np.uint8:
            raise TypeError(f"image {i} must be uint8 RGB, got dtype {img.dtype}")
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"image {i} must be (H, W, 3) RGB, got shape {img.shape}")
        out.append(np.ascontiguousarray(img))
    if not out:
        raise ValueError("empty image batch")
    return out


class DepthEstimator(abc.ABC):
    """A source of one depth-like map per RGB image.

    Attributes:
        name: registry name (``"zoedepth"``, ``"midas"``, ...).
        kind: one of :data:`KINDS`; decides what :meth:`to_depth` does.
        device: torch device the estimator runs on.
    """

    name: str = "base"
    kind: str = "metric"
    device: torch.device = torch.device("cpu")

    @abc.abstractmethod
    def predict(self, images: ImageBatch) -> Tensor:
        """Run the estimator.

        Args:
            images: ``B`` RGB images of one size, ``(H, W, 3)`` uint8 each (list or
                ``(B, H, W, 3)`` tensor).

        Returns:
            ``(B, H, W)`` float32 raw prediction at the INPUT resolution (the model output
            is resized back bilinearly), on :attr:`device`. Units depend on :attr:`kind`.
        """

    def to_depth(self, raw: Tensor | np.ndarray, eps: float = 1e-3) -> Tensor | np.ndarray:
        """Orient a raw prediction as depth: larger = farther.

        ``"metric"`` and ``"normalized"`` outputs already are depth (identity, cast to float32).
        ``"relative_inverse"`` output (MiDaS disparity, larger = nearer) becomes
        ``1 / clamp(raw, min=eps * raw.max())`` per ``(H, W)`` map. This is OUR choice: the
        DepthG paper does not say how the MiDaS output was oriented, but the product kernel
        ``D_ij = d_i d_j`` (sec. 3.2) needs far = large. The clamp bounds the far range at
        ``1 / eps`` times the nearest point, so zero/negative disparities (sky, ReLU zeros)
        stay finite. The result is relative depth up to an unknown scale and shift, which
        min-max normalisation then removes (the shift only approximately).

        Args:
            raw: ``(..., H, W)`` output of :meth:`predict` (torch or numpy).
            eps: relative disparity floor for ``"relative_inverse"``.

        Returns:
            Same shape and container type, float32, larger = farther.

        Raises:
            ValueError: for an unknown :attr:`kind`.
        """
        if self.kind not in KINDS:
            raise ValueError(f"unknown depth kind {self.kind!r}; expected one of {KINDS}")
        is_numpy = not isinstance(raw, Tensor)
        t = (torch.from_numpy(np.asarray(raw)) if is_numpy else raw).to(torch.float32)
        if self.kind == "relative_inverse":
            peak = t.amax(dim=(-2, -1), keepdim=True)
            floor = (eps * peak).clamp(min=torch.finfo(torch.float32).tiny)
            t = 1.0 / torch.maximum(t, floor)
        return t.numpy() if is_numpy else t

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r}, device={self.device})"


def normalize_prediction(estimator: DepthEstimator, raw: Tensor) -> list[tuple[np.ndarray, tuple[float, float]]]:
    """Turn a ``predict`` output into normalised maps, honouring the estimator's kind.

    ``to_depth`` then :func:`normalize_depth` per map; for ``kind == "normalized"`` (the
    placebo planes) the map is kept as it is, so a constant image plane stays 1.0 instead
    of collapsing to 0, and the reported range is the map's own ``(min, max)``.

    Args:
        estimator: the estimator that produced ``raw``.
        raw: ``(B, H, W)`` raw prediction.

    Returns:
        ``B`` pairs ``((H, W) float32 map in [0, 1], (d_min, d_max))``; the range is in the
        units of ``to_depth(raw)`` (metres for metric sources).
    """
    depth = estimator.to_depth(raw)
    depth = depth.detach().cpu() if isinstance(depth, Tensor) else torch.from_numpy(np.asarray(depth))
    out = []
    for d in depth:
        if estimator.kind == "normalized":
            m = d.numpy().astype(np.float32)
            out.append((m, (float(m.min()), float(m.max()))))
        else:
            out.append(normalize_depth(d.numpy()))
    return out


def estimate_normalized(
    estimator: DepthEstimator, images: ImageBatch, batch_size: int = 8, progress: bool = True
) -> tuple[list[np.ndarray], list[tuple[float, float]]]:
    """Predict and min-max normalise a depth map for every image (DepthG supplement C.4).

    Consecutive images of the same size are batched (at most ``batch_size`` per call) and
    run under ``torch.inference_mode()`` on the estimator's device.

    Args:
        estimator: any :class:`DepthEstimator`.
        images: RGB images, ``(H, W, 3)`` uint8 each; sizes may differ between images.
            (For :class:`repro.depth.sensor.SensorDepth`: ``(H, W)`` metres each.)
        batch_size: most images per ``predict`` call.
        progress: show a tqdm bar with the rate in images/s.

    Returns:
        ``(maps, ranges)``: per image a ``(H, W)`` float32 map in [0, 1] (larger = farther)
        and the raw ``(d_min, d_max)`` of ``to_depth(predict(image))``.

    Raises:
        ValueError: if ``batch_size < 1``, or from the estimator/normalisation.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    items = list(images) if not isinstance(images, Tensor) else list(images.unbind(0))
    maps: list[np.ndarray] = []
    ranges: list[tuple[float, float]] = []
    bar = tqdm(total=len(items), desc=f"depth ({estimator.name})", unit="img", disable=not progress)
    start = 0
    with torch.inference_mode():
        while start < len(items):
            size = tuple(items[start].shape[:2])
            stop = start + 1
            while stop < len(items) and stop - start < batch_size and tuple(items[stop].shape[:2]) == size:
                stop += 1
            batch = items[start:stop]
            raw = estimator.predict(torch.stack(batch) if isinstance(batch[0], Tensor) else batch)
            for m, r in normalize_prediction(estimator, raw):
                maps.append(m)
                ranges.append(r)
            bar.update(stop - start)
            start = stop
    bar.close()
    return maps, ranges
