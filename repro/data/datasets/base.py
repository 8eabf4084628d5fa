"""The common sample record, file readers and the validation shared by every dataset adapter.

Every adapter in :mod:`repro.data` returns :class:`Sample` objects whose arrays follow one
convention: RGB ``uint8`` images, ``int64`` labels with ``IGNORE`` (-1) for unlabelled pixels,
and sensor depth in metres (``float32``, 0 where the sensor has no reading). The checks in
:func:`validate_sample` run on every ``__getitem__`` so that a bad file fails loudly, naming
the file, instead of silently producing a wrong training signal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from repro.utils.errors import DatasetError, MissingFileError

__all__ = [
    "IGNORE",
    "Sample",
    "BaseDataset",
    "make_key",
    "require_file",
    "require_dir",
    "read_rgb",
    "read_png",
    "validate_sample",
    "FirstImages",
]

IGNORE = -1
"""Label value of unlabelled / ignored pixels in every :class:`Sample`."""

_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass
class Sample:
    """One image of a dataset with its optional label and sensor depth.

    Attributes:
        key: unique, stable identifier, safe for file names and WebDataset keys (letters,
            digits, ``_`` and ``-`` only; no dots), e.g. ``"cityscapes27_val_frankfurt_000000_000294"``.
        image: ``(H, W, 3)`` uint8 RGB.
        label: ``(H, W)`` int64 with values in ``[0, K)`` or :data:`IGNORE` (-1); None if the
            dataset split has no labels.
        depth: ``(H, W)`` float32 sensor depth in metres (0 = no reading); None if unavailable.
        meta: JSON-serialisable metadata: ``dataset``, ``split``, source file paths relative to
            the dataset root, and dataset-specific fields.
    """

    key: str
    image: np.ndarray
    label: np.ndarray | None
    depth: np.ndarray | None
    meta: dict = field(default_factory=dict)


def make_key(*parts: str | int) -> str:
    """Join parts with ``_`` into a key that is safe for file names and WebDataset.

    Characters other than letters, digits, ``_`` and ``-`` (dots, slashes, spaces) become ``-``.

    Args:
        *parts: e.g. ``("nyuv2", "test", "0001")``.

    Returns:
        The key, e.g. ``"nyuv2_test_0001"``.
    """
    return "_".join(_KEY_BAD.sub("-", str(p)) for p in parts)


def require_dir(path: str | Path, what: str, fix: str) -> Path:
    """Return ``path`` if it is a directory.

    Raises:
        MissingFileError: if it does not exist (names ``what``, the path and ``fix``).
    """
    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(what, path, fix)
    return path


def require_file(path: str | Path, what: str, fix: str) -> Path:
    """Return ``path`` if it is a file.

    Raises:
        MissingFileError: if it does not exist (names ``what``, the path and ``fix``).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(what, path, fix)
    return path


def read_rgb(path: str | Path, what: str = "image", fix: str = "check the dataset download") -> np.ndarray:
    """Read an 8-bit image file as RGB.

    Grayscale, palette and RGBA images are converted to RGB (alpha is dropped), as some COCO
    JPEGs are grayscale and some PNG exports carry an alpha channel.

    Args:
        path: image file (PNG, JPEG, ...).
        what: description used in the error if the file is missing.
        fix: how to obtain the file, used in the error if it is missing.

    Returns:
        ``(H, W, 3)`` uint8 RGB array.

    Raises:
        MissingFileError: if the file does not exist.
        DatasetError: if it cannot be decoded or is not an 8-bit image.
    """
    path = require_file(path, what, fix)
    try:
        with Image.open(path) as im:
            if im.mode not in ("RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1"):
                raise DatasetError(f"{path}: expected an 8-bit RGB/gray image, got PIL mode {im.mode!r}")
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot decode image: {exc}") from exc


def read_png(path: str | Path, what: str = "label map", fix: str = "check the dataset download") -> np.ndarray:
    """Read a single-channel PNG (label map or 16-bit depth) without any conversion.

    Args:
        path: the PNG file.
        what: description used in the error if the file is missing.
        fix: how to obtain the file, used in the error if it is missing.

    Returns:
        ``(H, W)`` array in the file's own dtype (uint8 for labels, uint16 for NYU depth).

    Raises:
        MissingFileError: if the file does not exist.
        DatasetError: if it cannot be decoded or has more than one channel.
    """
    path = require_file(path, what, fix)
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot decode PNG: {exc}") from exc
    if arr.ndim != 2:
        raise DatasetError(f"{path}: expected a single-channel {what}, got array shape {arr.shape}")
    return arr


