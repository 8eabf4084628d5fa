"""The data stages, each writing one folder or file and skipped when its valid output exists.

``prepare``: raw dataset -> crops folder (five-crop or single crop, resized, with labels and
sensor depth). ``depth``: crops -> depth folder (one normalised [0, 1] map per crop).
``shards``: crops + depth -> WebDataset shard folder. ``knn``: shards -> kNN table.

Every folder is written under a temporary name and renamed when complete; its
``index.json`` records the inputs and parameters, and a stage whose output exists with the
same parameters is skipped. The depth stage keeps finished maps in its partial folder, so
an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from repro.data.crops import make_crops
from repro.data.sample import DatasetError, Sample
from repro.data.shards import ShardError, iter_shards, verify_once, write_shards

__all__ = ["prepare_stage", "depth_stage", "shards_stage", "knn_stage", "iter_crops"]

INDEX = "index.json"


def _existing(out: Path, params: dict) -> bool:
    """True if ``out`` holds a complete output made with ``params``; stale output raises."""
    index_path = out / INDEX if out.is_dir() else out.with_suffix(out.suffix + ".json")
    if not index_path.is_file():
        return False
    recorded = json.loads(index_path.read_text()).get("params")
    if recorded != params:
        raise FileExistsError(
            f"{out} was made with other parameters ({recorded}); remove it or choose another output folder"
        )
    return True


def _finish(partial: Path, out: Path, index: dict) -> Path:
    (partial / INDEX).write_text(json.dumps(index, sort_keys=True))
    os.replace(partial, out)
    return out


def prepare_stage(dataset, out: str | Path, *, five_crop: bool, size: int, progress: bool = True) -> Path:
    """Crop every image of a dataset adapter and store the crops (SPEC section 3).

    Args:
        dataset: an adapter from :mod:`repro.data.registry` (yields :class:`Sample`).
        out: crops folder to create.
        five_crop: five-crop at (0.5 h, 0.5 w) first (training sets except Potsdam).
        size: final side, 224 (train) or 320 (validation).
        progress: show a progress bar.

    Returns:
        The crops folder: ``<key>.img.png``, ``<key>.label.npy`` (int16), ``<key>.sensor.npy``
        (float32 metres), ``<key>.json`` per crop, and ``index.json``.

    Raises:
        DatasetError: if the dataset holds no image (an empty manifest or split file).
    """
    out = Path(out)
    if len(dataset) == 0:
        raise DatasetError(f"{dataset!r}: no image in split {dataset.split!r} (root {getattr(dataset, 'root', '?')}); "
                           "check its manifest / split files")
    params = {"dataset": dataset.name, "split": dataset.split, "n_images": len(dataset), "five_crop": five_crop,
              "size": size}
    if _existing(out, params):
        return out
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    keys = []
    for i in tqdm(range(len(dataset)), desc=f"prepare {dataset.name}/{dataset.split}", disable=not progress):
        for crop in make_crops(dataset[i], five_crop=five_crop, size=size):
            _save_crop(partial, crop)
            keys.append(crop.key)
    return _finish(partial, out, {"params": params, "keys": keys, "num_classes": dataset.num_classes,
                                  "class_names": list(dataset.class_names)})


def _save_crop(folder: Path, crop: Sample) -> None:
    from PIL import Image

    Image.fromarray(crop.image).save(folder / f"{crop.key}.img.png", compress_level=1)
    if crop.label is not None:
        np.save(folder / f"{crop.key}.label.npy", crop.label.astype(np.int16))
    if crop.depth is not None:
        np.save(folder / f"{crop.key}.sensor.npy", crop.depth.astype(np.float32))
    (folder / f"{crop.key}.json").write_text(json.dumps(crop.meta, sort_keys=True))


def iter_crops(crops: str | Path) -> Iterator[Sample]:
    """Read the crops of a finished ``prepare`` folder, in index order.

    Raises:
        FileNotFoundError: if the folder is incomplete or a crop file is missing.
    """
    from PIL import Image

    crops = Path(crops)
    index_path = crops / INDEX
    if not index_path.is_file():
        raise FileNotFoundError(f"{crops} is not a finished crops folder (no {INDEX}); run `repro prepare`")
    for key in json.loads(index_path.read_text())["keys"]:
        img = crops / f"{key}.img.png"
        if not img.is_file():
            raise FileNotFoundError(f"crop image {img} is missing; rebuild {crops} with `repro prepare`")
        label = crops / f"{key}.label.npy"
        sensor = crops / f"{key}.sensor.npy"
        yield Sample(
            key=key,
            image=np.array(Image.open(img).convert("RGB")),
            label=np.load(label).astype(np.int64) if label.is_file() else None,
            depth=np.load(sensor) if sensor.is_file() else None,
            meta=json.loads((crops / f"{key}.json").read_text()),
        )


def depth_stage(
    crops: str | Path,
    out: str | Path,
    *,
    source: str,
    weights: str | Path | None = None,
    batch_size: int = 8,
    device: str | None = None,
    progress: bool = True,
) -> Path:
    """One depth map per crop, min-max normalised to [0, 1] (DepthG sec. 3.2, eq. 4).

    Args:
        crops: a finished crops folder.
        out: depth folder to create: ``<key>.npy`` (float32, [0, 1]) and ``index.json`` with
            each crop's raw range ``[d_min, d_max]`` (metres for metric sources).
        source: ``"sensor"`` (the crop's sensor depth; an error if a crop has none),
            ``"zoedepth"``, ``"midas"``, ``"image_plane"`` or ``"perspective_plane"``.
        weights: local weights folder of the estimator (ZoeDepth/MiDaS).
        batch_size: images per estimator call.
        device: torch device; default CUDA when available.
        progress: show a progress bar with images/s.

    Raises:
        repro.errors.MissingFileError: if a crop has no sensor depth for ``source="sensor"``
            or the estimator weights are missing.
        DatasetError: a crop's sensor map with an invalid pixel (0, negative, NaN, inf: the
            adapter fills holes before cropping, so the crops folder is damaged or stale), or an
            estimator output with NaN/inf; names the crop file.
    """
    from repro.depth import get_estimator, normalize_depth
    from repro.depth.base import normalize_prediction
    from repro.errors import MissingFileError

    crops, out = Path(crops), Path(out)
    params = {"crops": str(crops.resolve()), "source": source, "weights": None if weights is None else str(weights)}
    if _existing(out, params):
        return out
    partial = out.with_name(f".{out.name}.partial")  # kept across interruptions: finished maps are reused
    partial.mkdir(parents=True, exist_ok=True)
    ranges_path = partial / "ranges.jsonl"
    ranges = {}
    if ranges_path.is_file():
        for line in ranges_path.read_text().splitlines():
            rec = json.loads(line)
            if (partial / f"{rec['key']}.npy").is_file():
                ranges[rec["key"]] = rec["range"]
    estimator = None if source == "sensor" else get_estimator(source, weights, device=device)
    todo = [c for c in iter_crops(crops) if c.key not in ranges]
    bar = tqdm(total=len(todo), desc=f"depth ({source})", unit="img", disable=not progress)
    with open(ranges_path, "a") as log:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            if estimator is None:
                missing = [c.key for c in batch if c.depth is None]
                if missing:
                    raise MissingFileError("sensor depth of crop", crops / f"{missing[0]}.sensor.npy",
                                           "use a dataset with sensor depth, or --source zoedepth/midas")
                for c in batch:
                    bad = int((~(np.isfinite(c.depth) & (c.depth > 0))).sum())
                    if bad:
                        raise DatasetError(f"{crops / (c.key + '.sensor.npy')}: {bad} pixel(s) of sensor depth are 0, "
                                           "negative or not finite; rebuild the crops folder with `repro prepare` (the "
                                           "dataset adapter fills sensor holes before cropping)")
                results = [normalize_depth(c.depth) for c in batch]
            else:
                with torch.inference_mode():
                    raw = estimator.predict([c.image for c in batch])
                    try:
                        results = normalize_prediction(estimator, raw)
                    except ValueError as exc:
                        files = ", ".join(str(crops / f"{c.key}.img.png") for c in batch)
                        raise DatasetError(f"depth source {source!r} on {files}: {exc}") from exc
            for crop, (norm, (lo, hi)) in zip(batch, results):
                np.save(partial / f"{crop.key}.npy", np.asarray(norm, dtype=np.float32))
                ranges[crop.key] = [float(lo), float(hi)]
                log.write(json.dumps({"key": crop.key, "range": ranges[crop.key]}) + "\n")
            log.flush()
            bar.update(len(batch))
    bar.close()
    ranges_path.unlink()
    return _finish(partial, out, {"params": params, "ranges": ranges,
                                  "kind": "metric" if estimator is None else estimator.kind})


def shards_stage(
    crops: str | Path, depth: str | Path | None, out: str | Path, *, shard_size: int = 1000, depth_source: str = ""
) -> Path:
    """Pack crops (and their depth maps) into WebDataset shards, in crop index order.

    The raw depth range and source go into each sample's JSON metadata. An existing shard
    folder made from the same inputs is reused; one made from other inputs is an error.

    Raises:
        FileNotFoundError: if a crop's depth map is missing from the depth folder.
        DatasetError: if a depth map is not ``(H, W)`` of its crop, or holds values outside [0, 1] / NaN / inf
            (names the file).
        FileExistsError: if ``out`` holds shards made from other inputs.
        ShardError: if reused shards no longer match their index (checksums, offsets; checked
            fully once, then by file stats, see :func:`repro.data.shards.verify_once`).
    """
    crops, out = Path(crops), Path(out)
    params = {"crops": str(crops.resolve()), "depth": None if depth is None else str(Path(depth).resolve()),
              "shard_size": shard_size, "depth_source": depth_source}
    if _existing(out, params):
        verify_once(out)
        return out
    ranges = json.loads((Path(depth) / INDEX).read_text())["ranges"] if depth is not None else {}

    def items():
        for crop in iter_crops(crops):
            depth01 = None
            if depth is not None:
                path = Path(depth) / f"{crop.key}.npy"
                if not path.is_file():
                    raise FileNotFoundError(f"depth map {path} is missing; rerun `repro depth`")
                depth01 = np.load(path)
                if depth01.shape != crop.image.shape[:2] or not np.isfinite(depth01).all() or (
                        depth01.size and (depth01.min() < 0 or depth01.max() > 1)):
                    raise DatasetError(f"{path}: depth map must be {crop.image.shape[:2]}, finite and in [0, 1]; got "
                                       f"{depth01.shape}, {int((~np.isfinite(depth01)).sum())} non-finite value(s), "
                                       f"range [{np.nanmin(depth01):.3g}, {np.nanmax(depth01):.3g}]; rerun `repro depth`")
                crop.meta = {**crop.meta, "depth_range": ranges[crop.key], "depth_source": depth_source}
            yield crop, depth01

    write_shards(items(), out, shard_size=shard_size, params=params)
    return out


def knn_stage(shards: str | Path, out: str | Path, *, arch: str, checkpoint: str | Path, k: int = 30,
              batch_size: int = 32, device: str | None = None) -> Path:
    """Build the kNN table of a training shard folder (STEGO sec. 3.3).

    Raises:
        ShardError: on unreadable shards; MissingFileError for a missing checkpoint.
    """
    from repro.data.knn import KnnTable, pooled_features, save_knn, search_knn
    from repro.models.backbone import DinoBackbone

    out = Path(out)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    params = {"shards": str(Path(shards).resolve()), "arch": arch, "checkpoint": str(checkpoint), "k": k}
    meta_path = out.with_suffix(out.suffix + ".json")
    if out.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()).get("params") == params:
        return out
    backbone = DinoBackbone(arch, checkpoint).to(device)
    keys: list[str] = []

    def batches():
        batch = []
        for sample in iter_shards(shards):
            keys.append(sample["key"])
            batch.append(sample["image"])
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    feats = pooled_features(backbone, batches(), device)
    if len(keys) != feats.shape[0]:
        raise ShardError(f"read {len(keys)} keys but {feats.shape[0]} features from {shards}")
    indices, sims = search_knn(feats, k=min(k, len(keys)))
    save_knn(out, KnnTable(keys, indices, sims, {"params": params}))
    meta_path.write_text(json.dumps({"params": params}))
    return out
