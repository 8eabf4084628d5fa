"""Measurements behind ``bench_stages.py``: each function times one stage through repro's own functions.

Every measurement returns a stage record ``{"rate", "unit", "kind", "device", "cores", "items",
"seconds", "reps"}``: ``kind`` is ``gpu`` for stages that run on the accelerator when there is one
(backbone, depth networks, training step, evaluation head) and ``cpu`` for CPU-only stages
(prepare, shards, loader, DenseCRF, a faiss-cpu search), whose ``cores`` turn wall time into
core-hours in ``repro plan``. The synthetic COCO-like dataset is written in the real layout and
read through :class:`repro.data.datasets.cocostuff.CocoStuff27`; its pixels are smooth random fields, not
photographs, which costs the same to crop, resize and encode within a few per cent.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from repro.cluster.costs import train_signature

def device_kind(device: str) -> dict:
    return {"kind": "gpu", "device": device, "cores": 1 if device == "cuda" else torch.get_num_threads()}


def cpu_kind(cores: int = 1) -> dict:
    return {"kind": "cpu", "device": "cpu", "cores": cores}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, *, items: float, unit: str, where: dict, min_time: float, min_reps: int = 1, max_reps: int = 100,
          warmup: bool = True, device: str = "cpu") -> dict:
    """Call ``fn`` (after one untimed warm-up call) until ``min_reps`` and ``min_time`` seconds are reached."""
    if warmup:
        fn()
        sync(device)
    times: list[float] = []
    while len(times) < min_reps or (sum(times) < min_time and len(times) < max_reps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    total = sum(times)
    return {"rate": items * len(times) / total, "unit": unit, **where, "items": items * len(times),
            "seconds": round(total, 4), "reps": len(times)}


# ------------------------------------------------------------------------------------------ synthetic data
def _smooth(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    coarse = rng.integers(0, 256, (max(h // 48, 2), max(w // 48, 2), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
    return np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)


def write_synthetic_coco(root: Path, n_train: int, n_val: int, size: tuple[int, int], seed: int = 0) -> Path:
    """A COCO-Stuff-27 folder in the real layout with random content (images JPEG, label maps PNG).

    No fine->coarse file: the real adapter (:class:`repro.data.datasets.cocostuff.CocoStuff27`) maps the fine
    ids with the 182->27 table that ships with repro.
    """
    rng = np.random.default_rng(seed)
    w, h = size
    for folder, n in (("train2017", n_train), ("val2017", n_val)):
        ids = [f"{i + 1:012d}" for i in range(n)]
        for sub in (f"images/{folder}", f"annotations/stuffthingmaps_trainval2017/{folder}", f"curated/{folder}"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        for i in ids:
            Image.fromarray(_smooth(rng, w, h)).save(root / "images" / folder / f"{i}.jpg", quality=90)
            blocks = rng.integers(0, 182, (max(h // 60, 2), max(w // 60, 2)), dtype=np.uint8)
            blocks[rng.random(blocks.shape) < 0.1] = 255
            label = Image.fromarray(blocks).resize((w, h), Image.NEAREST)
            label.save(root / "annotations" / "stuffthingmaps_trainval2017" / folder / f"{i}.png")
        (root / "curated" / folder / "Coco164kFull_Stuff_Coarse_7.txt").write_text("\n".join(ids) + "\n")
    return root


# ------------------------------------------------------------------------------------------ data stages
def bench_prepare(root: Path, work: Path, *, split: str, five_crop: bool, size: int, min_time: float) -> tuple[dict, Path]:
    """``prepare_stage`` (decode, five-crop or single crop, resize, PNG/npy writes) in images/s."""
    from repro.data.datasets.cocostuff import CocoStuff27
    from repro.data.pipeline import prepare_stage

    ds = CocoStuff27(root, split)
    outs: list[Path] = []

    def run() -> None:
        outs.append(prepare_stage(ds, work / f"crops-{split}-{size}-{len(outs)}", five_crop=five_crop, size=size,
                                  progress=False))

    rec = timed(run, items=len(ds), unit="img/s", where=cpu_kind(1), min_time=min_time, warmup=False)
    return rec, outs[-1]


def bench_depth_stage(crops: Path, work: Path, source: str, weights: Path | None, device: str) -> tuple[dict, Path]:
    """``depth_stage`` over a crops folder (read, estimate, normalise, write) in crops/s."""
    from repro.data.pipeline import depth_stage

    n = len(json.loads((crops / "index.json").read_text())["keys"])
    out = work / f"depth-{source}"
    where = device_kind(device) if weights is not None else cpu_kind(1)
    tta = weights is not None  # the planes take no test-time augmentation (PlaneEstimator has no tta argument)
    rec = timed(lambda: depth_stage(crops, out, source=source, weights=weights, device=device, tta=tta,
                                    progress=False),
                items=n, unit="crop/s", where=where, min_time=0, warmup=False)
    return rec, out


def bench_depth_forward(source: str, weights: Path, image: np.ndarray, batch: int, device: str, min_time: float,
                        warmup: bool = True) -> dict:
    """``estimator.predict`` with the configs' test-time augmentation (``tta=True``: ZoeDepth flip + reflect
    padding, MiDaS flip; two forwards) on ``batch`` copies of ``image``, images/s."""
    from repro.depth import get_estimator

    est = get_estimator(source, weights, device=device, tta=True)
    images = [image] * batch
    with torch.inference_mode():
        rec = timed(lambda: est.predict(images), items=batch, unit="img/s", where=device_kind(device),
                    min_time=min_time, device=device, warmup=warmup)
    return {**rec, "tta": True}


def bench_image_depth(root: Path, crops: Path, work: Path, weights: Path, device: str) -> dict[str, dict]:
    """``data.depth_scope: image`` (R4): ``image_depth_stage`` (one map per full image, TTA) and the
    ``depth_stage`` that cuts every crop's map from it (CPU), as ``prepare_data`` runs them."""
    from repro.data.datasets.cocostuff import CocoStuff27
    from repro.data.image_depth import image_depth_stage
    from repro.data.pipeline import depth_stage

    ds = CocoStuff27(root, "train")
    folder = work / "depth-image-zoedepth"
    per_image = timed(lambda: image_depth_stage(ds, folder, source="zoedepth", weights=weights, tta=True,
                                                store="uint8", device=device, progress=False),
                      items=len(ds), unit="img/s", where=device_kind(device), min_time=0, warmup=False)
    n = len(json.loads((crops / "index.json").read_text())["keys"])
    cut = timed(lambda: depth_stage(crops, work / "depth-crops-from-image", source="zoedepth", scope="image",
                                    encoding="uint8", image_depth=folder, resize="nearest", progress=False),
                items=n, unit="crop/s", where=cpu_kind(1), min_time=0, warmup=False)
    return {"depth/zoedepth/tiny/image_stage": {**per_image, "tta": True}, "depth/crop_from_image/stage": cut}


