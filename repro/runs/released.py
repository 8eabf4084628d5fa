"""The published STEGO and DepthG checkpoints: registry, import, and evaluation in the released protocol.

The seven published files (data_manifests/released_checkpoints.yaml) are listed in ``data_manifests/released_checkpoints.yaml``
(name, file, table entry, where published, sha256 once checked). :func:`evaluate_released` scores one
of them on its table entry's 320 px validation crops with repro's evaluation in the protocol of the
released ``eval_segmentation.py`` (docs/fidelity.md, R12): flip averaging ``(net(x) + net(flip x).flip) / 2``,
code upsampled bilinearly to 320, cluster probe ``softmax(2 cos)``, linear probe log-softmax, DenseCRF
given the image as the released code builds it (``crf_image="bgr_truncated"``). The parts come from
:mod:`repro.models.lightning`; the evaluation is the same function a trained run uses. The result is
``<work>/<entry>/released-checkpoint/metrics.json`` (label ``released-checkpoint``, n = 1), with the
fields of a trained run's ``metrics.json`` plus a ``checkpoint`` block (file, sha256, Lightning version,
global_step, saved hyperparameters).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from repro.models.lightning import DATASET_NAMES
from repro.runs.workdir import RELEASED_LABEL, released_metrics_path
from repro.utils.errors import MissingFileError

__all__ = ["LABEL", "PublishedCheckpoint", "load_registry", "find_published", "released_dir", "local_path",
           "check_against_entry", "evaluate_released", "import_summary", "CFG_KEYS",
           "compare_cfg", "describe_cfg_difference"]

log = logging.getLogger("repro.runs.released")
LABEL = RELEASED_LABEL
"""The label of a published checkpoint's evaluation in ``metrics.json`` and its folder name."""
REGISTRY_FILE = "released_checkpoints.yaml"

@dataclass(frozen=True)
class PublishedCheckpoint:
    """One published file of the registry (see ``data_manifests/released_checkpoints.yaml``)."""

    name: str
    project: str
    file: str
    entry: str
    arch: str
    dataset: str
    url: str
    published_in: str
    sha256: str = ""

    def fetch_hint(self, path: Path) -> str:
        """How to get the file to ``path``."""
        if "drive.google.com" in self.url:
            return f"download {self.file} by hand from the Google Drive folder {self.url} ({self.published_in}) to {path}"
        return f"wget -O {path} {self.url}"


def load_registry(path: str | Path | None = None) -> list[PublishedCheckpoint]:
    """Read the registry of published checkpoints.

    Args:
        path: the YAML file (default ``released_checkpoints.yaml`` in :func:`repro.data.datasets.manifest.manifest_dir`).

    Raises:
        ValueError: a malformed registry (names the entry and the key).
    """
    from repro.data.datasets.manifest import manifest_dir

    path = Path(path) if path is not None else manifest_dir() / REGISTRY_FILE
    data = yaml.safe_load(path.read_text()) or {}
    out = []
    fields = set(PublishedCheckpoint.__dataclass_fields__)
    for i, item in enumerate(data.get("checkpoints") or []):
        unknown, missing = set(item) - fields, fields - set(item) - {"sha256"}
        if unknown or missing:
            raise ValueError(f"{path}: checkpoints[{i}] has unknown keys {sorted(unknown)} / lacks {sorted(missing)}")
        out.append(PublishedCheckpoint(**{k: "" if v is None else str(v) for k, v in item.items()}))
    return out


def find_published(key: str, registry: Sequence[PublishedCheckpoint] | None = None) -> PublishedCheckpoint | None:
    """The registry record whose name, file name, entry or sha256 equals ``key`` (None if none)."""
    for item in registry if registry is not None else load_registry():
        if key in (item.name, item.file, item.entry) or (item.sha256 and key == item.sha256):
            return item
    return None


def released_dir() -> Path:
    """Where published checkpoints are looked for: ``$REPRO_WEIGHTS/released`` (default ``weights/released``)."""
    from repro.models.backbone import default_weights_dir

    return default_weights_dir() / "released"


def local_path(item: PublishedCheckpoint, folder: str | Path | None = None) -> Path:
    """The local path of a published file (``folder`` default :func:`released_dir`)."""
    return Path(folder if folder is not None else released_dir()) / item.file


