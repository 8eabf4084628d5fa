"""Depth maps computed elsewhere, one file per image: the ``files`` and ``kbr`` depth sources.

DepthG Table 5 trains with depth from Kick Back & Relax (KBR, Spencer et al., ICCV 2023,
jspenmar/slowtv_monodepth). repro does not rebuild the KBR network: its encoder is a timm ConvNeXt, but
its disparity decoder (``DepthNet`` with the ``monodepth`` decoder, ``api/quickstart/networks``) exists only
in that repository, so no maintained library builds it faithfully. Its maps (or any other estimator's) are
computed elsewhere, with the authors' own code, and read from a folder (``data.depth_files``)::

    <depth_files>/<image key>.npy      (H, W) float depth of the FULL image, larger = farther

``<image key>`` is the key repro gives each image of a split (``cocostuff27_train_000000000139``,
``potsdam3_train_<id>``; ``repro.data.get_dataset(name, root, split).keys()`` lists them), ``(H, W)``
is the image's own size, and the values are depth in any unit (metres, or relative depth up to
scale). A disparity map (KBR predicts disparity) must be inverted before it is saved, e.g.
``np.save(path, 1 / np.maximum(disp, 1e-3 * disp.max()))``, as :class:`repro.depth.base.DepthEstimator`
does for MiDaS; :func:`disparity_to_depth_files` does that for a folder of KBR's own ``<image stem>.npy``
disparity outputs (``api/quickstart/run.py --out-ext .npy`` of jspenmar/slowtv_monodepth writes them at
the image's size). Each map is checked when read: a missing file, a size other than the image's, a
NaN/inf, or an all-constant map is an error that names the file.

Each crop's map is cut from its image's map with the crop box, resized like the crop (bilinear,
``data.resize``) and min-max normalised per crop (DepthG eq. 4), as the estimators' maps are
(fidelity item R22).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from repro.utils.errors import MissingFileError

__all__ = ["FILE_SOURCES", "depth_file", "read_depth_file", "check_depth_files", "disparity_to_depth_files"]

#: Depth sources read from per-image files.
FILE_SOURCES = ("files", "kbr")

_FIX = ("write one (H, W) float .npy of depth (larger = farther) per image, named <image key>.npy, "
        "into data.depth_files (README: 'Depth maps computed elsewhere')")


def depth_file(folder: str | Path, image_key: str) -> Path:
    """Path of one image's map: ``<folder>/<image key>.npy``."""
    return Path(folder) / f"{image_key}.npy"


def read_depth_file(folder: str | Path, image_key: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read and check one image's depth map.

    Args:
        folder: ``data.depth_files``.
        image_key: the image's key.
        shape: the image's ``(H, W)``; ``None`` skips the size check (the crop box is checked instead).

    Returns:
        ``(H, W)`` float32 depth, finite, not constant (units of the file).

    Raises:
        MissingFileError: if the folder or the file is missing (names the layout).
        repro.data.datasets.base.DatasetError: naming the file, for an unreadable file, a non-2-D or
            non-real array, a size other than ``shape``, NaN/inf values or an all-constant map.
    """
    from repro.utils.errors import DatasetError

    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError("folder of per-image depth maps (data.depth_files)", folder, _FIX)
    path = depth_file(folder, image_key)
    if not path.is_file():
        raise MissingFileError(f"depth map of image {image_key!r}", path, _FIX)
    try:
        d = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DatasetError(f"{path}: not a readable .npy array ({exc}); {_FIX}") from exc
    if d.ndim != 2 or not (np.issubdtype(d.dtype, np.floating) or np.issubdtype(d.dtype, np.integer)) \
            or d.dtype == np.bool_:
        raise DatasetError(f"{path}: expected one (H, W) real-valued depth map, got {d.dtype} {d.shape}")
    if shape is not None and tuple(d.shape) != tuple(shape):
        raise DatasetError(f"{path}: depth map is {d.shape[0]}x{d.shape[1]} but image {image_key!r} is "
                           f"{shape[0]}x{shape[1]}; compute the map at the image's own size")
    d = d.astype(np.float32)
    bad = int((~np.isfinite(d)).sum())
    if bad:
        raise DatasetError(f"{path}: {bad} NaN/inf value(s) in the depth map; fill them before saving")
    if d.size == 0 or float(d.max()) == float(d.min()):
        raise DatasetError(f"{path}: the depth map is constant ({float(d.flat[0]) if d.size else 'empty'}); "
                           "it carries no depth: recompute it")
    return d


def check_depth_files(dataset, folder: str | Path) -> int:
    """Check every image of a dataset split against its map (missing, wrong size, NaN, constant).

    Args:
        dataset: a dataset adapter (:mod:`repro.data.datasets.registry`).
        folder: ``data.depth_files``.

    Returns:
        The number of maps checked.

    Raises:
        MissingFileError / DatasetError: for the first bad image (see :func:`read_depth_file`).
    """
    for i, key in enumerate(dataset.keys()):
        read_depth_file(folder, key, tuple(dataset[i].image.shape[:2]))
    return len(dataset)


def disparity_to_depth_files(dataset, disparity_dir: str | Path, out_dir: str | Path, *, eps: float = 1e-3) -> int:
    """Turn per-image disparity maps named by image stem into this module's depth files.

    ``depth = 1 / max(disp, eps * disp.max())`` (larger = farther, bounded far field; the MiDaS rule of
    :meth:`repro.depth.base.DepthEstimator.to_depth`), written atomically as ``<out_dir>/<image key>.npy``.

    Args:
        dataset: a dataset adapter whose samples' ``meta["id"]`` is the image file's stem (COCO-Stuff's
            12-digit id, Potsdam's file name).
        disparity_dir: folder of ``<stem>.npy`` ``(H, W)`` disparity (KBR: in [0, 1], larger = nearer).
        out_dir: ``data.depth_files``.
        eps: relative disparity floor.

    Returns:
        The number of maps written.

    Raises:
        MissingFileError: a missing disparity file. DatasetError: a sample without ``meta["id"]``, or a
            disparity map that is not ``(H, W)`` of its image or holds NaN/inf (names the file).
    """
    from repro.utils.files import atomic_path
    from repro.utils.errors import DatasetError

    disparity_dir, out_dir = Path(disparity_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, key in enumerate(dataset.keys()):
        sample = dataset[i]
        stem = sample.meta.get("id")
        if stem is None:
            raise DatasetError(f"image {key!r} has no meta id to find its disparity file by; write {out_dir}/{key}.npy "
                               "yourself")
        path = disparity_dir / f"{stem}.npy"
        if not path.is_file():
            raise MissingFileError(f"disparity map of image {key!r}", path, "run the estimator on every image first")
        disp = np.load(path, allow_pickle=False).astype(np.float64)
        disp = disp[0] if disp.ndim == 3 and disp.shape[0] == 1 else disp
        if disp.shape != sample.image.shape[:2] or not np.isfinite(disp).all():
            raise DatasetError(f"{path}: disparity must be finite and {sample.image.shape[:2]} (the image's size), got "
                               f"{disp.shape} with {int((~np.isfinite(disp)).sum())} non-finite value(s)")
        floor = max(eps * float(disp.max()), np.finfo(np.float32).tiny)
        with atomic_path(depth_file(out_dir, key), suffix=".npy") as tmp:
            np.save(tmp, (1.0 / np.maximum(disp, floor)).astype(np.float32))
    return len(dataset)