def bench_shards(crops: Path, depth: Path, work: Path, min_time: float) -> tuple[dict, Path]:
    """``shards_stage`` (PNG re-encode, tar writes, sha256) in crops/s."""
    from repro.data.pipeline import shards_stage

    n = len(json.loads((crops / "index.json").read_text())["keys"])
    outs: list[Path] = []

    def run() -> None:
        outs.append(shards_stage(crops, depth, work / f"shards-{len(outs)}", depth_source="perspective_plane"))

    rec = timed(run, items=n, unit="crop/s", where=cpu_kind(1), min_time=min_time, warmup=False)
    return rec, outs[-1]


def bench_loader(shards: Path, min_time: float) -> dict:
    """``TrainingCrops[i]`` (anchor + kNN partner read at their byte offsets, decoded) in items/s."""
    from repro.data.knn import KnnTable
    from repro.data.shards import read_index
    from repro.data.train_crops import TrainingCrops

    keys = sorted(read_index(shards)["keys"])
    k = min(8, len(keys))
    idx = np.stack([np.roll(np.arange(len(keys)), -j) for j in range(k)], axis=1)
    data = TrainingCrops(shards, KnnTable(keys, idx, np.ones(idx.shape, np.float32), {}), seed=0,
                         num_neighbors=k - 1)
    return timed(lambda: [data[i] for i in range(len(data))], items=len(data), unit="item/s", where=cpu_kind(1),
                 min_time=min_time)


