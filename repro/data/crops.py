"""Five-crop and resize/centre-crop of image, label and depth together (STEGO sec. 3.3, SPEC section 3).

Training: each image is five-cropped at (0.5 h, 0.5 w) before kNN mining (STEGO A.12), then
every crop is resized so its minor side is 224 and centre-cropped to 224 x 224. Validation:
minor side 320, centre crop 320. Images and depth are resized bilinearly, labels with
nearest neighbour, all with PIL.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from PIL import Image

from repro.data.sample import IGNORE, Sample

__all__ = ["five_crop_boxes", "crop_sample", "resize_center_crop", "make_crops"]

CROP_NAMES = ("tl", "tr", "bl", "br", "c")


def five_crop_boxes(height: int, width: int, ratio: float = 0.5) -> list[tuple[int, int, int, int]]:
    """Boxes ``(top, left, crop_h, crop_w)`` of the four corner crops and the centre crop.

    Args:
        height: image height H in pixels.
        width: image width W in pixels.
        ratio: crop side as a fraction of the image side (0.5 in STEGO/DepthG).

    Returns:
        Five boxes in the order top-left, top-right, bottom-left, bottom-right, centre.

    Raises:
        ValueError: if the ratio is not in (0, 1] or the crop would be empty.
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"crop ratio must be in (0, 1], got {ratio}")
    ch, cw = int(height * ratio), int(width * ratio)
    if ch < 1 or cw < 1:
        raise ValueError(f"crop of {ratio} x {height}x{width} is empty")
    top_c, left_c = int(round((height - ch) / 2.0)), int(round((width - cw) / 2.0))
    return [(0, 0, ch, cw), (0, width - cw, ch, cw), (height - ch, 0, ch, cw), (height - ch, width - cw, ch, cw),
            (top_c, left_c, ch, cw)]


def crop_sample(sample: Sample, box: tuple[int, int, int, int], suffix: str) -> Sample:
    """Cut the same box out of image, label and depth; the key gets ``_<suffix>``."""
    top, left, h, w = box
    window = (slice(top, top + h), slice(left, left + w))
    return replace(
        sample,
        key=f"{sample.key}_{suffix}",
        image=np.ascontiguousarray(sample.image[window]),
        label=None if sample.label is None else np.ascontiguousarray(sample.label[window]),
        depth=None if sample.depth is None else np.ascontiguousarray(sample.depth[window]),
        meta={**sample.meta, "crop": suffix, "crop_box": [top, left, h, w]},
    )


def _resize(array: np.ndarray, size: tuple[int, int], resample: int, mode: str | None = None) -> np.ndarray:
    # size is (width, height) as PIL expects
    return np.asarray(Image.fromarray(array, mode=mode).resize(size, resample=resample))


def resize_center_crop(sample: Sample, size: int) -> Sample:
    """Resize so the minor side is ``size``, then centre-crop ``size x size``.

    Images and depth use bilinear interpolation, labels nearest neighbour (SPEC section 3).

    Args:
        sample: image ``(H, W, 3)`` uint8, label ``(H, W)`` int64 or None, depth ``(H, W)``
            float32 (metres) or None.
        size: output side in pixels (224 train, 320 validation).

    Returns:
        A sample whose arrays are ``(size, size, ...)``; dtypes unchanged.

    Raises:
        ValueError: if ``size`` is not positive.
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    h, w = sample.image.shape[:2]
    scale = size / min(h, w)
    new_h, new_w = max(size, int(round(h * scale))), max(size, int(round(w * scale)))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    window = (slice(top, top + size), slice(left, left + size))

    image = _resize(sample.image, (new_w, new_h), Image.BILINEAR)[window]
    label = None
    if sample.label is not None:
        lab = sample.label.astype(np.int32)
        label = _resize(lab, (new_w, new_h), Image.NEAREST).astype(np.int64)[window]
        label[label < 0] = IGNORE
    depth = None
    if sample.depth is not None:
        depth = _resize(sample.depth.astype(np.float32), (new_w, new_h), Image.BILINEAR, mode="F")[window]
    return replace(
        sample,
        image=np.ascontiguousarray(image),
        label=None if label is None else np.ascontiguousarray(label),
        depth=None if depth is None else np.ascontiguousarray(depth, dtype=np.float32),
        meta={**sample.meta, "resized_to": size},
    )


def make_crops(sample: Sample, *, five_crop: bool, size: int, ratio: float = 0.5) -> list[Sample]:
    """All training/validation crops of one image.

    Args:
        sample: the full image with its label and sensor depth (if any).
        five_crop: five-crop first (COCO-Stuff, Cityscapes, NYUv2 training); otherwise one crop.
        size: final side (224 train, 320 validation).
        ratio: five-crop ratio (0.5).

    Returns:
        Five (or one) samples of ``size x size``, keys ``<key>_tl`` ... ``<key>_c`` when
        five-cropped, the original key otherwise.
    """
    if not five_crop:
        return [resize_center_crop(sample, size)]
    h, w = sample.image.shape[:2]
    return [
        resize_center_crop(crop_sample(sample, box, name), size)
        for box, name in zip(five_crop_boxes(h, w, ratio), CROP_NAMES)
    ]
