"""Convert the official NYU Depth V2 labelled set into repro's NYUv2 PNG layout (``repro data convert nyuv2``).

Inputs, under the names they are published with:

* ``nyu_depth_v2_labeled.mat`` (Silberman et al., ECCV 2012): MATLAB v7.3, i.e. HDF5, read with h5py.
  MATLAB stores arrays column-major, so h5py shows every axis reversed: MATLAB's ``images``
  ``(480, 640, 3, 1449)`` is ``(N, 3, W, H)`` here, and ``depths`` (in-painted, metres), ``rawDepths``
  (raw sensor depth, metres, 0 = no reading) and ``labels`` (0 unlabelled, 1..894 classes) are
  ``(N, W, H)``. Frame ``i`` (1-based) is ``images[i - 1].transpose(2, 1, 0)`` -> ``(H, W, 3)`` and
  ``depths[i - 1].T`` -> ``(H, W)``.
* ``splits.mat`` (NYU toolbox): ``trainNdxs`` (795) and ``testNdxs`` (654), 1-based, read with scipy.
* The 13-class labels of Couprie et al. (ICLR 2013) from ankurhanda/nyuv2-meta-data, either
  its label PNGs (``train_labels_13/nyuv2_train_class13.tgz``, ``test_labels_13/nyuv2_test_class13.tgz``;
  members ``new_nyu_class13_NNNN.png``, ``NNNN`` = 1-based labelled index, uint8 0..13), given as the
  archives or as folders holding the PNGs (any name ending in ``NNNN.png``, so DepthG's renamed
  ``{train,test}_seg13/`` folders work too); or its class mapping, ``classMapping40.mat``
  (``mapClass``: 894 classes -> 40) and ``class13Mapping.mat`` (``classMapping13.labels13``: 40 -> 13),
  applied to ``labels`` (0 stays 0).

Output, read by :class:`repro.data.datasets.nyuv2.NYUv2`: ``rgb/NNNN.png``, ``depth/NNNN.png`` (uint16
millimetres, ``rint(metres * 1000)``), ``label13/NNNN.png`` (uint8, 0 unlabelled, 1..13),
``manifest.csv`` (one row per frame with its official split, depth variable and label source) and
``conversion.json`` (the settings). Frames are read one at a time; every file is written atomically
and a rerun skips the files that exist, so an interrupted conversion resumes. A rerun into the same
folder with another depth variable or label source is refused.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from repro.data.datasets.base import require_file
from repro.data.datasets.nyuv2 import FIX
from repro.data.datasets.nyuv2_labels13 import open_label13_source
from repro.utils.errors import DatasetError
from repro.utils.files import atomic_path

__all__ = ["convert_nyuv2", "ConvertResult", "LabelledMat", "read_official_splits", "depth_m_to_mm",
           "DEPTH_VARIABLES", "SPLIT_VARIABLES"]

DEPTH_VARIABLES = {"inpainted": "depths", "raw": "rawDepths"}
"""``--depth`` choice -> variable of ``nyu_depth_v2_labeled.mat``."""
SPLIT_VARIABLES = {"train": "trainNdxs", "test": "testNdxs"}
"""Split -> variable of ``splits.mat``."""
COMPRESS_LEVEL = 3  # zlib level of the written PNGs: lossless at any level; 3 is ~3x faster than 6, ~5 % larger
_MAX_MM = np.iinfo(np.uint16).max


def depth_m_to_mm(depth_m: np.ndarray, where: str) -> np.ndarray:
    """Depth in metres -> uint16 millimetres, ``rint(m * 1000)`` computed in float64 (0 stays 0).

    Args:
        depth_m: ``(H, W)`` float depth in metres.
        where: the variable and frame, used in error messages.

    Returns:
        ``(H, W)`` uint16 millimetres.

    Raises:
        DatasetError: for non-finite or negative depth, depth beyond 65.535 m (uint16 mm), or a frame
            without any reading (all 0). (A constant map is refused where the PNG is read, since a small
            window of a real frame may be flat to the millimetre.)
    """
    m = np.asarray(depth_m, dtype=np.float64)
    if not np.isfinite(m).all():
        raise DatasetError(f"{where}: {int((~np.isfinite(m)).sum())} non-finite depth values")
    mm = np.rint(m * 1000.0)
    if mm.size and (mm.min() < 0 or mm.max() > _MAX_MM):
        raise DatasetError(f"{where}: depth outside 0..65.535 m (uint16 millimetres): "
                           f"min {m.min():.4f} m, max {m.max():.4f} m")
    if mm.size and not mm.any():
        raise DatasetError(f"{where}: no depth reading (every value is 0); not the published file: download it again")
    return mm.astype(np.uint16)


def read_official_splits(path: str | Path) -> dict[str, np.ndarray]:
    """Read ``splits.mat`` (NYU toolbox) with :func:`scipy.io.loadmat`.

    Returns:
        ``{"train": trainNdxs, "test": testNdxs}``, each a sorted int64 array of 1-based indices.

    Raises:
        MissingFileError: if the file does not exist.
        DatasetError: if it cannot be read, lacks ``trainNdxs``/``testNdxs``, holds non-integer or
            repeated indices, or an index is in both splits (names the variable and the file).
    """
    from scipy.io import loadmat

    path = require_file(path, "NYUv2 splits.mat (trainNdxs, testNdxs)", FIX)
    try:
        data = loadmat(path)
    except (ValueError, OSError, NotImplementedError) as exc:
        raise DatasetError(f"{path}: cannot read with scipy.io.loadmat: {exc}") from exc
    out = {}
    for split, var in SPLIT_VARIABLES.items():
        if var not in data:
            names = sorted(k for k in data if not k.startswith("__"))
            raise DatasetError(f"{path}: no variable {var!r} (has {names}); expected the NYU toolbox splits.mat "
                               "with trainNdxs and testNdxs")
        arr = np.asarray(data[var]).ravel()
        if arr.size == 0 or not np.issubdtype(arr.dtype, np.number) or not np.array_equal(arr, np.round(arr)):
            raise DatasetError(f"{path}: variable {var!r} must hold 1-based integer indices, got {arr.dtype} "
                               f"{arr[:5].tolist()}")
        idx = np.sort(arr.astype(np.int64))
        if np.unique(idx).size != idx.size:
            repeated = np.unique(idx[1:][idx[1:] == idx[:-1]])
            raise DatasetError(f"{path}: variable {var!r} repeats indices {repeated[:10].tolist()}")
        out[split] = idx
    both = np.intersect1d(out["train"], out["test"])
    if both.size:
        raise DatasetError(f"{path}: indices in both 'trainNdxs' and 'testNdxs': {both[:10].tolist()}")
    return out


class LabelledMat:
    """Frame-by-frame reader of ``nyu_depth_v2_labeled.mat`` (h5py; use as a context manager).

    Args:
        path: the MATLAB v7.3 (HDF5) file.
        depth_variable: ``"depths"`` (in-painted) or ``"rawDepths"``.
        need_labels: also require the 894-class ``labels``.

    Attributes:
        n: number of frames N; ``hw``: frame size ``(H, W)`` (480, 640 in the official file).

    Raises:
        MissingFileError: if the file does not exist.
        DatasetError: if it is not HDF5, a variable is missing, or a variable's shape or dtype is
            not the official one (names the variable and the file).
    """

    def __init__(self, path: str | Path, depth_variable: str = "depths", need_labels: bool = False) -> None:
        import h5py

        self.path = require_file(path, "NYUv2 nyu_depth_v2_labeled.mat", FIX)
        if not h5py.is_hdf5(self.path):
            raise DatasetError(f"{self.path}: not a MATLAB v7.3 (HDF5) file; nyu_depth_v2_labeled.mat as published "
                               "is one (about 2.8 GB): download it again if this copy is truncated")
        self.depth_variable = depth_variable
        self._file = h5py.File(self.path, "r")
        try:
            self.images = self._var("images", 4, np.uint8)
            if self.images.shape[1] != 3:
                raise self._shape_error("images", "(N, 3, W, H)")
            self.n, _, w, h = self.images.shape
            self.hw = (h, w)
            self.depth = self._var(depth_variable, 3, np.floating)
            self.labels = self._var("labels", 3, np.integer) if need_labels else None
        except BaseException:
            self._file.close()
            raise

    def _var(self, name: str, ndim: int, kind: type):
        import h5py

        if name not in self._file or not isinstance(self._file[name], h5py.Dataset):
            raise DatasetError(f"{self.path}: no variable {name!r} (has {sorted(self._file.keys())}); "
                               "expected the official nyu_depth_v2_labeled.mat")
        ds = self._file[name]
        if ds.ndim != ndim or not np.issubdtype(ds.dtype, kind):
            raise self._shape_error(name, "(N, 3, W, H) uint8" if ndim == 4 else "(N, W, H)")
        if ndim == 3 and ds.shape != (self.n, self.hw[1], self.hw[0]):
            raise self._shape_error(name, f"(N, W, H) = {(self.n, self.hw[1], self.hw[0])} like 'images'")
        return ds

    def _shape_error(self, name: str, expected: str) -> DatasetError:
        ds = self._file[name]
        return DatasetError(f"{self.path}: variable {name!r} has shape {ds.shape} {ds.dtype}; expected {expected} "
                            "(h5py shows MATLAB's axes reversed; official: images (1449, 3, 640, 480) uint8, "
                            "depths/rawDepths (1449, 640, 480) float, labels (1449, 640, 480) integer)")

    def rgb(self, index: int) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB of 1-based frame ``index``."""
        return np.ascontiguousarray(self.images[index - 1].transpose(2, 1, 0))

    def depth_mm(self, index: int) -> np.ndarray:
        """``(H, W)`` uint16 millimetres of 1-based frame ``index`` (see :func:`depth_m_to_mm`)."""
        return depth_m_to_mm(self.depth[index - 1].T, f"{self.path}: variable {self.depth_variable!r}, frame {index}")

    def labels894(self, index: int) -> np.ndarray:
        """``(H, W)`` int64 894-class labels of 1-based frame ``index`` (0 = unlabelled)."""
        return np.ascontiguousarray(self.labels[index - 1].T).astype(np.int64)

    def check_splits(self, splits: dict[str, np.ndarray], splits_path: str | Path) -> None:
        """Raise :class:`DatasetError` naming the variable if a split index is outside ``1..N``."""
        for split, idx in splits.items():
            bad = idx[(idx < 1) | (idx > self.n)]
            if bad.size:
                raise DatasetError(f"{splits_path}: variable {SPLIT_VARIABLES[split]!r} has indices outside "
                                   f"1..{self.n} (the frames of {self.path}): {bad[:10].tolist()}")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> LabelledMat:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class ConvertResult:
    """Outcome of :func:`convert_nyuv2`: output folder, frames in the splits, frames written
    (one or more files) and skipped (all files present), wall-clock seconds."""

    out: Path
    frames: int
    written: int
    skipped: int
    seconds: float


