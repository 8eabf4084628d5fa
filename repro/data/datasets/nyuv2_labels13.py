"""The 13-class NYUv2 labels (Couprie et al., ICLR 2013) as released in ankurhanda/nyuv2-meta-data.

Two sources, for :mod:`repro.data.datasets.nyuv2_convert`:

* label PNGs: ``train_labels_13/nyuv2_train_class13.tgz`` and ``test_labels_13/nyuv2_test_class13.tgz``
  hold ``new_nyu_class13_NNNN.png`` (``NNNN`` = 1-based index into the 1,449 labelled images;
  checked for the test archive: its names are the ``testNdxs`` of ``splits.mat``), uint8, 0 unlabelled,
  1..13. Read from the archives or from folders of PNGs whose names end in ``NNNN.png``.
* class mapping: ``classMapping40.mat`` (``mapClass``, (1, 894): 894 NYU classes -> 40, 1-based) and
  ``class13Mapping.mat`` (struct ``classMapping13`` with ``labels13``, (1, 40): 40 -> 13, and
  ``classNames``), applied to the 894-class ``labels`` of ``nyu_depth_v2_labeled.mat``; 0 stays 0.
"""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from repro.data.datasets.base import require_file
from repro.data.datasets.nyuv2 import FIX, NYU13_CLASS_NAMES
from repro.utils.errors import DatasetError

__all__ = ["Label13Pngs", "Label13Mapping", "open_label13_source"]

_INDEX_PNG = re.compile(r"(\d+)\.png$")


class Label13Pngs:
    """nyuv2-meta-data label PNGs from ``.tgz`` archives or folders, keyed by 1-based labelled index.

    The PNGs of the ``needed`` indices are held in memory (about 6 KB each), others are ignored.

    Args:
        paths: ``.tgz`` / ``.tar`` archives or folders (searched recursively for ``*NNNN.png``).
        needed: the 1-based labelled indices to provide.

    Raises:
        DatasetError: if a path is neither a folder nor a tar archive, two files claim one index,
            or a needed index has no PNG (names the sources and the first missing indices).
    """

    kind = "png"

    def __init__(self, paths: Sequence[Path], needed: set[int]) -> None:
        self._data: dict[int, tuple[str, bytes | Path]] = {}
        for path in paths:
            if path.is_dir():
                for f in sorted(path.rglob("*.png")):
                    self._add(f, f"{path.name}/{f.relative_to(path).as_posix()}", f, needed)
            elif tarfile.is_tarfile(path):
                with tarfile.open(path) as tar:
                    for member in tar:
                        if member.isfile() and _INDEX_PNG.search(member.name):
                            self._add(Path(member.name), f"{path.name}:{member.name}", tar.extractfile(member),
                                      needed)
            else:
                raise DatasetError(f"{path}: 13-class label source must be a folder of PNGs, a .tgz of "
                                   "nyuv2-meta-data, or the two mapping .mat files")
        missing = sorted(needed - self._data.keys())
        if missing:
            raise DatasetError(f"13-class label PNGs missing for {len(missing)} of {len(needed)} frames in "
                               f"{[str(p) for p in paths]}, first indices {missing[:10]}; pass both "
                               "nyuv2_train_class13.tgz and nyuv2_test_class13.tgz (or folders of their PNGs)")
        self.description = ("ankurhanda/nyuv2-meta-data label PNGs (" + ", ".join(p.name for p in paths) + ")")

    def _add(self, name: Path, shown: str, source, needed: set[int]) -> None:
        match = _INDEX_PNG.search(name.name)
        if match is None or int(match.group(1)) not in needed:
            return
        index = int(match.group(1))
        if index in self._data:
            raise DatasetError(f"two 13-class label PNGs for labelled index {index}: {self._data[index][0]} and "
                               f"{shown}; file names must end in the 1-based labelled index (NNNN.png)")
        self._data[index] = (shown, source.read() if hasattr(source, "read") else source)

    def row_source(self, index: int) -> str:
        """Where the label of ``index`` comes from (archive:member or folder/file), for manifest.csv."""
        return f"nyuv2-meta-data PNG {self._data[index][0]}"

    def frame(self, index: int, hw: tuple[int, int], mat=None) -> np.ndarray:
        """``(H, W)`` uint8 13-class label (0 unlabelled, 1..13) of 1-based ``index``.

        Raises:
            DatasetError: if the PNG cannot be decoded, is not ``hw`` uint8, or has values > 13.
        """
        shown, data = self._data[index]
        try:
            with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
                arr = np.asarray(im)
        except OSError as exc:
            raise DatasetError(f"{shown}: cannot decode PNG: {exc}") from exc
        if arr.dtype != np.uint8 or arr.shape != hw:
            raise DatasetError(f"{shown}: expected a {hw} uint8 13-class label PNG, got {arr.shape} {arr.dtype}")
        if arr.max() > 13:
            bad = np.unique(arr[arr > 13])
            raise DatasetError(f"{shown}: 13-class label values outside 0..13: {bad[:10].tolist()}")
        return arr