def bench_knn(ns: list[int], dims: tuple[int, ...], min_time: float) -> tuple[dict, dict]:
    """``search_knn`` (exact inner product, top-30) for each n and C; fit ``t = a n^b`` per C."""
    import faiss

    from repro.data.knn import search_knn

    gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    where = {"kind": "gpu", "device": "cuda", "cores": 1} if gpu else cpu_kind(faiss.omp_get_max_threads())
    stages, fits = {}, {}
    rng = np.random.default_rng(0)
    for c in dims:
        times = []
        for n in ns:
            feats = rng.standard_normal((n, c)).astype(np.float32)
            feats /= np.linalg.norm(feats, axis=1, keepdims=True)
            rec = timed(lambda f=feats: search_knn(f, k=30), items=n, unit="query/s", where=where,
                        min_time=min_time, warmup=n == ns[0])
            stages[f"knn/C{c}/n{n}"] = rec
            times.append(rec["seconds"] / rec["reps"])
        b, log_a = np.polyfit(np.log(ns), np.log(times), 1)
        fits[str(c)] = {"a": float(np.exp(log_a)), "b": float(b), "n": list(ns), "seconds": times, **where,
                        "projected_s_248145": float(np.exp(log_a) * 248145 ** b)}
    return stages, fits


# ------------------------------------------------------------------------------------------ networks
def bench_backbone(backbone, size: int, batch: int, device: str, precision: str, min_time: float) -> dict:
    """``DinoBackbone`` forward at ``size`` px in images/s (bf16: autocast, as the trainer's autocast would)."""
    x = torch.randn(batch, 3, size, size, device=device)
    ctx = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if precision == "bf16" else None

    def run() -> None:
        if ctx is None:
            backbone(x)
        else:
            with ctx():
                backbone(x)

    return timed(run, items=batch, unit="img/s", where=device_kind(device), min_time=min_time, device=device)


class TrainStep:
    """One training step built the way :func:`repro.training.loop.train` builds it (parts, optimisers, module, cache)."""

    def __init__(self, cfg, backbone, batch: int, size: int, device: str, cached: bool, seed: int = 0) -> None:
        from repro.data.datasets.registry import DATASETS
        from repro.models.backbone import last_block_attention
        from repro.models.bundle import build_parts
        from repro.training.loop import TrainModule, TrainState, FeatureCache, _normalise, _optimizers

        self.cfg, self.device = cfg, device
        # train() autocasts with Accelerate's bf16 on CUDA, which is torch.autocast(cuda, bfloat16) and a plain
        # backward(); used directly here because Accelerate's process state admits one precision per process
        self.bf16 = device == "cuda" and cfg.train.precision == "bf16"
        torch.manual_seed(seed)
        k = DATASETS[cfg.data.dataset].num_classes
        self.parts = build_parts(cfg, backbone.feature_dim, k).to(device)
        self.optimizers = _optimizers(cfg, self.parts)
        self.state = TrainState(seed)
        self.module = TrainModule(cfg, self.parts, self.state).train()
        self.attention = cfg.lhp.enabled and cfg.lhp.propagation == "attention"
        def compute(ids: torch.Tensor, images: torch.Tensor):  # as train(): the loader's uint8 images
            x = _normalise(images.to(device))
            return last_block_attention(backbone, x) if self.attention else backbone(x)

        self.features = FeatureCache(torch.no_grad()(compute), 64.0 if cached else 0.0)
        g = torch.Generator().manual_seed(seed)
        depth = torch.rand(batch, size, size, generator=g)
        self.batch = {"index": torch.arange(batch), "partner_index": torch.arange(batch, 2 * batch),
                      "image": torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8),
                      "partner_image": torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8),
                      "label": torch.randint(0, k, (batch, size, size), generator=g),
                      "depth": depth, "partner_depth": depth.flip(0)}

    def __call__(self) -> float:
        b, dev = self.batch, self.device
        out_a = self.features(b["index"], b["image"])
        out_k = self.features(b["partner_index"], b["partner_image"])
        with torch.autocast("cuda" if dev == "cuda" else "cpu", dtype=torch.bfloat16, enabled=self.bf16):
            logs = self.module(out_a[0].float(), out_k[0].float(), b, self.state.step, False,
                               out_a[-1] if self.attention else None, out_k[-1] if self.attention else None)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        logs.pop("_objective").backward()
        for opt in self.optimizers:
            opt.step()
        self.state.step += 1
        return float(logs["loss/total"])


def bench_train(cfg, backbone, batch: int, size: int, device: str, cached: bool, min_time: float) -> dict:
    """Steps/s of :class:`TrainStep`; ``cached`` = every feature a cache hit (the warm-up fills the cache)."""
    step = TrainStep(cfg, backbone, batch, size, device, cached)
    rec = timed(step, items=1, unit="step/s", where=device_kind(device), min_time=min_time, device=device)
    return {**rec, "batch": batch, "signature": train_signature(cfg)}


