"""Five-crop and resize/centre-crop of image, label and depth together (STEGO sec. 3.3, README: Data pipeline).

Training: each image is five-cropped at (0.5 h, 0.5 w) before kNN mining (STEGO A.12), then
every crop is resized so its minor side is 224 and centre-cropped to 224 x 224. Validation:
minor side 320, centre crop 320. Resizing is torchvision's ``transforms.functional.resize`` on
PIL images, the call both released code bases made (``T.Resize(size, ...)`` in
``src/utils.py get_transform``): the long side becomes ``int(size * long / short)`` (426, not
427, for 640x480 at 320 px), then ``center_crop``.

Two settings vary what the released code did (docs/fidelity.md, R3):

- ``resize``: ``"bilinear"`` (STEGO A.10, the paper) or ``"nearest"`` (the released
  ``get_transform`` used ``Image.NEAREST`` for images AND labels). Labels are always nearest;
  sensor depth follows the image.
- ``codec``: ``"png"`` (lossless) or ``"jpeg"``: the released ``src/crop_datasets.py`` saved every
  full-resolution training five-crop as ``.jpg`` at PIL's default quality, and training re-read
  and resized it (``src/data.py CroppedDataset``), so each five-crop makes one JPEG round trip
  BEFORE it is resized. Single crops (validation, Potsdam) never do.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from repro.data.datasets.base import IGNORE, Sample
from repro.data.stages import INDEX
from repro.utils.errors import MissingFileError

__all__ = ["five_crop_boxes", "crop_sample", "resize_center_crop", "resize_center_crop_array", "jpeg_round_trip",
           "make_crops", "save_crop", "iter_crops", "RESIZE_MODES", "CODECS"]

CROP_NAMES = ("tl", "tr", "bl", "br", "c")
RESIZE_MODES = {"bilinear": InterpolationMode.BILINEAR, "nearest": InterpolationMode.NEAREST}
CODECS = ("png", "jpeg")


def five_crop_boxes(height: int, width: int, ratio: float = 0.5) -> list[tuple[int, int, int, int]]:
    """Boxes ``(top, left, crop_h, crop_w)`` of the four corner crops and the centre crop.

    The geometry of torchvision's ``five_crop(img, [int(h * ratio), int(w * ratio)])`` (released
    ``src/crop_datasets.py``).

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
    """Cut the same box out of image, label and depth; the key gets ``_<suffix>``.

    ``meta`` records ``crop`` (the suffix), ``crop_box`` ``[top, left, h, w]`` and ``image_key`` (the
    full image's key), so that a per-image depth map can later be cut with the same box.
    """
    top, left, h, w = box
    window = (slice(top, top + h), slice(left, left + w))
    return replace(
        sample,
        key=f"{sample.key}_{suffix}",
        image=np.ascontiguousarray(sample.image[window]),
        label=None if sample.label is None else np.ascontiguousarray(sample.label[window]),
        depth=None if sample.depth is None else np.ascontiguousarray(sample.depth[window]),
        meta={**sample.meta, "crop": suffix, "crop_box": [top, left, h, w], "image_key": sample.key},
    )


def _mode(resize: str) -> InterpolationMode:
    try:
        return RESIZE_MODES[resize]
    except KeyError:
        raise ValueError(f"resize must be one of {sorted(RESIZE_MODES)}, got {resize!r}") from None


