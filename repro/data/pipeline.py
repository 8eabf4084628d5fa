"""The data stages, each writing one folder or file and skipped when its valid output exists.

``prepare``: raw dataset -> crops folder (five-crop or single crop, resized, with labels and
sensor depth). ``depth``: crops -> depth folder (one [0, 1] map per crop; with
``scope="image"`` cut from the per-image maps of :func:`repro.data.image_depth.image_depth_stage`).
``shards``: crops + depth -> WebDataset shard folder. ``knn``: shards -> kNN table.
What the released code did differently (docs/fidelity.md) are plain arguments of these stages:
``resize`` / ``codec`` (R3), ``scope`` / ``encoding`` / ``tta`` (R4, R5), ``dropout`` (R11),
``score_void`` (R13).

Every folder is written under a temporary name and renamed when complete; its
``index.json`` records the inputs and parameters, and a stage whose output exists with the
same parameters is skipped. The depth stage keeps finished maps in its partial folder, so
an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from repro.config.identity import content_mismatch
from repro.data.crops import iter_crops, make_crops, save_crop
from repro.data.datasets.base import Sample
from repro.data.shards import ShardError, iter_shards, verify_once, write_shards
from repro.data.stages import INDEX, existing, finish
from repro.depth import weights_sha256
from repro.utils.errors import DatasetError, MissingFileError, OutputExistsError
from repro.utils.files import content_sha256
from repro.utils.iterate import batched

__all__ = ["prepare_stage", "depth_stage", "shards_stage", "knn_stage"]

log = logging.getLogger("repro.data")


def prepare_stage(dataset, out: str | Path, *, five_crop: bool, size: int, resize: str = "bilinear",
                  codec: str = "png", score_void: bool = False, progress: bool = True) -> Path:
    """Crop every image of a dataset adapter and store the crops (README: Data pipeline).

    Args:
        dataset: an adapter from :mod:`repro.data.datasets.registry` (yields :class:`Sample`).
        out: crops folder to create.
        five_crop: five-crop at (0.5 h, 0.5 w) first (training sets except Potsdam).
        size: final side, 224 (train) or 320 (validation).
        resize: ``"bilinear"`` (paper) or ``"nearest"`` (released, R3) for images and sensor depth.
        codec: ``"jpeg"``: each five-crop round-trips through JPEG before resizing (released, R3).
        score_void: R13 (released NYUv2): labels shifted by +1 so that void (-1) becomes class 0
            and is scored; ``num_classes`` + 1 and ``"void"`` first in ``class_names`` (the
            released ``n_classes = 14``; ``src/crop_datasets.py`` stored ``label + 1``).
        progress: show a progress bar.

    Returns:
        The crops folder: ``<key>.img.png``, ``<key>.label.npy`` (int16), ``<key>.sensor.npy``
        (float32 metres), ``<key>.json`` per crop, and ``index.json`` (keys, ``num_classes``,
        ``class_names``, params).

    Raises:
        FileExistsError: if ``out`` holds crops made with other parameters.
        DatasetError: if the dataset holds no image (an empty manifest or split file).
    """
    out = Path(out)
    if len(dataset) == 0:
        raise DatasetError(f"{dataset!r}: no image in split {dataset.split!r} (root {getattr(dataset, 'root', '?')}); "
                           "check its manifest / split files")
    params = {"dataset": dataset.name, "split": dataset.split, "n_images": len(dataset), "five_crop": five_crop,
              "size": size, "resize": resize, "codec": codec if five_crop else "png", "score_void": score_void}
    if existing(out, params):
        return out
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    keys = []
    for i in tqdm(range(len(dataset)), desc=f"prepare {dataset.name}/{dataset.split}", disable=not progress):
        for crop in make_crops(dataset[i], five_crop=five_crop, size=size, resize=resize, codec=codec):
            if score_void and crop.label is not None:
                crop.label = crop.label + 1  # -1 (void) -> 0
            save_crop(partial, crop)
            keys.append(crop.key)
    names = (("void",) if score_void else ()) + tuple(dataset.class_names)
    return finish(partial, out, {"params": params, "keys": keys, "num_classes": dataset.num_classes + int(score_void),
                                  "class_names": list(names)})


def _image_map(cache: dict[str, np.ndarray], crop: Sample, load) -> np.ndarray:
    """The full-image map of ``crop`` (``load(image_key)``), kept for the next crop: crops of one image are consecutive."""
    image_key = crop.meta.get("image_key", crop.key)
    if image_key not in cache:
        cache.clear()
        cache[image_key] = load(image_key)
    return cache[image_key]


def depth_stage(
    crops: str | Path,
    out: str | Path,
    *,
    source: str,
    weights: str | Path | None = None,
    scope: str = "crop",
    encoding: str = "float",
    tta: bool = True,
    image_depth: str | Path | None = None,
    resize: str = "bilinear",
    batch_size: int = 8,
    device: str | None = None,
    progress: bool = True,
    depth_files: str | Path | None = None,
) -> Path:
    """One [0, 1] depth map (or other guidance map, :mod:`repro.method.guidance`) per crop (DepthG sec. 3.2, eq. 4; R4, R5).

    Args:
        crops: a finished crops folder.
        out: depth folder to create: ``<key>.npy`` (float32, [0, 1]) and ``index.json`` with
            each crop's raw range ``[d_min, d_max]`` (metres for metric sources; with
            ``scope="image"`` the range of the crop's full image).
        source: ``"sensor"`` (the crop's sensor depth; an error if a crop has none),
            ``"zoedepth"``, ``"midas"``, ``"image_plane"`` or ``"perspective_plane"``; ``"files"`` /
            ``"kbr"``: cut from per-image maps in ``depth_files`` (:mod:`repro.depth.files`), normalised
            per crop (``scope="image"``: per image, by the per-image stage); ``"mde_features"``: ``(C, S/8, S/8)``
            float16 ZoeDepth penultimate features (:class:`repro.depth.hf.ZoeDepthFeatures`); ``"semseg"``: the
            crop's ``(S, S)`` int16 class ids (-1 void). The last two only with ``scope="crop"``, ``encoding="float"``.
        weights: local weights folder of the estimator (ZoeDepth/MiDaS).
        scope: ``"crop"``: depth of each crop, normalised per crop (eq. 4); ``"image"``: cut
            from the per-image maps in ``image_depth`` and resized like the crop, NOT
            re-normalised (R4, :mod:`repro.data.image_depth`).
        encoding: ``"float"``, ``"uint8"`` (the map is ``k / 255``, R4) or ``"int_cast"`` (``{0, 1}``,
            R5); see :mod:`repro.depth.encoding`.
        tta: estimator test-time augmentation (``scope="crop"``; the per-image stage has its own).
        image_depth: the per-image folder (``scope="image"``), built by
            :func:`repro.data.image_depth.image_depth_stage` with the matching store.
        resize: the crops' resize mode (``scope="image"``: how each cut map is resized).
        batch_size: images per estimator call.
        device: torch device; default CUDA when available.
        progress: show a progress bar with images/s.
        depth_files: folder of per-image maps for ``"files"`` / ``"kbr"`` (``data.depth_files``).

    Raises:
        repro.utils.errors.MissingFileError: if a crop has no sensor depth for ``source="sensor"``,
            the estimator weights are missing, or (``files`` / ``kbr``) a per-image map is missing.
        FileNotFoundError: ``scope="image"`` without a finished ``image_depth`` folder or map.
        FileExistsError: if ``out`` (or ``image_depth``) was made with other parameters.
        ValueError: for an unknown scope or encoding, or a scope / encoding / folder the source cannot take.
        DatasetError: a per-image map that is constant, holds NaN/inf or is smaller than a crop box
            (names the file); a crop without a label for ``"semseg"``; a crop's sensor map with an invalid pixel (0, negative, NaN, inf: the
            adapter fills holes before cropping, so the crops folder is damaged or stale), or an
            estimator output with NaN/inf; names the crop file.
    """
    from repro.data.image_depth import crop_image_depth, encode_map, image_depth_store, load_image_depth
    from repro.depth import get_estimator
    from repro.depth.encoding import int_cast, uint8_to_unit
    
    from repro.data.crops import resize_center_crop_array
    from repro.depth.files import FILE_SOURCES, read_depth_file
    from repro.method.guidance import FEATURE_STRIDE, guidance_kind

    crops, out = Path(crops), Path(out)
    store = image_depth_store(encoding)
    if scope not in ("crop", "image"):
        raise ValueError(f"depth scope must be 'crop' or 'image', got {scope!r}")
    gkind = guidance_kind(source)
    if gkind != "depth" and scope != "crop":
        raise ValueError(f"depth source {source!r} works per crop only; set data.depth_scope=crop "
                         "(or fidelity_items: {R4: paper})")
    if gkind != "depth" and encoding != "float":
        raise ValueError(f"depth source {source!r} is not a depth map and has no {encoding!r} encoding; set "
                         "data.depth_encoding=float (or fidelity_items: {R4: paper, R5: paper})")
    if source in FILE_SOURCES and scope == "crop" and depth_files is None:
        raise ValueError(f"depth source {source!r} reads per-image maps: set data.depth_files to their folder "
                         "(README: 'Depth maps computed elsewhere')")
    params = {"crops": str(crops.resolve()), "source": source, "weights": None if weights is None else str(weights),
              "scope": scope, "encoding": encoding}
    if source in FILE_SOURCES and scope == "crop":
        params["depth_files"] = str(Path(depth_files).resolve())
    if scope == "crop" and weights_sha256(source, weights):  # the image scope's own params carry it
        params["weights_sha256"] = weights_sha256(source, weights)
    if scope == "image":
        if image_depth is None or not (Path(image_depth) / INDEX).is_file():
            raise FileNotFoundError(f"scope 'image' needs a finished per-image depth folder, got {image_depth}; "
                                    "build it with repro.data.image_depth.image_depth_stage")
        image_index = json.loads((Path(image_depth) / INDEX).read_text())
        recorded = image_index["params"]
        if recorded.get("source") != source or recorded.get("store") != store:
            raise OutputExistsError(f"{image_depth} holds {recorded.get('source')}/{recorded.get('store')} maps, "
                                  f"this stage needs {source}/{store}; use the matching folder")
        params.update(image_depth=str(Path(image_depth).resolve()), image_params=recorded, resize=resize)
    else:
        params["tta"] = bool(tta) and source not in ("sensor", "semseg", *FILE_SOURCES)
    if existing(out, params):
        return out
    partial = out.with_name(f".{out.name}.partial")  # kept across interruptions: finished maps are reused
    if (partial / "params.json").is_file() and json.loads((partial / "params.json").read_text()) != params:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    (partial / "params.json").write_text(json.dumps(params, sort_keys=True))
    ranges_path = partial / "ranges.jsonl"
    ranges = {}
    if ranges_path.is_file():
        for line in ranges_path.read_text().splitlines():
            rec = json.loads(line)
            if (partial / f"{rec['key']}.npy").is_file():
                ranges[rec["key"]] = rec["range"]
    estimator = None
    if source == "mde_features":
        from repro.depth.hf import DEFAULT_WEIGHTS, ZoeDepthFeatures
        from repro.models.backbone import default_weights_dir

        folder = Path(weights) if weights is not None else default_weights_dir() / DEFAULT_WEIGHTS["zoedepth"].name
        estimator = ZoeDepthFeatures(folder, device=device, tta=tta)
    elif scope == "crop" and source not in ("sensor", "semseg", *FILE_SOURCES):
        estimator = get_estimator(source, weights, device=device, tta=tta)
    if source in ("sensor", *FILE_SOURCES) or gkind != "depth":
        kind = {"features": "features", "classes": "classes"}.get(gkind, "sensor" if source == "sensor" else "metric")
    else:
        kind = estimator.kind if estimator is not None else image_index.get("kind")
    n_todo = len(json.loads((crops / INDEX).read_text())["keys"]) - len(ranges)
    bar = tqdm(total=n_todo, desc=f"depth ({source}, {scope})", unit="img", disable=not progress)
    cache: dict[str, np.ndarray] = {}
    with open(ranges_path, "a") as log:
        for batch in batched((c for c in iter_crops(crops) if c.key not in ranges), batch_size):
            if scope == "image":
                results = []
                for c in batch:
                    full = _image_map(cache, c, lambda key: load_image_depth(image_depth, key))
                    rng = image_index["ranges"][c.meta.get("image_key", c.key)]
                    results.append((crop_image_depth(full, c.meta, encoding=encoding, resize=resize), rng))
            elif gkind == "classes":  # the crop's ground-truth segmentation map (supp. B.1)
                results = []
                for c in batch:
                    if c.label is None:
                        raise DatasetError(f"{crops / (c.key + '.label.npy')} is missing: semseg guidance needs the "
                                           "crop's ground-truth labels; use a labelled split")
                    results.append((c.label.astype(np.int16), [float(c.label.min()), float(c.label.max())]))
            elif gkind == "features":  # ZoeDepth's penultimate-layer features (supp. B.1, R18)
                h, w = batch[0].image.shape[:2]
                with torch.inference_mode():
                    feats = estimator.features([c.image for c in batch], (h // FEATURE_STRIDE, w // FEATURE_STRIDE))
                results = []
                for c, f in zip(batch, feats.detach().cpu().numpy()):
                    f16 = f.astype(np.float16)
                    if not np.isfinite(f16).all():
                        raise DatasetError(f"MDE features of {crops / (c.key + '.img.png')} are not finite in float16")
                    results.append((f16, [float(f.min()), float(f.max())]))
            else:
                if source in FILE_SOURCES:  # per-image maps computed elsewhere (R22)
                    raws = []
                    for c in batch:
                        full = _image_map(cache, c, lambda key: read_depth_file(depth_files, key))
                        image_key = c.meta.get("image_key", c.key)
                        top, left, ch, cw = c.meta.get("crop_box", [0, 0, *full.shape])
                        if top + ch > full.shape[0] or left + cw > full.shape[1]:
                            raise DatasetError(f"{Path(depth_files) / (image_key + '.npy')}: map is "
                                               f"{full.shape[0]}x{full.shape[1]}, smaller than the crop box "
                                               f"{[top, left, ch, cw]}; compute the map at the image's own size")
                        cut = np.ascontiguousarray(full[top : top + ch, left : left + cw])
                        raws.append(resize_center_crop_array(cut, int(c.meta.get("resized_to", c.image.shape[0])),
                                                             resize).astype(np.float32))
                elif source == "sensor":
                    missing = [c.key for c in batch if c.depth is None]
                    if missing:
                        raise MissingFileError("sensor depth of crop", crops / f"{missing[0]}.sensor.npy",
                                               "use a dataset with sensor depth, or --source zoedepth/midas")
                    for c in batch:
                        bad = int((~(np.isfinite(c.depth) & (c.depth > 0))).sum())
                        if bad:
                            raise DatasetError(f"{crops / (c.key + '.sensor.npy')}: {bad} pixel(s) of sensor depth are "
                                               "0, negative or not finite; rebuild the crops folder with `repro prepare` "
                                               "(the dataset adapter fills sensor holes before cropping)")
                    raws = [c.depth for c in batch]  # metres
                else:
                    with torch.inference_mode():
                        raws = [r.detach().cpu().numpy() for r in estimator.to_depth(
                            estimator.predict([c.image for c in batch]))]
                results = []
                for c, raw in zip(batch, raws):
                    try:
                        stored = encode_map(raw, kind=kind, store=store)
                    except ValueError as exc:
                        raise DatasetError(f"depth source {source!r} on {crops / (c.key + '.img.png')}: {exc}") from exc
                    if encoding == "uint8":
                        stored = uint8_to_unit(stored)
                    elif encoding == "int_cast":
                        stored = int_cast(uint8_to_unit(stored))
                    results.append((stored, [float(raw.min()), float(raw.max())]))
            for crop, (norm, (lo, hi)) in zip(batch, results):
                np.save(partial / f"{crop.key}.npy", norm if gkind != "depth" else np.asarray(norm, dtype=np.float32))
                ranges[crop.key] = [float(lo), float(hi)]
                log.write(json.dumps({"key": crop.key, "range": ranges[crop.key]}) + "\n")
            log.flush()
            bar.update(len(batch))
    bar.close()
    ranges_path.unlink()
    (partial / "params.json").unlink()
    return finish(partial, out, {"params": params, "ranges": ranges, "encoding": encoding,
                                  "kind": kind if kind != "sensor" else "metric"})


def shards_stage(
    crops: str | Path, depth: str | Path | None, out: str | Path, *, shard_size: int = 1000, depth_source: str = ""
) -> Path:
    """Pack crops (and their depth maps) into WebDataset shards, in crop index order.

    The raw depth range, source and encoding go into each sample's JSON metadata. 8-bit depth
    (``encoding: uint8`` in the depth folder) is stored losslessly as the integers k, read back
    as ``k / 255`` (:mod:`repro.data.shards`). An existing shard folder made from the same inputs
    is reused; one made from other inputs is an error.

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
    if depth is not None:  # the depth folder's own params (scope, encoding, ...): another profile's never matches
        params["depth_params"] = json.loads((Path(depth) / INDEX).read_text()).get("params")
    if existing(out, params):
        verify_once(out)
        return out
    from repro.depth.encoding import unit_to_uint8

    from repro.method.guidance import check_stored

    depth_index = json.loads((Path(depth) / INDEX).read_text()) if depth is not None else {}
    ranges, encoding = depth_index.get("ranges", {}), depth_index.get("encoding", "float")
    gkind = depth_index.get("kind") if depth_index.get("kind") in ("features", "classes") else None

    def items():
        for crop in iter_crops(crops):
            depth01 = None
            if depth is not None:
                path = Path(depth) / f"{crop.key}.npy"
                if not path.is_file():
                    raise FileNotFoundError(f"depth map {path} is missing; rerun `repro depth`")
                depth01 = np.load(path)
                if gkind is not None:  # MDE features / class ids (repro.method.guidance)
                    check_stored(depth01, gkind, crop.image.shape[:2], path)
                elif depth01.shape != crop.image.shape[:2] or not np.isfinite(depth01).all() or (
                        depth01.size and (depth01.min() < 0 or depth01.max() > 1)):
                    raise DatasetError(f"{path}: depth map must be {crop.image.shape[:2]}, finite and in [0, 1]; got "
                                       f"{depth01.shape}, {int((~np.isfinite(depth01)).sum())} non-finite value(s), "
                                       f"range [{np.nanmin(depth01):.3g}, {np.nanmax(depth01):.3g}]; rerun `repro depth`")
                if encoding == "uint8":
                    depth01 = unit_to_uint8(depth01)
                crop.meta = {**crop.meta, "depth_range": ranges[crop.key], "depth_source": depth_source,
                             "depth_encoding": encoding}
            yield crop, depth01

    write_shards(items(), out, shard_size=shard_size, params=params)
    return out