def _write_png(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG", compress_level=COMPRESS_LEVEL)


def convert_nyuv2(mat: str | Path, splits: str | Path, labels13: Sequence[str | Path], out: str | Path, *,
                  depth: str = "inpainted", progress: bool = True) -> ConvertResult:
    """Convert ``nyu_depth_v2_labeled.mat`` + ``splits.mat`` + 13-class labels into repro's PNG layout.

    Every input is checked before anything is written. Then frame by frame (sorted 1-based index):
    the missing ones of ``rgb/NNNN.png`` ((H, W, 3) uint8), ``depth/NNNN.png`` ((H, W) uint16 mm)
    and ``label13/NNNN.png`` ((H, W) uint8 0..13) are written atomically; finally ``manifest.csv``.

    Args:
        mat: ``nyu_depth_v2_labeled.mat`` (MATLAB v7.3 / HDF5).
        splits: ``splits.mat`` with ``trainNdxs`` / ``testNdxs``.
        labels13: nyuv2-meta-data label PNG archives/folders, or ``classMapping40.mat`` and
            ``class13Mapping.mat`` (module docstring).
        out: output folder (created).
        depth: ``"inpainted"`` (``depths``, as the sample and DepthG use) or ``"raw"`` (``rawDepths``).
        progress: show a tqdm bar (images/s).

    Returns:
        A :class:`ConvertResult`.

    Raises:
        ValueError: for an unknown ``depth``.
        MissingFileError: if an input file does not exist.
        DatasetError: for a malformed input (names the file and the variable) or an ``out`` folder
            converted earlier with another depth variable or label source.
    """
    if depth not in DEPTH_VARIABLES:
        raise ValueError(f"depth must be one of {sorted(DEPTH_VARIABLES)}, got {depth!r}")
    start = time.perf_counter()
    split_idx = read_official_splits(splits)
    is_mapping = all(Path(p).suffix.lower() == ".mat" for p in labels13)
    out = Path(out)
    with LabelledMat(mat, DEPTH_VARIABLES[depth], need_labels=is_mapping) as m:
        m.check_splits(split_idx, splits)
        frames = sorted((int(i), s) for s, idx in split_idx.items() for i in idx)
        source = open_label13_source(labels13, {i for i, _ in frames})
        settings = {"format": 1, "depth_variable": m.depth_variable, "label13_kind": source.kind,
                    "frame_hw": list(m.hw), "frames_in_mat": int(m.n)}
        _claim_output(out, settings, {"mat": Path(mat).name, "splits": Path(splits).name,
                                      "label13_source": source.description,
                                      "counts": {s: int(v.size) for s, v in split_idx.items()}})
        depth_source = f"{m.depth_variable} ({'in-painted' if depth == 'inpainted' else 'raw, 0 = no reading'})"
        written = skipped = 0
        rows = []
        bar = tqdm(total=len(frames), desc="convert nyuv2", unit="img", disable=not progress)
        for index, split in frames:
            stem = f"{index:04d}"
            paths = {"rgb": out / "rgb" / f"{stem}.png", "depth": out / "depth" / f"{stem}.png",
                     "label13": out / "label13" / f"{stem}.png"}
            todo = [k for k, p in paths.items() if not p.is_file()]
            if "rgb" in todo:
                _write_png(paths["rgb"], m.rgb(index))
            if "depth" in todo:
                _write_png(paths["depth"], m.depth_mm(index))
            if "label13" in todo:
                _write_png(paths["label13"], source.frame(index, m.hw, m))
            written += bool(todo)
            skipped += not todo
            rows.append({"nyu_labeled_index_1based": index, "split": split, "rgb": f"rgb/{stem}.png",
                         "depth_mm_uint16": f"depth/{stem}.png", "label13": f"label13/{stem}.png",
                         "depth_source": depth_source,
                         "label13_source": source.row_source(index)})
            bar.update()
        bar.close()
    with atomic_path(out / "manifest.csv") as tmp:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return ConvertResult(out, len(frames), written, skipped, time.perf_counter() - start)


def _claim_output(out: Path, settings: dict, info: dict) -> None:
    """Write ``out/conversion.json``, or refuse if it records other settings; drop stale temp files."""
    record = out / "conversion.json"
    if record.is_file():
        previous = json.loads(record.read_text())
        old = {k: previous.get(k) for k in settings}
        if old != settings:
            raise DatasetError(f"{record}: {out} was converted with {old}, now asked for {settings}; "
                               "use another --out (or delete the folder) to convert with other settings")
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("rgb", "depth", "label13"):  # temp files of a killed run (atomic_path names them .<name>.*.tmp)
        for stale in (out / sub).glob(".*.png.*.tmp"):
            stale.unlink()
    with atomic_path(record) as tmp:
        tmp.write_text(json.dumps({**settings, **info}, indent=1) + "\n")