def resize_center_crop_array(array: np.ndarray, size: int, resize: str) -> np.ndarray:
    """Resize one array so its minor side is ``size`` (torchvision on a PIL image), then centre-crop.

    Args:
        array: ``(H, W, 3)`` uint8, ``(H, W)`` uint8 (PIL ``L``), int32 (``I``) or float32 (``F``).
        size: output side in pixels.
        resize: ``"bilinear"`` or ``"nearest"``.

    Returns:
        ``(size, size[, 3])`` array of the input dtype: ``TF.center_crop(TF.resize(pil, size, mode), size)``.

    Raises:
        ValueError: for an unknown ``resize`` or a non-positive ``size``.
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    pil = Image.fromarray(np.ascontiguousarray(array))
    out = TF.center_crop(TF.resize(pil, [size], interpolation=_mode(resize)), [size, size])
    return np.asarray(out)


def resize_center_crop(sample: Sample, size: int, *, resize: str = "bilinear") -> Sample:
    """Resize so the minor side is ``size``, then centre-crop ``size x size``.

    Images and sensor depth use ``resize`` (bilinear: paper; nearest: released, R3), labels
    always nearest neighbour (README: Data pipeline).

    Args:
        sample: image ``(H, W, 3)`` uint8, label ``(H, W)`` int64 or None, depth ``(H, W)``
            float32 (metres) or None.
        size: output side in pixels (224 train, 320 validation).
        resize: ``"bilinear"`` or ``"nearest"``.

    Returns:
        A sample whose arrays are ``(size, size, ...)``; dtypes unchanged; ``meta["resized_to"] = size``.

    Raises:
        ValueError: if ``size`` is not positive or ``resize`` unknown.
    """
    image = resize_center_crop_array(sample.image, size, resize)
    label = None
    if sample.label is not None:
        label = resize_center_crop_array(sample.label.astype(np.int32), size, "nearest").astype(np.int64)
        label[label < 0] = IGNORE
    depth = None
    if sample.depth is not None:
        depth = resize_center_crop_array(sample.depth.astype(np.float32), size, resize)
    return replace(
        sample,
        image=np.ascontiguousarray(image),
        label=None if label is None else np.ascontiguousarray(label),
        depth=None if depth is None else np.ascontiguousarray(depth, dtype=np.float32),
        meta={**sample.meta, "resized_to": size},
    )


def jpeg_round_trip(image: np.ndarray) -> np.ndarray:
    """Encode an RGB image as JPEG at PIL's default settings and decode it again.

    What the released ``src/crop_datasets.py`` (``img_as_pil.save(path, 'JPEG')``) and
    ``src/data.py CroppedDataset`` (``Image.open(path).convert('RGB')``) did to every training
    five-crop.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.

    Returns:
        ``(H, W, 3)`` uint8 RGB after the round trip (lossy).
    """
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG")
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"))


def make_crops(sample: Sample, *, five_crop: bool, size: int, ratio: float = 0.5, resize: str = "bilinear",
               codec: str = "png") -> list[Sample]:
    """All training/validation crops of one image.

    Args:
        sample: the full image with its label and sensor depth (if any).
        five_crop: five-crop first (COCO-Stuff, Cityscapes, NYUv2 training); otherwise one crop.
        size: final side (224 train, 320 validation).
        ratio: five-crop ratio (0.5).
        resize: ``"bilinear"`` (paper) or ``"nearest"`` (released, R3).
        codec: ``"png"`` or ``"jpeg"`` (R3: each five-crop round-trips through JPEG before it is
            resized; ignored for a single crop).

    Returns:
        Five (or one) samples of ``size x size``, keys ``<key>_tl`` ... ``<key>_c`` when
        five-cropped, the original key otherwise. Every crop's ``meta`` holds ``crop_box`` (the
        whole image for a single crop) and ``image_key``.

    Raises:
        ValueError: for an unknown ``codec`` or ``resize``.
    """
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
    h, w = sample.image.shape[:2]
    if not five_crop:
        whole = replace(sample, meta={**sample.meta, "crop_box": [0, 0, h, w], "image_key": sample.key})
        return [resize_center_crop(whole, size, resize=resize)]
    crops = []
    for box, name in zip(five_crop_boxes(h, w, ratio), CROP_NAMES):
        crop = crop_sample(sample, box, name)
        if codec == "jpeg":
            crop = replace(crop, image=jpeg_round_trip(crop.image), meta={**crop.meta, "codec": "jpeg"})
        crops.append(resize_center_crop(crop, size, resize=resize))
    return crops


def save_crop(folder: Path, crop: Sample) -> None:
    """Write one crop as ``<key>.img.png``, ``<key>.label.npy`` (int16), ``<key>.sensor.npy`` (float32) and ``<key>.json``."""
    Image.fromarray(crop.image).save(folder / f"{crop.key}.img.png", compress_level=1)
    if crop.label is not None:
        np.save(folder / f"{crop.key}.label.npy", crop.label.astype(np.int16))
    if crop.depth is not None:
        np.save(folder / f"{crop.key}.sensor.npy", crop.depth.astype(np.float32))
    (folder / f"{crop.key}.json").write_text(json.dumps(crop.meta, sort_keys=True))


def iter_crops(crops: str | Path) -> Iterator[Sample]:
    """Read the crops of a finished ``prepare`` folder, in index order.

    Raises:
        MissingFileError: if the folder is incomplete or a crop file is missing (names the fix).
    """
    crops = Path(crops)
    index_path = crops / INDEX
    if not index_path.is_file():
        raise MissingFileError(f"the index of the crops folder {crops} (not a finished crops folder)", index_path,
                               f"run `repro prepare` (or `repro run`) to build {crops}")
    for key in json.loads(index_path.read_text())["keys"]:
        img = crops / f"{key}.img.png"
        if not img.is_file():
            raise MissingFileError("a crop image", img, f"remove {crops} and rebuild it with `repro prepare`")
        label = crops / f"{key}.label.npy"
        sensor = crops / f"{key}.sensor.npy"
        yield Sample(
            key=key,
            image=np.array(Image.open(img).convert("RGB")),
            label=np.load(label).astype(np.int64) if label.is_file() else None,
            depth=np.load(sensor) if sensor.is_file() else None,
            meta=json.loads((crops / f"{key}.json").read_text()),
        )