def _registry_check(model, registry: Sequence[PublishedCheckpoint]) -> dict[str, Any]:
    """Match a read file with the registry by sha256 or file name; a recorded digest must match."""
    ckpt = model.checkpoint
    item = next((r for r in registry if r.sha256 and r.sha256 == ckpt.sha256), None)
    item = item or next((r for r in registry if r.file == ckpt.path.name), None)
    if item is None:
        return {"registry_name": None, "sha256_status": "not a registered published file"}
    if item.sha256 and item.sha256 != ckpt.sha256:
        raise ValueError(f"{ckpt.path}: sha256 {ckpt.sha256} differs from the published {item.file} recorded in "
                         f"data_manifests/{REGISTRY_FILE} ({item.sha256}); the file is corrupt or another file: "
                         f"{item.fetch_hint(ckpt.path)}")
    status = "matches the registry" if item.sha256 else (f"not yet recorded for {item.name}: check the download, "
                                                         f"then record it in data_manifests/{REGISTRY_FILE}")
    return {"registry_name": item.name, "sha256_status": status, "url": item.url}


def import_summary(model, registry: Sequence[PublishedCheckpoint] | None = None) -> dict[str, Any]:
    """The provenance of a converted checkpoint plus its registry match (see :func:`_registry_check`)."""
    return {**model.provenance(), **_registry_check(model, registry if registry is not None else load_registry())}


def _arch(cfg: dict) -> str:
    return f"{cfg.get('model_type')}_patch{cfg.get('dino_patch_size')}"


CFG_KEYS: dict[str, tuple[str, Any]] = {
    "model_type": ("model.arch", _arch), "dino_patch_size": ("model.arch", _arch),
    "dim": ("model.code_dim", None), "dataset_name": ("data.dataset", lambda cfg: DATASET_NAMES.get(
        cfg.get("dataset_name"), cfg.get("dataset_name"))),
    "crop_type": ("data.five_crop", lambda cfg: cfg.get("crop_type") == "five"), "res": ("data.crop_size", None),
    "num_neighbors": ("data.num_neighbors", None), "zero_clamp": ("loss.zero_clamp", None),
    "neg_samples": ("loss.neg_samples", None),
    "pos_intra_weight": ("loss.lambda_self", None), "pos_inter_weight": ("loss.lambda_knn", None),
    "neg_inter_weight": ("loss.lambda_random", None), "pos_intra_shift": ("loss.b_self", None),
    "pos_inter_shift": ("loss.b_knn", None), "neg_inter_shift": ("loss.b_random", None),
    "lr": ("train.lr", None), "max_steps": ("train.max_steps", None), "batch_size": ("train.batch_size", None),
    "feature_samples": ("sampling.feature_samples", None),
    "depth_feat_weight": ("loss.lambda_depthg", None), "depth_feat_shift": ("loss.b_depthg", None),
    "decay_every_steps": ("guidance.decay_step", None), "depth_loss_decay_factor": ("guidance.decay_factor", None),
    "fps_sample_decay_every_steps": ("sampling.decrease_every", None),
    "fps_sample_decay_factor": ("sampling.released_factor", None),
    "lhp": ("lhp.enabled", None), "propagation_strategy": ("lhp.propagation", None),
}
"""Keys of the released training cfg (``src/configs/train_config.yml`` / DepthG's ``local_config.yml``) ->
repro config key, with how the compared value is derived from the cfg (None: the value itself). Keys
the saved cfg lacks (STEGO has no depth keys) are not compared."""


def compare_cfg(model, config) -> list[dict[str, Any]]:
    """Compare a checkpoint's saved ``cfg`` with an entry's resolved config, key by key (:data:`CFG_KEYS`).

    DepthG's training loop overwrites some cfg values in place (guidance decay of ``depth_feat_weight`` /
    ``depth_feat_shift``, the FPS schedule of ``feature_samples``: ``lightning.DEPTHG_DECAYED_KEYS``), so
    a DepthG checkpoint saves those *after* decay; such differences carry ``"after_decay": True``.

    Args:
        model: a :class:`~repro.models.lightning.ReleasedModel`.
        config: the entry's resolved :class:`~repro.config.ExperimentConfig`.

    Returns:
        One record per differing repro key: ``{"key", "cfg_keys", "saved", "entry", "after_decay"}``,
        in :data:`CFG_KEYS` order.
    """
    from repro.config.identity import flat_config
    from repro.models.lightning import DEPTHG_DECAYED_KEYS

    cfg, flat, out, seen = model.checkpoint.cfg, flat_config(config), [], set()
    for cfg_key, (key, derive) in CFG_KEYS.items():
        if cfg_key not in cfg or key in seen or key not in flat:
            continue
        seen.add(key)
        saved = derive(cfg) if derive else cfg[cfg_key]
        entry = flat[key]
        same = (saved == entry or (isinstance(saved, (int, float)) and isinstance(entry, (int, float))
                                   and not isinstance(saved, bool) and abs(saved - entry) <= 1e-9 * max(1, abs(entry))))
        if not same:
            cfg_keys = [k for k, (target, _) in CFG_KEYS.items() if target == key and k in cfg]
            out.append({"key": key, "cfg_keys": cfg_keys, "saved": saved, "entry": entry,
                        "after_decay": model.project == "depthg" and cfg_key in DEPTHG_DECAYED_KEYS})
    return out


