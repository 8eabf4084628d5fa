"""NYU Depth V2 (labelled set) with the 13-class labels, RGB and sensor depth.

Two layouts are read (``layout="auto"`` picks one, like :class:`repro.data.datasets.potsdam.Potsdam3`).

``"png"``: repro's layout (the export used by ``nyuv2-mini`` and written by
``repro data convert nyuv2``, :mod:`repro.data.datasets.nyuv2_convert`; ``NNNN`` = 1-based index into the
1,449 labelled images)::

    root/rgb/NNNN.png       (480, 640, 3) uint8 RGB
    root/depth/NNNN.png     (480, 640) uint16 sensor depth in millimetres (0 = no reading)
    root/label13/NNNN.png   (480, 640) uint8: 0 unlabelled, 1..13 classes
    root/manifest.csv       optional, one row per sample (see below)

Depth becomes float32 metres (``mm / 1000``) with its holes (0 mm) filled by the nearest reading on
the full frame (:func:`repro.depth.sensor.sensor_depth_from_png_array`; an 8-bit or all-zero depth
PNG is an error naming the file); labels ``0 -> -1`` and ``1..13 -> 0..12``.
Split membership (official split: 795 train / 654 test, 1-based indices, ``splits.mat`` of the
NYU toolbox) is taken, in this order, from ``split_file`` / ``root/splits.mat`` (``trainNdxs``,
``testNdxs``) / ``root/splits/<split>.txt``; else from a ``split`` column of ``manifest.csv``;
else a ``manifest.csv`` without split information is treated as a subset of one split,
``subset_split`` (default ``"test"``: nyuv2-mini and its ``extra_rgb_only/`` hold official test
images). Manifest columns used: ``nyu_labeled_index_1based`` and optionally ``rgb``,
``depth_mm_uint16`` (or ``depth``), ``label13``; missing path columns default to the layout above.

``"depthg"``: the layout of DepthG's loader (``src/data.py``, class ``NYUv2``, folders written by its
``download_rgb`` / ``download_seg`` / ``_create_depth_files``)::

    root/{train,test}_rgb/NNNN.png     RGB; the file list of the split (sorted, as DepthG lists it)
    root/{train,test}_seg13/NNNN.png   uint8: 0 void, 1..13 classes (nyuv2-meta-data PNGs, renamed)
    root/{train,test}_depth/NNNN.png   uint16 in-painted depth in units of 1e-4 m (DepthG divides by 1e4)

Depth becomes float32 metres (``value / 10000``), labels as above. Split membership is the folder.
DepthG wrote these PNGs as ``(depths * 1e4).astype(np.uint16)``: depth beyond 6.5535 m does not fit
in uint16 and was stored modulo 65536 (numpy on x86-64); such values are read back as they are in
the file (in nyuv2-mini, 5 of the 10 frames have 4-7 % of their pixels beyond 6.5535 m).
Sources: Silberman et al., ECCV 2012; 13-class labels of Couprie et al. (ICLR 2013) as released
in ankurhanda/nyuv2-meta-data; DepthG (Sick et al., CVPR 2024) ``src/data.py``.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from repro.data.datasets.base import BaseDataset, Sample, make_key, read_png, read_rgb, require_dir, require_file
from repro.depth.sensor import sensor_depth_from_png_array
from repro.utils.errors import DatasetError, MissingFileError

__all__ = ["NYUv2", "nyu_label13_to_index", "read_split_indices", "NYU13_CLASS_NAMES", "DEPTH_UNITS_PER_M"]

NYU13_CLASS_NAMES: tuple[str, ...] = ("bed", "books", "ceiling", "chair", "floor", "furniture", "objects",
                                      "picture", "sofa", "table", "tv", "wall", "window")
FIX = ("download nyu_depth_v2_labeled.mat and splits.mat (NYU Depth V2 site) and the 13-class labels of "
       "ankurhanda/nyuv2-meta-data, then run `repro data convert nyuv2` (see data_manifests/nyuv2.yaml)")
DEPTH_UNITS_PER_M = {"png": 1000, "depthg": 10000}
"""Integer depth PNG units per metre of each layout: millimetres (png), 1e-4 m (DepthG)."""


def nyu_label13_to_index(label: np.ndarray) -> np.ndarray:
    """Map raw 13-class NYU labels (0 unlabelled, 1..13) to ``-1`` and ``0..12``.

    Args:
        label: ``(H, W)`` integer array.

    Returns:
        ``(H, W)`` int64 ``label - 1``; raw values above 13 stay out of range (``>= 13``) so
        that :func:`repro.data.datasets.base.validate_sample` reports them.
    """
    return np.asarray(label).astype(np.int64) - 1


def read_split_indices(path: Path, split: str) -> set[int]:
    """1-based labelled-image indices of ``split`` from ``splits.mat`` or a one-index-per-line text file.

    Raises:
        MissingFileError: if the file does not exist.
        DatasetError: if ``splits.mat`` lacks ``trainNdxs``/``testNdxs`` or a line is not an integer.
    """
    require_file(path, "NYUv2 split file", FIX)
    if path.suffix == ".mat":
        from scipy.io import loadmat

        key = {"train": "trainNdxs", "test": "testNdxs"}[split]
        data = loadmat(path)
        if key not in data:
            raise DatasetError(f"{path}: no variable {key!r}")
        return {int(v) for v in np.asarray(data[key]).ravel()}
    try:
        return {int(line) for line in path.read_text().split()}
    except ValueError as exc:
        raise DatasetError(f"{path}: expected one integer index per line: {exc}") from exc


class NYUv2(BaseDataset):
    """NYUv2 labelled set: RGB, sensor depth (metres) and 13-class labels.

    Args:
        root: folder in the PNG or DepthG layout (module docstring). PNG layout:
            ``root/<split>/rgb`` is used if present.
        split: ``"train"`` or ``"test"``.
        layout: ``"png"``, ``"depthg"`` or ``"auto"``: DepthG's if ``train_rgb/`` or ``test_rgb/``
            exists and neither ``rgb/`` nor ``<split>/rgb/`` does, else PNG.
        require_depth: if True, a sample without a depth file raises :class:`MissingFileError`;
            otherwise it yields ``depth=None`` (e.g. ``extra_rgb_only/``).
        split_file: explicit ``splits.mat`` or index list overriding the automatic lookup.
        subset_split: the split of a ``manifest.csv`` that has no split information.

    Raises:
        ValueError: for an unknown split or layout.
        MissingFileError: if ``root``/``rgb/`` (DepthG: ``<split>_rgb/``) is missing, or no split
            information exists.
        DatasetError: if the manifest is malformed or ``split`` is not in a one-split subset.
    """

    name = "nyuv2"
    num_classes = 13
    class_names = NYU13_CLASS_NAMES

    def __init__(self, root: str | Path, split: str, layout: str = "auto", *, require_depth: bool = False,
                 split_file: str | Path | None = None, subset_split: str = "test") -> None:
        if split not in ("train", "test"):
            raise ValueError(f"NYUv2: split must be 'train' or 'test', got {split!r}")
        if layout not in ("auto", "png", "depthg"):
            raise ValueError(f"NYUv2: layout must be 'png', 'depthg' or 'auto', got {layout!r}")
        super().__init__(root, split)
        require_dir(self.root, "NYUv2 root folder", FIX)
        self.require_depth = require_depth
        if layout == "auto":
            depthg = any((self.root / f"{s}_rgb").is_dir() for s in ("train", "test"))
            png = (self.root / "rgb").is_dir() or (self.root / split / "rgb").is_dir()
            layout = "depthg" if depthg and not png else "png"
        self.layout = layout
        if layout == "depthg":
            self._items = self._depthg_rows()
            return
        folder_split = (self.root / split / "rgb").is_dir()
        if folder_split:
            self.root = self.root / split
        indices = None if folder_split else self._split_indices(split_file)
        rows = self._manifest_rows(not folder_split and indices is None, subset_split)
        if indices is not None:
            rows = [r for r in rows if r["index"] in indices]
        self._items = sorted(rows, key=lambda r: r["key"])
        if not self._items:
            source = self.root / "manifest.csv" if (self.root / "manifest.csv").is_file() else self.root / "rgb"
            raise DatasetError(f"{source}: no NYUv2 image of split {split!r} listed; check the file (and the split files)")

    def _depthg_rows(self) -> list[dict]:
        rgb_dir = require_dir(self.root / f"{self.split}_rgb", f"NYUv2 (DepthG layout) {self.split}_rgb/ folder", FIX)
        with os.scandir(rgb_dir) as it:
            stems = sorted(e.name[:-4] for e in it if e.name.endswith(".png"))
        rows = []
        for stem in stems:
            index = int(stem) if stem.isdigit() else None
            rows.append({"key": make_key(self.name, self.split, stem), "index": index,
                         "rgb": f"{self.split}_rgb/{stem}.png", "depth": f"{self.split}_depth/{stem}.png",
                         "label": f"{self.split}_seg13/{stem}.png"})
        return rows

    def _split_indices(self, split_file: str | Path | None) -> set[int] | None:
        if split_file is not None:
            return read_split_indices(Path(split_file), self.split)
        for cand in (self.root / "splits.mat", self.root / "splits" / f"{self.split}.txt"):
            if cand.is_file():
                return read_split_indices(cand, self.split)
        return None

    def _manifest_rows(self, need_split_info: bool, subset_split: str) -> list[dict]:
        manifest = self.root / "manifest.csv"
        if not manifest.is_file():
            if need_split_info:
                raise MissingFileError("NYUv2 split definition (manifest.csv, splits.mat or splits/<split>.txt)",
                                       self.root / "splits.mat", FIX)
            rgb_dir = require_dir(self.root / "rgb", "NYUv2 rgb/ folder", FIX)
            with os.scandir(rgb_dir) as it:
                stems = [e.name[:-4] for e in it if e.name.endswith(".png")]
            return [self._row(int(s) if s.isdigit() else None, s, {}) for s in stems]
        with manifest.open(newline="") as f:
            records = list(csv.DictReader(f))
        if records and "split" in records[0]:
            records = [r for r in records if r["split"] == self.split]
        elif need_split_info and self.split != subset_split:
            raise DatasetError(f"{manifest} has no 'split' column and no splits.mat/splits/ exists, so it is read "
                               f"as a {subset_split!r}-only subset; split {self.split!r} is not available")
        rows = []
        for n, rec in enumerate(records, start=2):
            try:
                index = int(rec["nyu_labeled_index_1based"])
            except (KeyError, ValueError) as exc:
                raise DatasetError(f"{manifest} line {n}: needs an integer 'nyu_labeled_index_1based'") from exc
            rows.append(self._row(index, f"{index:04d}", rec))
        return rows

    def _row(self, index: int | None, stem: str, rec: dict) -> dict:
        return {"key": make_key(self.name, self.split, f"{index:04d}" if index is not None else stem),
                "index": index, "rgb": rec.get("rgb") or f"rgb/{stem}.png",
                "depth": rec.get("depth_mm_uint16") or rec.get("depth") or f"depth/{stem}.png",
                "label": rec.get("label13") or f"label13/{stem}.png"}

    def _load(self, item: dict) -> tuple[Sample, dict[str, Path]]:
        rgb_path, depth_path, label_path = (self.root / item[k] for k in ("rgb", "depth", "label"))
        image = read_rgb(rgb_path, "NYUv2 RGB image", FIX)
        raw_label = read_png(label_path, "NYUv2 13-class label map", FIX)
        if raw_label.size and int(raw_label.max()) > self.num_classes:
            bad = np.unique(raw_label[raw_label > self.num_classes])
            raise DatasetError(f"{label_path}: raw 13-class label values outside 0..{self.num_classes}: "
                               f"{bad[:20].tolist()}")
        label = nyu_label13_to_index(raw_label)
        depth = None
        if depth_path.is_file() or self.require_depth:
            units = "1e-4 m" if self.layout == "depthg" else "mm"
            raw = read_png(depth_path, f"NYUv2 sensor depth PNG (uint16 {units})", FIX)
            depth, holes = sensor_depth_from_png_array(raw, depth_path, scale=DEPTH_UNITS_PER_M[self.layout])
        meta = {"dataset": self.name, "split": self.split, "index_1based": item["index"], "layout": self.layout,
                "image": self._rel(rgb_path), "label": self._rel(label_path),
                "depth": self._rel(depth_path) if depth is not None else None, "depth_units": "m"}
        if depth is not None:
            meta["depth_holes_filled"] = holes
        files = {"image": rgb_path, "label": label_path, "depth": depth_path}
        return Sample(item["key"], image, label, depth, meta), files