def bench_feature_store(crops: Path, folder: Path, backbone, arch: str, batch: int, device: str,
                        min_time: float) -> dict[str, dict]:
    """``feature_store_stage`` (backbone over every crop, fp16 memory-mapped writes) and ``FeatureStore.get``
    of a batch of crops (what a training step reads with ``train.feature_store``), crops/s."""
    from repro.data.features import FeatureStore, feature_store_stage

    n = len(json.loads((crops / "index.json").read_text())["keys"])
    write = timed(lambda: feature_store_stage(crops, folder, backbone, params={"arch": arch}, batch_size=batch,
                                              device=device, progress=False),
                  items=n, unit="crop/s", where=device_kind(device), min_time=0, warmup=False)
    store = FeatureStore(folder)
    keys = list(store.row)[:batch]
    read = timed(lambda: store.get(keys), items=len(keys), unit="crop/s", where=cpu_kind(1), min_time=min_time)
    return {f"store/{arch}/write": write, f"store/{arch}/read": read}


def eval_parts(cfg, backbone, device: str):
    from repro.data.datasets.registry import DATASETS
    from repro.models.bundle import build_parts

    parts = build_parts(cfg, backbone.feature_dim, DATASETS[cfg.data.dataset].num_classes).to(device)
    for m in parts.modules().values():
        m.eval()
    return parts


def bench_eval_parts(parts, feats: torch.Tensor, size: int, device: str, min_time: float) -> dict[str, dict]:
    """Head, then upsampling to the label size plus both probes (as the evaluation runs them), images/s."""
    import torch.nn.functional as F

    from repro.evaluate.protocol import probe_log_probs

    n = feats.shape[0]
    with torch.no_grad():
        code = parts.head(feats)[1]

        def up() -> None:
            full = F.interpolate(code, size=(size, size), mode="bilinear", align_corners=False)
            probe_log_probs(parts.cluster_probe, parts.linear_probe, full)

        where = device_kind(device)
        return {"head": timed(lambda: parts.head(feats), items=n, unit="img/s", where=where, min_time=min_time,
                              device=device),
                "upsample_probes": timed(up, items=n, unit="img/s", where=where, min_time=min_time, device=device)}


def bench_crf(images: np.ndarray, logits: torch.Tensor, processes: int, min_time: float) -> dict[str, dict]:
    """``dense_crf`` per probe-image (serial, in-process) and ``dense_crf_batch`` with a pool (wall)."""
    from repro.evaluate.crf import dense_crf, dense_crf_batch

    n = len(images)
    out = {"serial": timed(lambda: [dense_crf(images[i], logits[i]) for i in range(n)], items=n,
                           unit="probe-img/s", where=cpu_kind(1), min_time=min_time, warmup=False)}
    out["pool"] = timed(lambda: dense_crf_batch(images, logits, processes=processes), items=n, unit="probe-img/s",
                        where=cpu_kind(processes), min_time=0, warmup=False)
    out["pool"]["processes"] = processes
    return out


# ------------------------------------------------------------------------------------------ peak memory
def memory_probe(what: str, entry: str, checkpoint: str, batch: int, size: int, val_crops: str, device: str,
                 threads: int, queue) -> None:
    """In a fresh (spawned) process: two training steps without cache, or the evaluation of two checkpoints
    (final and best-on-val, one pass) with flip and CRF over the validation crops; report peak RSS (``VmHWM``) and CUDA ``max_memory_allocated`` in MiB through ``queue``."""
    from repro.config.entries import load_entry
    from repro.models.backbone import DinoBackbone

    torch.set_num_threads(threads)
    cfg = load_entry(entry, ["fidelity=paper", f"model.checkpoint={checkpoint}"])
    backbone = DinoBackbone(cfg.model.arch, checkpoint).to(device)
    if what == "train":
        step = TrainStep(cfg, backbone, batch, size, device, cached=False)
        step()
        step()
    else:
        from repro.evaluate.report import ValidationSet, evaluate_many

        val = ValidationSet(val_crops, budget_gb=0.0)
        models = {"final": eval_parts(cfg, backbone, device), "best_on_val": eval_parts(cfg, backbone, device)}
        evaluate_many(models, backbone, val, crf=True, flip=True, crf_processes=-1, batch_size=batch, device=device)
    cuda = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    queue.put({"rss_peak_mib": peak_rss_mib(), "cuda_peak_mib": cuda, "batch": batch, "entry": entry})


def peak_rss_mib() -> float:
    """This process's resident-set high-water mark (``VmHWM``; unlike ``ru_maxrss`` it is not inherited from the
    parent that started the process), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