def describe_cfg_difference(item: dict[str, Any]) -> str:
    """``"loss.lambda_depthg: saved 0.0152 (cfg depth_feat_weight, after DepthG's decay), entry 0.19"``."""
    decay = ", saved after DepthG's in-place decay" if item["after_decay"] else ""
    return f"{item['key']}: saved {item['saved']!r} (cfg {'/'.join(item['cfg_keys'])}{decay}), entry {item['entry']!r}"


def cfg_record(model, config) -> dict[str, Any]:
    """``{"entry", "fidelity", "differences": compare_cfg(...)}`` for ``checkpoint.json`` / ``metrics.json``."""
    return {"entry": config.name, "fidelity": config.fidelity, "differences": compare_cfg(model, config)}


def check_against_entry(model, config) -> list[str]:
    """Check that a converted checkpoint can be scored on an entry's validation set.

    Returns:
        Notes on harmless differences (the checkpoint's code dimension wins over the entry's).

    Raises:
        ValueError: another backbone, another class count, or another dataset than the entry's.
    """
    from repro.data.datasets.registry import DATASETS, num_classes_for

    c, notes = model.checkpoint, []
    if model.arch != config.model.arch:
        raise ValueError(f"{c.path} is a {model.arch} checkpoint but entry {config.name} uses {config.model.arch}")
    k = num_classes_for(config)  # R13: void scored as a class
    if model.n_classes != k:
        raise ValueError(f"{c.path} has {model.n_classes} classes but {config.data.dataset} ({config.name}) has {k}")
    saved = c.cfg.get("dataset_name")
    if DATASETS.get(DATASET_NAMES.get(saved, "")) and DATASET_NAMES[saved] != config.data.dataset:
        raise ValueError(f"{c.path} was trained on {saved!r} but entry {config.name} evaluates on {config.data.dataset}")
    if saved not in DATASET_NAMES:
        notes.append(f"cfg dataset_name {saved!r} is not one repro knows; scored on {config.data.dataset}")
    if model.code_dim != config.model.code_dim:
        notes.append(f"code dimension {model.code_dim} from the checkpoint (entry {config.name} says "
                     f"{config.model.code_dim})")
    return notes