def knn_stage(shards: str | Path, out: str | Path, *, arch: str, checkpoint: str | Path, k: int = 30,
              batch_size: int = 32, device: str | None = None, dropout: float = 0.0, seed: int = 0,
              identity: str | Path | None = None) -> Path:
    """Build the kNN table of a training shard folder (STEGO sec. 3.3).

    The table depends on the crops' RGB and the backbone only, so shard folders of the same crops with
    different depth give the same table: with ``identity`` (the crops folder) it is recorded instead of
    ``shards`` and the table is reused by every depth source of those crops.

    Args:
        identity: what the table is recorded as made from (default: the shard folder).
        dropout: R11: ``Dropout2d(dropout)`` active on the features before pooling, as the released
            ``precompute_knns.py`` ran (0: the paper's plain GAP).
        seed: seed of the dropout masks (recorded with ``dropout`` and ``batch_size`` in the table's
            params; same seed and batch size -> same table).

    Raises:
        ShardError: on unreadable shards; MissingFileError for a missing checkpoint.
    """
    from repro.data.knn import KnnTable, pooled_features, save_knn, search_knn
    from repro.models.backbone import DinoBackbone

    out = Path(out)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    params = {"shards": str(Path(shards).resolve()), "arch": arch, "checkpoint": str(checkpoint),
              "checkpoint_sha256": content_sha256(checkpoint), "k": k}
    if identity is not None:
        params = {"crops": str(Path(identity).resolve()), **{k_: v for k_, v in params.items() if k_ != "shards"}}
    if dropout:
        params.update(dropout=float(dropout), dropout_seed=int(seed), batch_size=int(batch_size))
    meta_path = out.with_suffix(out.suffix + ".json")
    if out.is_file() and meta_path.is_file():
        recorded = json.loads(meta_path.read_text()).get("params")
        if recorded == params:
            return out
        changed = content_mismatch(recorded, params)
        log.warning("%s was made with other %s; rebuilding it", out,
                    f"input bytes ({', '.join(changed)} changed: the weights at the same path were replaced)"
                    if changed else "parameters")
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

    feats = pooled_features(backbone, batches(), device, dropout=dropout, seed=seed)
    if len(keys) != feats.shape[0]:
        raise ShardError(f"read {len(keys)} keys but {feats.shape[0]} features from {shards}")
    indices, sims = search_knn(feats, k=min(k, len(keys)))
    save_knn(out, KnnTable(keys, indices, sims, {"params": params}))
    meta_path.write_text(json.dumps({"params": params}))
    return out
