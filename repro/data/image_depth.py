"""Depth of the FULL image, estimated once per dataset split and cut into every crop (docs/fidelity.md, R4).

The released DepthG code ran ZoeD_N on each full image (``generate_depth.py``), min-max normalised
the map per image, stored it as an 8-bit PNG, five-cropped it with the image
(``src/crop_datasets.py``) and resized each crop with ``T.Resize(224, NEAREST)`` (``src/utils.py
get_transform``). ``data.depth_scope: image`` does the same in two steps:

1. :func:`image_depth_stage`: one map per full image of a dataset split, min-max normalised per
   image, in a folder shared by every entry that uses it (``<image key>.png`` uint8 for the
   ``uint8`` / ``int_cast`` encodings, ``<image key>.npy`` float32 [0, 1] for ``float``).
2. :func:`crop_image_depth` (called by :func:`repro.data.pipeline.depth_stage`): each crop's map
   is cut from its image's map with the crop's box (``meta["crop_box"]``) and resized like the
   crop (:func:`repro.data.crops.resize_center_crop_array`). It is NOT re-normalised per crop
   (per-crop normalisation is eq. 4, ``depth_scope: crop``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from tqdm import tqdm

from repro.data.crops import RESIZE_MODES, resize_center_crop_array
from repro.data.datasets.base import Sample
from repro.data.stages import existing, finish
from repro.depth import weights_sha256
from repro.depth.encoding import int_cast, quantize_estimate, quantize_sensor, uint8_to_unit

__all__ = ["image_depth_stage", "image_depth_store", "load_image_depth", "crop_image_depth", "encode_map"]


def image_depth_store(encoding: str) -> str:
    """What the per-image folder holds for a ``data.depth_encoding``: ``"uint8"`` or ``"float"``.

    ``int_cast`` (R5) reads the same 8-bit maps as ``uint8`` (released ``src/data.py Potsdam``).

    Raises:
        ValueError: for an unknown encoding.
    """
    if encoding not in ("float", "uint8", "int_cast"):
        raise ValueError(f"depth encoding must be float, uint8 or int_cast, got {encoding!r}")
    return "float" if encoding == "float" else "uint8"


def encode_map(depth: np.ndarray, *, kind: str, store: str) -> np.ndarray:
    """Normalise one raw map (``to_depth`` output, larger = farther) per map and store it.

    Args:
        depth: ``(H, W)`` raw depth (metres for ``kind="metric"``).
        kind: the estimator's kind (:data:`repro.depth.KINDS`) or ``"sensor"``.
        store: ``"float"``: min-max to float32 [0, 1] (:func:`repro.depth.normalize_depth`;
            ``normalized`` maps are kept as they are); ``"uint8"``: the released 8-bit rule of
            the source (:func:`repro.depth.encoding.quantize_sensor` for sensor depth,
            :func:`~repro.depth.encoding.quantize_estimate` for estimates; ``normalized`` maps
            become ``trunc(x * 255)``).

    Returns:
        ``(H, W)`` float32 [0, 1] or uint8.
    """
    from repro.depth import normalize_depth

    if store == "float":
        return np.asarray(depth, np.float32) if kind == "normalized" else normalize_depth(depth)[0]
    if kind == "sensor":
        return quantize_sensor(depth)
    if kind == "normalized":
        return (np.clip(np.asarray(depth, np.float32), 0, 1) * 255).astype(np.uint8)
    return quantize_estimate(depth)


def _same_size_batches(samples: Iterator[Sample], size: int) -> Iterator[list[Sample]]:
    """Consecutive samples whose images share a shape, at most ``size`` per batch; each sample read once."""
    batch: list[Sample] = []
    for sample in samples:
        if batch and (len(batch) == size or sample.image.shape != batch[0].image.shape):
            yield batch
            batch = []
        batch.append(sample)
    if batch:
        yield batch


def image_depth_stage(dataset, out: str | Path, *, source: str, weights: str | Path | None = None, tta: bool = True,
                      store: str = "uint8", batch_size: int = 8, device: str | None = None,
                      progress: bool = True, depth_files: str | Path | None = None) -> Path:
    """One min-max normalised depth map per FULL image of a dataset split (released ``generate_depth.py``).

    Args:
        dataset: a dataset adapter (:mod:`repro.data.datasets.registry`); for ``source="sensor"`` its
            samples must carry sensor depth (metres).
        out: folder to create: ``<image key>.png`` (uint8) or ``<image key>.npy`` (float32), and
            ``index.json`` with the params and each image's raw range ``[d_min, d_max]``.
        source: ``"sensor"``, an estimator name (:data:`repro.depth.ESTIMATORS`), or ``"files"`` /
            ``"kbr"``: the image's map read from ``depth_files`` (:mod:`repro.depth.files`, checked there).
        weights: local weights folder of a network estimator.
        tta: the estimator's test-time augmentation (ZoeDepth ``infer``: flip + reflect padding).
        store: ``"uint8"`` (for the ``uint8`` and ``int_cast`` encodings) or ``"float"``.
        batch_size: images of equal size per estimator call.
        device: torch device; default CUDA when available.
        progress: progress bar (images/s).
        depth_files: folder of per-image maps (``files`` / ``kbr``).

    Returns:
        ``out``. A finished folder with the same params is reused; finished maps in the partial
        folder of an interrupted run are kept.

    Raises:
        FileExistsError: if ``out`` was made with other params (e.g. another profile's encoding).
        repro.utils.errors.MissingFileError: missing sensor depth or estimator weights.
    """
    from repro.depth import get_estimator
    from repro.depth.files import FILE_SOURCES, read_depth_file
    from repro.utils.errors import MissingFileError

    if store not in ("uint8", "float"):
        raise ValueError(f"store must be uint8 or float, got {store!r}")
    out = Path(out)
    params = {"dataset": dataset.name, "split": dataset.split, "n_images": len(dataset), "source": source,
              "weights": None if weights is None else str(weights), "tta": bool(tta) and source != "sensor",
              "store": store, "scope": "image"}
    files = source in FILE_SOURCES
    if files:
        if depth_files is None:
            raise ValueError(f"depth source {source!r} reads per-image maps: set data.depth_files to their folder")
        params.update(tta=False, depth_files=str(Path(depth_files).resolve()))
    if weights_sha256(source, weights):  # other weights bytes at the same path: other maps
        params["weights_sha256"] = weights_sha256(source, weights)
    if existing(out, params):
        return out
    partial = out.with_name(f".{out.name}.partial")  # finished maps of an interrupted run are kept
    if (partial / "params.json").is_file() and json.loads((partial / "params.json").read_text()) != params:
        shutil.rmtree(partial)  # an interrupted run of other params: start again
    partial.mkdir(parents=True, exist_ok=True)
    (partial / "params.json").write_text(json.dumps(params, sort_keys=True))
    ext = ".png" if store == "uint8" else ".npy"
    ranges_path = partial / "ranges.jsonl"
    ranges: dict[str, list[float]] = {}
    if ranges_path.is_file():
        for line in ranges_path.read_text().splitlines():
            rec = json.loads(line)
            if (partial / f"{rec['key']}{ext}").is_file():
                ranges[rec["key"]] = rec["range"]
    estimator = None if source == "sensor" or files else get_estimator(source, weights, device=device, tta=tta)
    kind = "metric" if files else "sensor" if estimator is None else estimator.kind
    todo = [i for i, key in enumerate(dataset.keys()) if key not in ranges]
    bar = tqdm(total=len(todo), desc=f"depth per image ({source})", unit="img", disable=not progress)
    with open(ranges_path, "a") as log:
        for batch in _same_size_batches((dataset[i] for i in todo), batch_size if estimator is not None else 1):
            first_sample = batch[0]
            if files:
                raws = [read_depth_file(depth_files, s.key, tuple(s.image.shape[:2])) for s in batch]
            elif estimator is None:
                if first_sample.depth is None:
                    raise MissingFileError("sensor depth of image", first_sample.meta.get("depth", first_sample.key),
                                           "use a dataset with sensor depth, or data.depth_source=zoedepth")
                raws = [np.asarray(first_sample.depth, np.float32)]  # metres, min-max over the frame as released
            else:
                with torch.inference_mode():
                    raw = estimator.to_depth(estimator.predict([s.image for s in batch]))
                raws = [r.detach().cpu().numpy().astype(np.float32) for r in raw]
            for sample, raw_map in zip(batch, raws):
                stored = encode_map(raw_map, kind=kind, store=store)
                if store == "uint8":
                    Image.fromarray(stored).save(partial / f"{sample.key}.png", compress_level=1)
                else:
                    np.save(partial / f"{sample.key}.npy", stored)
                ranges[sample.key] = [float(raw_map.min()), float(raw_map.max())]
                log.write(json.dumps({"key": sample.key, "range": ranges[sample.key]}) + "\n")
            log.flush()
            bar.update(len(batch))
    bar.close()
    ranges_path.unlink()
    (partial / "params.json").unlink()
    return finish(partial, out, {"params": params, "ranges": ranges, "kind": kind})


def load_image_depth(folder: str | Path, image_key: str) -> np.ndarray:
    """The stored map of one image: ``(H, W)`` uint8 or float32.

    Raises:
        FileNotFoundError: naming the missing map and the stage that writes it.
    """
    folder = Path(folder)
    for ext in (".png", ".npy"):
        path = folder / f"{image_key}{ext}"
        if path.is_file():
            if ext == ".npy":
                return np.load(path)
            with Image.open(path) as im:
                return np.asarray(im)
    raise FileNotFoundError(f"no depth map of image {image_key!r} in {folder}; rerun the per-image depth stage "
                            "(`repro depth --scope image ...` or `repro run`)")


def crop_image_depth(image_map: np.ndarray, meta: dict, *, encoding: str, resize: str) -> np.ndarray:
    """One crop's depth, cut from its image's map and resized like the crop (not re-normalised).

    Args:
        image_map: ``(H, W)`` map of the full image: uint8 (``uint8`` / ``int_cast``) or float32 [0, 1].
        meta: the crop's metadata: ``crop_box`` ``[top, left, h, w]`` (absent: the whole image) and
            ``resized_to`` (the crop's side).
        encoding: ``"float"``, ``"uint8"`` or ``"int_cast"``.
        resize: the crops' ``data.resize`` (``"nearest"`` in the released profile).

    Returns:
        ``(S, S)`` float32 in [0, 1]: ``float``: the cut map resized (PIL ``F``); ``uint8``: ``k / 255``
        of the cut 8-bit map resized as PIL ``L`` (``T.Resize(224, NEAREST)`` on the stored PNG, as
        ``src/data.py CroppedDataset`` read it); ``int_cast``: ``to_tensor`` of the 8-bit map,
        resized as a TENSOR, centre-cropped and cast to int (released ``src/data.py Potsdam``).

    Raises:
        ValueError: for an unknown encoding or resize mode, or a dtype that does not fit the encoding.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {sorted(RESIZE_MODES)}, got {resize!r}")
    h, w = image_map.shape
    top, left, ch, cw = meta.get("crop_box", [0, 0, h, w])
    size = int(meta["resized_to"])
    cut = np.ascontiguousarray(image_map[top : top + ch, left : left + cw])
    if encoding == "float":
        if cut.dtype != np.float32:
            raise ValueError(f"float depth expects a float32 image map, got {cut.dtype}")
        return np.clip(resize_center_crop_array(cut, size, resize), 0.0, 1.0).astype(np.float32)
    if cut.dtype != np.uint8:
        raise ValueError(f"{encoding} depth expects an 8-bit image map, got {cut.dtype}")
    if encoding == "uint8":
        return uint8_to_unit(resize_center_crop_array(cut, size, resize))
    if encoding == "int_cast":
        t = TF.to_tensor(Image.fromarray(cut))
        t = TF.center_crop(TF.resize(t, [size], interpolation=RESIZE_MODES[resize]), [size, size])
        return int_cast(t[0])
    raise ValueError(f"depth encoding must be float, uint8 or int_cast, got {encoding!r}")