def evaluate_released(entry: str, checkpoint: str | Path | None = None, *, work_dir: str | Path | None = None,
                      overrides: Sequence[str] = (), crf: bool | None = None, crf_image: str | None = None,
                      crf_processes: int | None = None, device: str | None = None, quiet: bool = False,
                      force: bool = False, extra_globals: Sequence[str] = ()) -> dict:
    """Score a published checkpoint on a table entry's validation set in the released protocol.

    Args:
        entry: table entry (``table1/stego-vitb8``) or experiment YAML.
        checkpoint: the ``.ckpt`` file; default the entry's registered file in :func:`released_dir`.
        work_dir: work folder (default ``$REPRO_WORK`` or ``./runs``); the validation crops are those of
            the entry's released-profile runs (:func:`repro.runs.entry.data_paths`), prepared here if missing.
        overrides: ``key=value`` config overrides (``data.root=...``, ``eval.batch_size=...``), applied
            after ``fidelity=released`` (the entry is resolved in the released profile: flip
            averaging, the released CRF image, NEAREST validation crops, NYUv2 void scored; docs/fidelity.md).
        crf: DenseCRF refinement (default: the entry's ``eval.crf``, on for every published number).
        crf_image: the CRF image (default ``eval.crf_image``: ``"bgr_truncated"`` in the released profile).
        crf_processes: CRF worker processes (default ``eval.crf_processes``; -1 = every CPU).
        device: where the networks run (default CUDA when available).
        quiet: no progress bars.
        force: evaluate again even if ``metrics.json`` already holds this file's result.
        extra_globals: pickle globals to read as inert stand-ins (:func:`repro.models.safe_load.allowed_globals`).

    Returns:
        The metrics dictionary, also written atomically to :func:`released_metrics_path`.

    Raises:
        MissingFileError: no checkpoint given and the registered one is not present (with the fetch hint).
        UnsafeCheckpointError, CheckpointFormatError, CheckpointLayoutError: from reading the file.
        ValueError: the checkpoint does not fit the entry, or its sha256 differs from the registry's.
    """
    import torch

    from repro.utils.env import collect_env
    from repro.evaluate.protocol import evaluate_segmentation
    from repro.evaluate.report import ValidationSet, result_summary, write_json
    from repro.config.scales import get_scale
    from repro.data.datasets.registry import num_classes_for
    from repro.models.lightning import load_released
    from repro.runs.standins import released_stand_in
    from repro.runs.workdir import default_work_dir, prepare_val_crops, resolve_entry

    config = resolve_entry(entry, overrides=["fidelity=released", *overrides])
    registry = load_registry()
    work = Path(work_dir) if work_dir is not None else default_work_dir()
    item = find_published(config.name, registry) if checkpoint is None else None
    if checkpoint is None and item is None:
        raise ValueError(f"no published checkpoint is registered for {config.name}; pass --checkpoint FILE")
    checkpoint = Path(checkpoint) if checkpoint is not None else local_path(item)
    if not checkpoint.is_file() and get_scale(config.scale).stand_ins:
        checkpoint = released_stand_in(checkpoint, config, work, n_classes=num_classes_for(config),
                                       lhp=config.lhp.enabled)
    elif not checkpoint.is_file() and item is not None:
        raise MissingFileError(f"published checkpoint {item.name}", checkpoint, item.fetch_hint(checkpoint))
    out = released_metrics_path(work, config.name, config.scale)
    crf = config.eval.crf if crf is None else crf
    crf_image = crf_image or config.eval.crf_image
    protocol = {"crf": crf, "flip": config.eval.flip, "size": config.data.val_size,
                "crf_image": crf_image if crf else None, "cluster_alpha": 2.0, "upsampling": "bilinear",
                "fidelity": config.fidelity, "resize": config.data.resize, "pos_embed": config.model.pos_embed,
                "score_void": config.data.score_void}
    start = time.perf_counter()
    model = load_released(checkpoint, extra_globals=extra_globals)
    record = {**import_summary(model, registry), "entry_notes": check_against_entry(model, config),
              "cfg_vs_entry": cfg_record(model, config)}
    for item in record["cfg_vs_entry"]["differences"]:
        log.info("%s cfg differs from %s: %s", model.checkpoint.path.name, config.name, describe_cfg_difference(item))
    timings = {"import": time.perf_counter() - start}
    if not force and out.is_file():
        old = json.loads(out.read_text())
        if old.get("checkpoint", {}).get("sha256") == model.checkpoint.sha256 and old.get("protocol") == protocol:
            log.info("%s already holds the result of %s; skipped", out, model.checkpoint.path.name)
            return old
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    samples = ValidationSet(prepare_val_crops(config, work, quiet=quiet)).samples
    timings["prepare_val"] = time.perf_counter() - start
    processes = config.eval.crf_processes if crf_processes is None else crf_processes
    backbone = model.backbone(config.model.pos_embed).to(device)
    parts = model.parts.to(device)
    start = time.perf_counter()
    result = evaluate_segmentation(samples, backbone, parts.head, parts.cluster_probe, parts.linear_probe,
                                   batch_size=config.eval.batch_size, crf=crf, crf_processes=processes,
                                   flip=config.eval.flip, device=device, crf_image=crf_image)
    timings["eval"] = time.perf_counter() - start
    timings["eval_per_image"] = timings["eval"] / max(len(samples), 1)
    summary = result_summary(result)
    metrics = {"entry": config.name, "seed": None, "label": LABEL, "scale": config.scale, "dataset": config.data.dataset,
               "num_images": len(samples), "protocol": protocol,
               LABEL: {"step": model.checkpoint.global_step, "summary": summary, "cluster": result.cluster.to_dict(),
                       "linear": result.linear.to_dict()},
               "summary": summary, "paper": dict(config.paper), "checkpoint": record, "device": device,
               "timings_s": timings, "env": collect_env()}
    write_json(out, metrics)
    return metrics
