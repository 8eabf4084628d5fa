"""The cost model behind ``repro plan``: work per stage from a resolved config, seconds from a profile.

It follows the code as it runs (``repro.runs.workdir.prepare_data``, ``repro.training.loop.train``,
``repro.runs.entry.evaluate_run``). Per run (one entry, one fidelity, one seed), with ``B`` =
``train.batch_size``, ``T`` = :func:`repro.method.schedules.training_batches` (``max_steps``,
``step_unit``), ``n`` training crops (images x 5 when five-cropped), ``n_val`` validation images and
``C`` the backbone width:

* ``train-step``: ``T`` steps of the measured training step on cached features (the profile entry
  whose method, backbone, fidelity, LHP and sampling match best), scaled by ``B / batch measured``.
* ``train-backbone``: the backbone at 224 px for every miss of the in-memory feature cache
  (``train.feature_cache_gb``, fp32 ``28 x 28 x C`` per crop, plus the ``784 x 784`` attention for
  attention LHP). Each step looks up ``2B`` crops (anchors and kNN partners); the cache keeps the
  first ``c = budget / bytes`` crops it computes; with ``L = 2BT`` lookups spread uniformly,
  :func:`cache_misses` gives the expected misses. With ``train.feature_store`` (not for attention
  LHP) the misses are ``train-store-read``: reads of the shared fp16 store.
* ``train-loader``: ``B T`` anchor+partner reads from the shards (CPU).
* ``validation``: ``T // val_every`` passes over the validation set without CRF (head, upsampling,
  probes, metrics) plus the backbone at 320 px for the images beyond the validation-feature cache
  (same budget, ``40 x 40 x C`` fp32 per image); ``val-features``: filling that cache once.
* ``eval-*``: ``model.pt`` and (when ``val_every > 0``) ``best.pt`` scored in one pass over the
  ``n_val`` images: the backbone at 320 px once per uncached image and once more per image with flip
  averaging; per checkpoint the head (twice with flip), upsampling with both probes, and DenseCRF for
  both probes when ``eval.crf`` (core-seconds: the pool shortens the wall time, not the work).

Shared data stages, one per :func:`repro.runs.workdir.data_paths` folder: ``prepare`` (train and val
crops; cost scaled by source-image pixels relative to the measured 640 x 480), ``depth`` (the
estimator on every crop for ``data.depth_scope: crop``; for ``image`` once per full image into the
per-image folder shared by every entry that uses it, then a cheap cut per crop; ``data.depth_tta``
doubles the forwards; train and val), ``shards``, ``knn`` (backbone at 224 px over every crop, then
the exact search ``a n^b`` fitted by the benchmark), and ``feature-store`` (the backbone over every
crop, once per crops folder and backbone) when configured.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from repro.utils.errors import UserError

__all__ = ["PROFILE_SCHEMA", "PlanError", "Profile", "Costs", "DataStage", "cache_misses", "dataset_sizes",
           "train_signature", "run_costs", "data_stages", "match_train_step", "feature_dim", "WORK", "backbone_key",
           "peak_memory"]

PROFILE_SCHEMA = "repro-stage-profile/1"
NET_DEPTH = {"zoedepth": "zoedepth", "midas": "midas", "mde_features": "zoedepth"}
"""Depth sources that run a network: the network whose measured depth stage prices them."""
READ_DEPTH = ("kbr", "files", "semseg")
"""Depth sources read from stored maps (per-image files, the crop's labels): priced as a per-crop cut."""
CHEAP_DEPTH = {"sensor": "perspective_plane", "image_plane": "image_plane", "perspective_plane": "perspective_plane"}
SOURCE_PIXELS = {"cocostuff27": 640 * 480, "cityscapes27": 2048 * 1024, "potsdam3": 200 * 200, "nyuv2": 640 * 480}
"""Nominal source-image pixels per dataset (COCO images vary around 640 x 480); prepare cost scales with them."""
MEASURED_PIXELS = 640 * 480
RELAX_ORDER = ("sampling", "lhp", "fidelity", "arch", "method")
WORK = Path("WORK")


class PlanError(UserError, ValueError):
    """A profile or target the plan cannot use; the message names the file or key and the fix."""


@dataclass
class Profile:
    """A stage profile (``benchmarks/bench_stages.py --out``): ``data["stages"][key] = {"rate", "kind", ...}``."""

    path: Path
    data: dict
    is_default: bool = False

    @property
    def device(self) -> str:
        """``"cuda"`` or ``"cpu"``: where the GPU stages were measured."""
        return str(self.data.get("device", "cpu"))

    def has(self, key: str) -> bool:
        return key in self.data["stages"]

    def stage(self, key: str) -> dict:
        """The record of one stage.

        Raises:
            PlanError: the profile lacks it (rerun the benchmark without ``--quick``/``--archs`` limits).
        """
        try:
            return self.data["stages"][key]
        except KeyError:
            raise PlanError(f"stage profile {self.path} has no stage {key!r}; rerun benchmarks/bench_stages.py "
                            "without limits (all archs, no --tiny) to measure it") from None


class Costs:
    """Seconds per stage name: wall seconds on the device (GPU stages) and CPU core-seconds."""

    def __init__(self) -> None:
        self.gpu: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    def add_seconds(self, stage: str, kind: str, seconds: float, cores: int = 1) -> None:
        if kind == "gpu":
            self.gpu[stage] += seconds
        else:
            self.cpu[stage] += seconds * cores

    def add(self, stage: str, profile: Profile, key: str, items: float, scale: float = 1.0) -> None:
        """``items / rate(key) * scale`` seconds, booked by the stage's kind (``gpu`` or ``cpu``)."""
        if items <= 0:
            return
        rec = profile.stage(key)
        rate = float(rec.get("rate") or 0.0)
        if not rate > 0 or not math.isfinite(rate):
            raise PlanError(f"stage profile {profile.path}: stage {key!r} has no positive rate ({rec.get('rate')!r})")
        self.add_seconds(stage, rec.get("kind", "gpu"), items / rate * scale, int(rec.get("cores", 1)))


def hours_by_stage(seconds: dict[str, float], factor: float = 1.0) -> dict[str, float]:
    return {k: v * factor / 3600.0 for k, v in seconds.items() if v > 0}


class StageHours:
    """Totals of ``gpu_by_stage`` / ``cpu_by_stage`` (hours per stage name), for a data stage or a run."""

    gpu_by_stage: dict[str, float]
    cpu_by_stage: dict[str, float]

    @property
    def gpu_h(self) -> float:
        return sum(self.gpu_by_stage.values())

    @property
    def cpu_h(self) -> float:
        return sum(self.cpu_by_stage.values())


@dataclass
class DataStage(StageHours):
    """One shared data folder: which stage made it and its cost (hours)."""

    stage: str
    label: str
    gpu_by_stage: dict[str, float]
    cpu_by_stage: dict[str, float]


def cache_misses(lookups: float, n: int, capacity: int) -> float:
    """Expected misses of the trainer's feature cache under ``lookups`` uniform lookups of ``n`` items.

    The cache (:class:`repro.training.state.FeatureCache`) keeps every item it computes until it holds
    ``c = capacity`` items. With ``q = 1 - 1/n``, ``D(t) = n (1 - q^t)`` distinct items have been seen
    after ``t`` lookups and the cache is full at ``t* = ln(1 - c/n) / ln q``; a lookup hits with
    probability (items cached) / ``n``, so the hits are ``t* - c`` before ``t*`` and ``(L - t*) c / n``
    after it. When the cache never fills (``c >= n`` or ``L <= t*``) the misses are ``D(L)``.
    """
    if lookups <= 0 or n <= 0:
        return 0.0
    c = min(max(capacity, 0), n)
    q = 1.0 - 1.0 / n
    distinct = n * (1.0 - q**lookups)
    if c == 0:
        return float(lookups)
    if c >= n:
        return distinct
    t_full = math.log(1.0 - c / n) / math.log(q)
    if lookups <= t_full:
        return distinct
    return lookups - (t_full - c) - (lookups - t_full) * c / n


def _capacity(budget_gb: float, nbytes: int) -> int:
    return int(budget_gb * 2**30) // nbytes


def _split_count(dataset: str, split: str) -> int:
    from repro.data.datasets.manifest import load_manifest

    manifest = load_manifest(dataset)
    for name, spec in manifest.get("splits", {}).items():
        if (name == split or spec.get("alias") == split) and spec.get("count"):
            return int(spec["count"])
    raise PlanError(f"data_manifests/{dataset}.yaml has no image count for split {split!r}; add it under 'splits'")


def dataset_sizes(config) -> tuple[int, int, str]:
    """``(train images, val images, source)``: a local copy at ``data.root`` if present, else the manifest."""
    from repro.data import get_dataset

    d = config.data
    root = Path(os.path.expandvars(d.root)) if d.root else None
    if root is not None and "$" not in str(root) and root.is_dir():
        try:
            return len(get_dataset(d.dataset, root, d.train_split)), len(get_dataset(d.dataset, root, d.val_split)), \
                f"local copy {root}"
        except Exception:  # noqa: BLE001 - an unreadable copy falls back to the manifest, said in the source
            pass
    return _split_count(d.dataset, d.train_split), _split_count(d.dataset, d.val_split), "data_manifests"


def train_signature(config) -> dict[str, str]:
    """What makes training steps differ in cost: method, backbone, fidelity, LHP propagation, sampling mode."""
    lhp = config.lhp.propagation if config.lhp.enabled and config.method != "dino" else "none"
    return {"method": config.method, "arch": config.model.arch, "fidelity": config.fidelity, "lhp": lhp,
            "sampling": config.sampling.mode if config.method != "dino" else "none"}


def match_train_step(profile: Profile, config) -> tuple[str, list[str]]:
    """The measured cached training step closest to ``config``: ``(stage key, fields that differ)``.

    Fields are relaxed in the order sampling, LHP, fidelity, backbone, method (least to most cost).

    Raises:
        PlanError: the profile holds no cached training step.
    """
    want = train_signature(config)
    measured = {k: v.get("signature", {}) for k, v in profile.data["stages"].items()
                if k.startswith("train/") and k.endswith("/cached")}
    if not measured:
        raise PlanError(f"stage profile {profile.path} has no cached training step (train/.../cached)")
    for n in range(len(RELAX_ORDER) + 1):
        fixed = [f for f in want if f not in RELAX_ORDER[:n]]
        hits = sorted(k for k, sig in measured.items() if all(sig.get(f) == want[f] for f in fixed))
        if hits:
            return hits[0], [f for f in RELAX_ORDER[:n] if measured[hits[0]].get(f) != want[f]]
    raise AssertionError("unreachable: every field relaxed")


def feature_dim(arch: str) -> int:
    from repro.models.backbone import get_arch

    return get_arch(arch).feature_dim


def _uses_store(config) -> bool:
    """``train.feature_store``, unless attention LHP (it needs the backbone's attention; the trainer skips the store)."""
    return bool(getattr(config.train, "feature_store", False)) and not (
        config.lhp.enabled and config.lhp.propagation == "attention")


def backbone_key(profile: Profile, arch: str, size: int, precision: str, notes: list[str] | None = None) -> str:
    """``backbone/<arch>/<size>/<precision>`` (fp32 for a CPU-measured profile: autocast is CUDA-only); a profile
    without the bf16 rate prices bf16 at fp32, said in ``notes``."""
    if profile.device != "cuda":  # the trainer autocasts on CUDA only: on a CPU every pass is fp32
        precision = "fp32"
    key = f"backbone/{arch}/{size}/{precision}"
    if profile.has(key) or precision == "fp32":
        return key
    if notes is not None:
        notes.append(f"stage profile {profile.path.name} has no {key}: bf16 backbone passes priced at the fp32 rate")
    return f"backbone/{arch}/{size}/fp32"


def _precision(config, training: bool) -> str:
    """Precision of the frozen backbone's passes: ``model.backbone_precision`` when set, else ``train.precision``
    in training (the trainer's autocast) and fp32 elsewhere (validation, evaluation, store, kNN)."""
    forced = getattr(config.model, "backbone_precision", "default")
    if forced != "default":
        return forced
    return config.train.precision if training else "fp32"


def run_costs(config, profile: Profile, n_train: int, n_val: int, notes: list[str] | None = None
              ) -> tuple[Costs, str, list[str]]:
    """Seconds of one run (one seed) per stage; ``(costs, training-step key, differing fields)``."""
    from repro.method.schedules import training_batches

    d, t, e, arch = config.data, config.train, config.eval, config.model.arch
    c = feature_dim(arch)
    crops = n_train * (5 if d.five_crop else 1)
    batches = training_batches(t.max_steps, t.step_unit)
    costs = Costs()
    key, relaxed = match_train_step(profile, config)
    rec = profile.stage(key)
    costs.add("train-step", profile, key, batches, scale=t.batch_size / float(rec["batch"]))  # rate checked there
    lookups = 2 * t.batch_size * batches
    attention = config.lhp.enabled and config.lhp.propagation == "attention"
    per_crop = 28 * 28 * c * 4 + (784 * 784 * 4 if attention else 0)
    misses = cache_misses(lookups, crops, _capacity(t.feature_cache_gb, per_crop))
    if _uses_store(config):  # misses are read from the store instead of computed
        costs.add("train-store-read", profile, _store_key(profile, arch, "read"), misses)
    else:  # the training backbone runs under the trainer's autocast (train.precision, docs/fidelity.md R16)
        costs.add("train-backbone", profile, backbone_key(profile, arch, 224, _precision(config, True), notes), misses)
    costs.add("train-loader", profile, "loader/train224", t.batch_size * batches)
    kind = "dino" if config.method == "dino" else "segment"
    cached_val = min(n_val, _capacity(t.feature_cache_gb, 40 * 40 * c * 4))
    validations = batches // t.val_every if t.val_every > 0 else 0
    costs.add("validation", profile, f"val/{arch}/{kind}", validations * n_val)
    val_key = backbone_key(profile, arch, 320, _precision(config, False), notes)
    costs.add("validation", profile, val_key, validations * (n_val - cached_val))
    costs.add("val-features", profile, val_key, cached_val)
    # final and best-on-val in one pass: the backbone once per image (uncached ones, plus the flipped image),
    # head, upsampling, probes and CRF per checkpoint; the figures reuse the first images' predictions
    checkpoints = 2 if validations > 0 else 1
    costs.add("eval-backbone", profile, val_key, (n_val - cached_val) + (n_val if e.flip else 0))
    costs.add("eval-head", profile, f"eval/{arch}/{kind}/head", checkpoints * (2 if e.flip else 1) * n_val)
    costs.add("eval-upsample", profile, f"eval/{arch}/{kind}/upsample_probes", checkpoints * n_val)
    if e.crf:
        costs.add("eval-crf", profile, "eval/crf/serial", checkpoints * 2 * n_val)  # both probes
    return costs, key, relaxed


def _store_key(profile: Profile, arch: str, what: str) -> str:
    """``store/<arch>/read|write``; profiles without them fall back to the backbone (write) or fail (read)."""
    key = f"store/{arch}/{what}"
    return key if profile.has(key) or what == "read" else f"backbone/{arch}/224/fp32"


def _depth_source(profile: Profile, config, scope: str, notes: list[str]) -> tuple[str, float]:
    """The profile stage that prices one depth map of ``scope`` (``crop`` or ``image``) and the factor for the
    configured test-time augmentation (two forwards) against the measured one."""
    source = config.data.depth_source
    if source in CHEAP_DEPTH:
        return f"depth/{CHEAP_DEPTH[source]}/stage", 1.0
    if source in READ_DEPTH:  # no network: a stored map read, cut and resized per crop
        key = "depth/crop_from_image/stage"
        return (key if profile.has(key) else "depth/image_plane/stage"), 1.0
    if source not in NET_DEPTH:
        raise PlanError(f"depth source {source!r} has no depth-stage cost in repro.cluster.costs; add it to NET_DEPTH, "
                        "CHEAP_DEPTH or READ_DEPTH")
    net = NET_DEPTH[source]  # mde_features: the ZoeDepth network itself, read at its penultimate layer
    key = f"depth/{net}/full/{scope}"
    if not profile.has(key):
        notes.append(f"depth {net}: the profile measured only the tiny random model (bench_stages.py --depth-full "
                     f"measures the full-size one); depth hours are underestimated")
        key = f"depth/{net}/tiny/{scope}"
    measured = 2.0 if profile.stage(key).get("tta") else 1.0
    return key, (2.0 if config.data.depth_tta else 1.0) / measured


def data_stages(config, profile: Profile, n_train: int, n_val: int, notes: list[str]) -> dict[str, DataStage]:
    """The shared data folders of a config and their cost (hours), keyed by folder identity."""
    from repro.runs.workdir import data_paths

    d, arch = config.data, config.model.arch
    paths = data_paths(config, WORK)
    crops = n_train * (5 if d.five_crop else 1)
    scale = SOURCE_PIXELS.get(d.dataset, MEASURED_PIXELS) / MEASURED_PIXELS
    out: dict[str, DataStage] = {}

    def stage(name: str, path: Path, *items: tuple[str, str, float, float]) -> None:
        costs = Costs()
        for sub, key, count, factor in items:
            costs.add(sub, profile, key, count, factor)
        out[f"{name}:{path}"] = DataStage(name, str(path.relative_to(WORK / "data")), hours_by_stage(costs.gpu),
                                          hours_by_stage(costs.cpu))

    train_prep = "prepare/train224-five" if d.five_crop else "prepare/val320"
    stage("prepare", paths.crops, ("prepare", train_prep, n_train, scale))
    stage("prepare", paths.val_crops, ("prepare", "prepare/val320", n_val, scale))
    net = "depth"
    if d.depth_source != "none" and d.depth_scope == "image":  # R4: one map per full image, then cut per crop
        key, tta = _depth_source(profile, config, "image", notes)
        cut = "depth/crop_from_image/stage" if profile.has("depth/crop_from_image/stage") else "depth/image_plane/stage"
        stage("depth", paths.image_depth, (net, key, n_train, tta))
        stage("depth", paths.val_image_depth, (net, key, n_val, tta))
        stage("depth", paths.depth, ("depth", cut, crops, 1.0))
        stage("depth", paths.val_depth, ("depth", cut, n_val, 1.0))
    elif d.depth_source != "none":  # eq. 4: the estimator on every crop
        key, tta = _depth_source(profile, config, "crop", notes)
        stage("depth", paths.depth, (net, key, crops, tta))
        stage("depth", paths.val_depth, (net, key, n_val, tta))
    stage("shards", paths.shards, ("shards", "shards/train224", crops, 1.0))
    knn = Costs()
    knn.add("knn-features", profile, f"backbone/{arch}/224/fp32", crops)
    fit = profile.data.get("knn_fit", {}).get(str(feature_dim(arch)))
    if fit is None:
        raise PlanError(f"stage profile {profile.path} has no kNN fit for C={feature_dim(arch)} (knn_fit)")
    knn.add_seconds("knn-search", fit.get("kind", "cpu"), float(fit["a"]) * crops ** float(fit["b"]),
                    int(fit.get("cores", 1)))
    out[f"knn:{paths.knn}"] = DataStage("knn", str(paths.knn.relative_to(WORK / "data")), hours_by_stage(knn.gpu),
                                        hours_by_stage(knn.cpu))
    if getattr(paths, "features", None) is not None:  # train.feature_store: built by prepare_data (with any LHP)
        speed = 1.0  # a bf16 store (model.backbone_precision=bf16): the write scaled as the backbone's bf16/fp32 rates
        if _precision(config, False) == "bf16" and profile.device == "cuda":
            fast = backbone_key(profile, arch, 224, "bf16", notes)
            speed = profile.stage(f"backbone/{arch}/224/fp32")["rate"] / profile.stage(fast)["rate"]
        stage("features", paths.features, ("feature-store", _store_key(profile, arch, "write"), crops, speed))
    return out


# ------------------------------------------------------------------------------------------ peak memory
ARCH_PARAMS = {"vit_small_patch8": (21.67e6, 12, 384, 6), "vit_base_patch8": (86.58e6, 12, 768, 12)}
"""(parameters, blocks, width D, heads) of the DINO backbones (parameter counts: timm's benchmark CSVs)."""
ZOEDEPTH_PARAMS = 345e6
"""ZoeD_N: MiDaS v3.1 BEiT-L-384 (344 M, MiDaS README) plus the metric-bins head; priced for both depth networks."""
GIB = 2.0**30


def _vit_activation_bytes(batch: int, size: int, width: int, heads: int, nbytes: int, fused: bool = True) -> float:
    """Live activations of one frozen ViT block in inference: ``b N (D + 3D + 4D + D) bytes`` (residual, q/k/v,
    MLP hidden, output), plus ``2 b h N^2 bytes`` (scores and softmax) when attention is not fused."""
    n = (size // 8) ** 2 + 1
    return batch * n * 9 * width * nbytes + (0 if fused else 2 * batch * heads * n * n * nbytes)


def peak_memory(config) -> dict[str, float]:
    """Peak accelerator memory (GiB) of each GPU stage of one run, DERIVED (not measured).

    * ``train``: batch ``B`` anchors + ``B`` kNN partners (``2B`` crops at 224 px, 28 x 28 features):
      the backbone's fp32 weights; the frozen backbone pass over the ``2B`` crops (fused attention,
      :func:`_vit_activation_bytes`, 2 bytes under bf16, 4 under fp32) unless every crop hits the
      feature cache or store; the features ``2B x C x 784 x 4``; the head's activations and gradients
      (``2B x 784 x (2C + Q) x 4 x 3``: forward, backward, Adam); the correlation tensors ``2B x S^4 x 4 x 8``
      (``S`` = ``sampling.feature_samples``, 28 for full sampling; self/kNN/random/depth, forward and
      backward); attention LHP adds the unfused last-block attention ``2 x 2B x h x 785^2 x 4``.
    * ``eval``: ``eval.batch_size`` images at 320 px (40 x 40 features, 1601 tokens): weights, the fp32
      backbone pass, and the upsampled logits of both probes ``b x 320^2 x (Q + 2 K) x 4 x 2`` (``K``
      = classes).
    * ``depth``: ZoeDepth (:data:`ZOEDEPTH_PARAMS`, fp32) at batch 8 on 384 x 512 inputs
      (768 patch tokens of width 1024) plus the DPT decoder's 256-channel maps up to 192 x 256.
    """
    params, _, width, heads = ARCH_PARAMS[config.model.arch]
    weights = params * 4
    b2 = 2 * config.train.batch_size
    nbytes = 2 if config.train.precision == "bf16" else 4
    q = config.model.code_dim
    s = 28 if config.sampling.mode == "full" else config.sampling.feature_samples
    attention = config.lhp.enabled and config.lhp.propagation == "attention"
    train = (weights + _vit_activation_bytes(b2, 224, width, heads, nbytes)
             + b2 * width * 784 * 4 + b2 * 784 * (2 * width + q) * 4 * 3 + b2 * s**4 * 4 * 8
             + (2 * b2 * heads * 785**2 * 4 if attention else 0))
    eb = config.eval.batch_size
    from repro.data.datasets.registry import num_classes_for

    classes = num_classes_for(config)
    evaluate = weights + _vit_activation_bytes(eb, 320, width, heads, 4) + eb * 320**2 * (q + 2 * classes) * 4 * 2
    out = {"train": train / GIB, "eval": evaluate / GIB}
    if config.data.depth_source in NET_DEPTH or config.data.depth_source not in (*CHEAP_DEPTH, "none"):
        depth = ZOEDEPTH_PARAMS * 4 + 8 * 769 * 9 * 1024 * 4 + 8 * 256 * 192 * 256 * 4 * 2
        out["depth"] = depth / GIB
    return out