class Label13Mapping:
    """nyuv2-meta-data's class mapping 894 -> 40 (``classMapping40.mat``) -> 13 (``class13Mapping.mat``).

    ``lut[k] = labels13[mapClass[k - 1] - 1]`` for the 894 classes ``k >= 1`` and ``lut[0] = 0``.

    Args:
        paths: the two files, in any order (identified by their variables).

    Raises:
        MissingFileError: if a file does not exist.
        DatasetError: if a file holds neither ``mapClass`` nor ``classMapping13``, one of the two is
            missing, values are out of range, or ``classMapping13.classNames`` differs from
            :data:`repro.data.datasets.nyuv2.NYU13_CLASS_NAMES` (names the file and the variable).
    """

    kind = "mapping"

    def __init__(self, paths: Sequence[Path]) -> None:
        from scipy.io import loadmat

        map40 = map13 = None
        for path in paths:
            require_file(path, "nyuv2-meta-data class mapping .mat", FIX)
            data = loadmat(path)
            if "mapClass" in data:
                map40 = (path, np.asarray(data["mapClass"]).ravel())
            elif "classMapping13" in data:
                struct = data["classMapping13"]
                if struct.dtype.names is None or "labels13" not in struct.dtype.names:
                    raise DatasetError(f"{path}: variable 'classMapping13' has no field 'labels13'")
                map13 = (path, np.asarray(struct[0, 0]["labels13"]).ravel())
                if "classNames" in struct.dtype.names:
                    cells = np.asarray(struct[0, 0]["classNames"]).ravel()
                    names = tuple(str(np.asarray(n).ravel()[0]) for n in cells)
                    if names != NYU13_CLASS_NAMES:
                        raise DatasetError(f"{path}: classMapping13.classNames {names} differ from repro's 13 "
                                           f"classes {NYU13_CLASS_NAMES}")
            else:
                raise DatasetError(f"{path}: neither 'mapClass' (classMapping40.mat) nor 'classMapping13' "
                                   "(class13Mapping.mat) is in it")
        if map40 is None or map13 is None:
            raise DatasetError("the 894 -> 13 mapping needs both classMapping40.mat (mapClass) and "
                               f"class13Mapping.mat (classMapping13), got {[p.name for p in paths]}")
        (p40, m40), (p13, m13) = map40, map13
        if m40.size == 0 or m40.min() < 1 or m40.max() > m13.size:
            raise DatasetError(f"{p40}: variable 'mapClass' must map to 1..{m13.size}")
        if m13.min() < 1 or m13.max() > 13:
            raise DatasetError(f"{p13}: variable 'classMapping13.labels13' must map to 1..13")
        self.lut = np.zeros(m40.size + 1, np.uint8)
        self.lut[1:] = m13.astype(np.int64)[m40.astype(np.int64) - 1]
        self.description = (f"ankurhanda/nyuv2-meta-data class mapping: labels (1..{m40.size}) -> {p40.name} "
                            f"mapClass -> {p13.name} classMapping13.labels13")

    def row_source(self, index: int) -> str:
        """The label source for manifest.csv (the same for every frame)."""
        return "nyuv2-meta-data mapping classMapping40.mat + class13Mapping.mat"

    def frame(self, index: int, hw: tuple[int, int], mat) -> np.ndarray:
        """``(H, W)`` uint8 13-class label of 1-based ``index``, mapped from ``mat.labels894(index)``.

        Raises:
            DatasetError: if a class id is outside ``0..894`` (names ``mat.path``, ``labels``, the frame).
        """
        labels = mat.labels894(index)
        bad = (labels < 0) | (labels >= self.lut.size)
        if bad.any():
            raise DatasetError(f"{mat.path}: variable 'labels', frame {index}: class ids outside "
                               f"0..{self.lut.size - 1}: {np.unique(labels[bad])[:10].tolist()}")
        return self.lut[labels]


def open_label13_source(paths: Sequence[str | Path], needed: set[int]) -> Label13Pngs | Label13Mapping:
    """The 13-class label source: all ``.mat`` paths -> :class:`Label13Mapping`, else :class:`Label13Pngs`.

    Raises:
        MissingFileError: if a path does not exist.
        DatasetError: for a mix of ``.mat`` and PNG sources, or as the chosen source reports.
    """
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.exists():
            require_file(p, "13-class label source (nyuv2-meta-data)", FIX)
    mats = [p.suffix.lower() == ".mat" for p in paths]
    if any(mats) and not all(mats):
        raise DatasetError(f"--labels13: give either label PNG sources or the two mapping .mat files, not both: "
                           f"{[str(p) for p in paths]}")
    return Label13Mapping(paths) if all(mats) else Label13Pngs(paths, needed)