def validate_sample(sample: Sample, num_classes: int, files: dict[str, str | Path]) -> Sample:
    """Check a sample's arrays against the :class:`Sample` conventions.

    Args:
        sample: the sample to check.
        num_classes: K; labels must lie in ``[0, K)`` or be :data:`IGNORE`.
        files: source file per array (keys ``"image"``, ``"label"``, ``"depth"``), used in
            error messages.

    Returns:
        The same sample.

    Raises:
        DatasetError: if the image is not ``(H, W, 3)`` uint8; if label or depth do not have the
            image's ``(H, W)`` (names both files and shapes); if labels (after the dataset's
            label mapping) fall outside ``[0, K)`` and are not -1 (lists the bad values); if
            depth is not float32, not finite or negative.
    """
    img_file = files.get("image", "<image>")
    img = sample.image
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        desc = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise DatasetError(f"{img_file}: image must be (H, W, 3) uint8, got {desc}")
    hw = img.shape[:2]
    for name, arr in (("label", sample.label), ("depth", sample.depth)):
        if arr is None:
            continue
        if arr.shape != hw:
            raise DatasetError(
                f"{name} file {files.get(name, '<' + name + '>')} has shape {arr.shape} but image file "
                f"{img_file} has (H, W) = {hw}"
            )
    if sample.label is not None:
        label = sample.label
        if label.dtype != np.int64:
            raise DatasetError(f"{files.get('label')}: label array must be int64, got {label.dtype}")
        bad_mask = (label != IGNORE) & ((label < 0) | (label >= num_classes))
        if bad_mask.any():
            bad = np.unique(label[bad_mask])
            shown = ", ".join(str(v) for v in bad[:20]) + (" ..." if bad.size > 20 else "")
            raise DatasetError(
                f"{files.get('label')}: label values outside [0, {num_classes}) and not {IGNORE} after the "
                f"dataset's label mapping: {shown} ({int(bad_mask.sum())} pixels)"
            )
    if sample.depth is not None:
        depth = sample.depth
        depth_file = files.get("depth")
        if depth.dtype != np.float32:
            raise DatasetError(f"{depth_file}: depth must be float32 metres, got {depth.dtype}")
        if not np.isfinite(depth).all():
            raise DatasetError(f"{depth_file}: depth has non-finite values")
        if (depth < 0).any():
            raise DatasetError(f"{depth_file}: depth has negative values (min {float(depth.min())} m)")
    return sample


class BaseDataset:
    """Shared behaviour of the dataset adapters (length, keys, validated item access).

    Subclasses set ``name``, ``num_classes``, ``class_names`` and fill ``self._items`` (sorted by
    key) with one record per sample, then implement :meth:`_load`.
    """

    name: str = ""
    num_classes: int = 0
    class_names: tuple[str, ...] = ()

    def __init__(self, root: str | Path, split: str) -> None:
        self.root = Path(root)
        self.split = split
        self._items: list[dict] = []

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list[str]:
        """Sample keys in the dataset's deterministic (sorted) order."""
        return [item["key"] for item in self._items]

    def __getitem__(self, i: int) -> Sample:
        """Load, map and validate sample ``i``.

        Raises:
            IndexError: if ``i`` is out of range.
            MissingFileError: if one of the sample's files is missing.
            DatasetError: if a file's content violates the :class:`Sample` conventions.
        """
        if not -len(self._items) <= i < len(self._items):
            raise IndexError(f"{self.name}/{self.split}: index {i} out of range for {len(self._items)} samples")
        sample, files = self._load(self._items[i])
        return validate_sample(sample, self.num_classes, files)

    def _load(self, item: dict) -> tuple[Sample, dict[str, Path]]:
        raise NotImplementedError

    def _rel(self, path: Path) -> str:
        """``path`` relative to the dataset root, as a POSIX string for ``meta``."""
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.as_posix()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, n={len(self)})"


class FirstImages:
    """The first ``n`` samples of an adapter, in its sorted key order (the smoke scale's subset rule).

    Args:
        dataset: a :class:`BaseDataset`.
        n: how many samples to keep (a split with fewer keeps all of them).

    Raises:
        ValueError: ``n`` < 1.
    """

    def __init__(self, dataset: BaseDataset, n: int) -> None:
        if n < 1:
            raise ValueError(f"a subset needs at least one image, got n={n}")
        self.dataset, self.n = dataset, min(n, len(dataset))
        self.name, self.split, self.root = dataset.name, dataset.split, dataset.root
        self.num_classes, self.class_names = dataset.num_classes, dataset.class_names

    def __len__(self) -> int:
        return self.n

    def keys(self) -> list[str]:
        """The kept keys (a prefix of ``dataset.keys()``)."""
        return self.dataset.keys()[: self.n]

    def __getitem__(self, i: int) -> Sample:
        if not -self.n <= i < self.n:
            raise IndexError(f"{self.name}/{self.split}: index {i} out of range for the first {self.n} samples")
        return self.dataset[i % self.n]
