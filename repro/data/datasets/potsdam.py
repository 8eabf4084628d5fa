"""Potsdam-3: ISPRS Potsdam aerial images with the 3 merged classes of IIC/STEGO/DepthG.

Two layouts are read:

* ``"iic"`` (IIC's preprocessed Potsdam, used by STEGO)::

      root/imgs/<id>.mat   key "img": (200, 200, 4) RGB + IR; the first 3 channels are used
      root/gt/<id>.mat     key "gt":  (200, 200) values 0..5
      root/<split>.txt     one id per line: labelled_train, labelled_test, unlabelled_train, all

  Assumption (documented, not verifiable here): the IIC ``gt`` uses the ISPRS class order
  0 impervious surfaces, 1 building, 2 low vegetation, 3 tree, 4 car, 5 clutter, which is what
  STEGO's merge ``{0, 4} -> 0, {1, 5} -> 1, {2, 3} -> 2`` implies.

  Unlabelled tiles (the ``unlabelled_train`` ids, also listed in ``all``) have no ``gt`` file. As in
  STEGO's ``Potsdam.__getitem__`` (``src/data.py``; DepthG's is the same), whose ``FileNotFoundError``
  branch substitutes ``to_pil_image(torch.ones(1, H, W))``, i.e. the value 255 everywhere, which its
  ``fine_to_coarse`` maps to -1, such a tile gets a label map of :data:`IGNORE` (-1) everywhere: the
  evaluation counts no pixel of it (STEGO's metrics keep ``0 <= label < n_classes``). STEGO does this
  for any missing gt file; here only the splits that hold unlabelled tiles (``unlabelled_*``, ``all``)
  do, and a missing gt file of ``labelled_train`` / ``labelled_test`` is an error (a broken copy;
  fidelity item R17).

* ``"mmseg"`` (mmsegmentation's converted Potsdam: 512x512 PNG crops)::

      root/img_dir[/<split>]/<name>.png   RGB
      root/ann_dir[/<split>]/<name>.png   0 impervious, 1 building, 2 low vegetation, 3 tree,
                                          4 car, 5 clutter, 255 ignore

Merged classes: 0 roads and cars, 1 buildings and clutter, 2 trees and vegetation.
Sources: Rottensteiner et al., ISPRS 2D semantic labeling benchmark; Ji et al., IIC (ICCV 2019);
Hamilton et al., STEGO (ICLR 2022); mmsegmentation ``tools/dataset_converters/potsdam.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from repro.data.datasets.base import (
    IGNORE, BaseDataset, Sample, make_key, read_png, read_rgb, require_dir, require_file
)
from repro.utils.errors import DatasetError

__all__ = ["Potsdam3", "potsdam_merge_6_to_3", "read_mat_array", "POTSDAM3_CLASS_NAMES", "IIC_SPLIT_FILES"]

POTSDAM3_CLASS_NAMES: tuple[str, ...] = ("roads and cars", "buildings and clutter", "trees and vegetation")
# 6-class id -> 3-class id; identical for both sources (both use the ISPRS class order).
_MERGE = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2}
# STEGO's split names -> IIC split list files (any other name <s> reads <s>.txt).
IIC_SPLIT_FILES = {"train": "labelled_train", "val": "labelled_test", "test": "labelled_test"}
UNLABELLED_TILE_VALUE = 255
"""Label value STEGO substitutes for a tile without a gt file (``to_pil_image`` of a float one: 255),
mapped by its ``fine_to_coarse`` (``255: -1``) to the ignore value."""
FIX = ("get IIC's preprocessed Potsdam-3 (imgs/, gt/, *.txt; see data_manifests/potsdam3.yaml) or the "
       "ISPRS 2D semantic labeling Potsdam data (registration) converted with mmsegmentation")


def potsdam_merge_6_to_3(label: np.ndarray, source: str = "mmseg") -> np.ndarray:
    """Merge the 6 ISPRS Potsdam classes into the 3 Potsdam-3 classes.

    ``{0 impervious, 4 car} -> 0``, ``{1 building, 5 clutter} -> 1``, ``{2 low vegetation,
    3 tree} -> 2``; 255 (mmseg ignore) -> -1.

    Args:
        label: ``(H, W)`` integer 6-class label.
        source: ``"mmseg"`` (0..5, 255 ignore) or ``"iic"`` (0..5, assumed ISPRS order).

    Returns:
        ``(H, W)`` int64 in ``{-1, 0, 1, 2}``.

    Raises:
        ValueError: for an unknown ``source`` or label values other than 0..5 and 255
            (lists the bad values).
    """
    if source not in ("mmseg", "iic"):
        raise ValueError(f"source must be 'mmseg' or 'iic', got {source!r}")
    label = np.asarray(label).astype(np.int64)
    lut = np.full(256, -2, dtype=np.int64)
    for six, three in _MERGE.items():
        lut[six] = three
    lut[255] = IGNORE
    inside = (label >= 0) & (label < 256)
    out = np.full(label.shape, -2, dtype=np.int64)
    out[inside] = lut[label[inside]]
    if (out == -2).any():
        bad = np.unique(label[out == -2])
        raise ValueError(f"6-class Potsdam label values outside 0..5 and 255: {bad[:20].tolist()}")
    return out


def read_mat_array(path: Path, key: str, what: str) -> np.ndarray:
    """Read one variable of a MATLAB ``.mat`` file with :func:`scipy.io.loadmat`.

    Raises:
        MissingFileError: if the file does not exist.
        DatasetError: if it cannot be read or lacks ``key``.
    """
    from scipy.io import loadmat

    require_file(path, what, FIX)
    try:
        data = loadmat(path)
    except (ValueError, OSError, NotImplementedError) as exc:
        raise DatasetError(f"{path}: cannot read .mat file: {exc}") from exc
    if key not in data:
        raise DatasetError(f"{path}: no variable {key!r} (has {sorted(k for k in data if not k.startswith('__'))})")
    return np.asarray(data[key])


def _iic_rgb(arr: np.ndarray, path: Path) -> np.ndarray:
    """First three channels of an IIC ``img`` array as uint8 RGB (floats in [0, 1] are scaled)."""
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise DatasetError(f"{path}: 'img' must be (H, W, C>=3), got shape {arr.shape}")
    rgb = arr[:, :, :3]
    if rgb.dtype == np.uint8:
        return np.ascontiguousarray(rgb)
    if np.issubdtype(rgb.dtype, np.floating) and rgb.size and float(rgb.max()) <= 1.0:
        rgb = rgb * 255.0
    if rgb.size and (float(rgb.min()) < 0 or float(rgb.max()) > 255):
        raise DatasetError(f"{path}: 'img' values outside 0..255 (dtype {arr.dtype})")
    return np.ascontiguousarray(np.rint(rgb).astype(np.uint8))


class Potsdam3(BaseDataset):
    """Potsdam-3 (3 merged classes) in IIC ``.mat`` or mmsegmentation PNG layout.

    Args:
        root: dataset folder (see module docstring).
        split: IIC: ``"train"`` (labelled_train), ``"val"``/``"test"`` (labelled_test), or the
            stem of any ``root/<split>.txt`` (``"unlabelled_train"``, ``"all"``; their tiles without a
            gt file are all :data:`IGNORE`, see the module docstring). mmseg: the
            subfolder ``img_dir/<split>/`` if it exists, else the flat ``img_dir/``.
        layout: ``"iic"``, ``"mmseg"`` or ``"auto"`` (``imgs/`` -> iic, ``img_dir/`` -> mmseg).

    Raises:
        ValueError: for an unknown layout.
        MissingFileError: if ``root``, the image folder or the IIC split list is missing.
    """

    name = "potsdam3"
    num_classes = 3
    class_names = POTSDAM3_CLASS_NAMES

    def __init__(self, root: str | Path, split: str, layout: str = "auto") -> None:
        super().__init__(root, split)
        require_dir(self.root, "Potsdam root folder", FIX)
        if layout == "auto":
            layout = "mmseg" if (self.root / "img_dir").is_dir() and not (self.root / "imgs").is_dir() else "iic"
        if layout not in ("iic", "mmseg"):
            raise ValueError(f"Potsdam3: layout must be 'iic', 'mmseg' or 'auto', got {layout!r}")
        self.layout = layout
        if layout == "iic":
            self.split_file = self.root / f"{IIC_SPLIT_FILES.get(split, split)}.txt"
            require_file(self.split_file, f"Potsdam-3 split list for split {split!r}", FIX)
            require_dir(self.root / "imgs", "Potsdam-3 imgs/ folder", FIX)
            ids = sorted({ln.strip() for ln in self.split_file.read_text().splitlines() if ln.strip()})
            self.may_lack_gt = not self.split_file.stem.startswith("labelled")
            self._items = [{"key": make_key(self.name, split, i), "id": i} for i in ids]
        else:
            img_dir = require_dir(self.root / "img_dir", "Potsdam img_dir/ folder", FIX)
            self.subfolder = (img_dir / split).is_dir()
            self.image_dir = img_dir / split if self.subfolder else img_dir
            self.label_dir = self.root / "ann_dir" / split if self.subfolder else self.root / "ann_dir"
            with os.scandir(self.image_dir) as it:
                names = sorted(e.name[:-4] for e in it if e.is_file() and e.name.endswith(".png"))
            self._items = [{"key": make_key(self.name, split, n), "id": n} for n in names]

    def _load(self, item: dict) -> tuple[Sample, dict[str, Path]]:
        meta = {"dataset": self.name, "split": self.split, "id": item["id"], "layout": self.layout}
        if self.layout == "iic":
            image_path = self.root / "imgs" / f"{item['id']}.mat"
            label_path = self.root / "gt" / f"{item['id']}.mat"
            image = _iic_rgb(read_mat_array(image_path, "img", "Potsdam-3 image .mat"), image_path)
            if not label_path.is_file() and self.may_lack_gt:
                label = np.full(image.shape[:2], IGNORE, np.int64)  # STEGO: 255 -> fine_to_coarse[255] = -1
                meta["unlabelled"] = True
            else:
                raw = read_mat_array(label_path, "gt", "Potsdam-3 ground-truth .mat")
                label = self._merge(np.squeeze(raw) if raw.ndim == 3 else raw, label_path, "iic")
        else:
            image_path = self.image_dir / f"{item['id']}.png"
            label_path = self.label_dir / f"{item['id']}.png"
            image = read_rgb(image_path, "Potsdam image", FIX)
            label = self._merge(read_png(label_path, "Potsdam ann_dir label", FIX), label_path, "mmseg")
        meta["image"] = self._rel(image_path)
        if not meta.get("unlabelled"):
            meta["label"] = self._rel(label_path)
        return Sample(item["key"], image, label, None, meta), {"image": image_path, "label": label_path}

    @staticmethod
    def _merge(raw: np.ndarray, path: Path, source: str) -> np.ndarray:
        try:
            return potsdam_merge_6_to_3(raw, source)
        except ValueError as exc:
            raise DatasetError(f"{path}: {exc}") from exc
