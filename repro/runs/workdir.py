"""The work folder: where the shared data of a config and its runs live, and building the data.

Layout under the work folder (``--work-dir``, ``$REPRO_WORK`` or ``./runs``); every data folder is
named after what changes its bytes (:func:`data_key`), so runs share a stage exactly when their
settings produce the same files (e.g. both fidelities of a STEGO entry never share its NEAREST vs
bilinear crops, but share what they have in common)::

    data/<dataset>/crops-<split>-<size>-<five|single>-<resize>[-jpeg][-void]/
    data/<dataset>/depth-image-<split>-<source>-<uint8|float>/        per-image maps (depth_scope: image)
    data/<dataset>/depth-<crops tag>-<source>-<scope>-<encoding>/
    data/<dataset>/shards-<crops tag>-<depth tag>/
    data/<dataset>/knn-<crops tag>-<arch>[-drop<p>].npz
    data/<dataset>/features-<crops tag>-<arch>/                      train.feature_store
    <entry>/<fidelity>/seed<S>/   config.yaml env.json status.json logs/run.log train/ model.pt best.pt
                                  metrics.json figures/ .lock        (fidelity: paper | released)

The data stages of one dataset run under a file lock, so array tasks that share them compute
them once; a stage whose valid output exists is skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from repro.config.identity import check_run_name, content_mismatch
from repro.config.loader import ConfigError, load_config
from repro.config.scales import scale_root
from repro.config.schema import ExperimentConfig
from repro.runs.standins import with_stand_ins
from repro.utils.files import content_sha256

__all__ = ["DataPaths", "default_work_dir", "resolve_entry", "data_key", "data_paths", "prepare_data",
           "prepare_val_crops", "run_dir_for", "KNN_DROPOUT_SEED", "RELEASED_LABEL", "released_metrics_path"]

KNN_DROPOUT_SEED = 0  # R11: seed of the kNN-feature dropout masks (the released precompute_knns.py seeded 0)


def default_work_dir() -> Path:
    """``$REPRO_WORK`` or ``./runs``."""
    return Path(os.environ.get("REPRO_WORK", "runs"))


def resolve_entry(entry: str | Path, *, seed: int | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load a registered entry (``table1/depthg-vits8``) or a YAML file, apply overrides and the seed.

    ``data.root`` may use environment variables (``${REPRO_DATA}/cocostuff``); they are expanded here.

    Raises:
        ConfigError: bad config, an unsafe run name (:func:`repro.config.identity.check_run_name`), or
            ``data.root`` naming an unset variable.
        KeyError: an unknown entry name.
    """
    overrides = list(overrides) + ([f"train.seed={seed}"] if seed is not None else [])
    for item in overrides:  # an explicit empty name is refused, not replaced by the file's stem
        key, sep, value = str(item).partition("=")
        if sep and key.strip() == "name":
            check_run_name(value.strip(), f"--set {item}")
    path = Path(entry)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        config = load_config(path, overrides)
        config.name = config.name or path.stem
    else:
        from repro.config.entries import load_entry

        config = load_entry(str(entry), overrides)
    check_run_name(config.name, f"{entry}: config key 'name'")
    root = os.path.expandvars(config.data.root)
    if "$" in root:
        raise ConfigError(f"data.root {config.data.root!r} uses an unset environment variable; export it "
                          f"(e.g. REPRO_DATA=/path/to/datasets) or pass --set data.root=DIR")
    return dataclasses.replace(config, data=dataclasses.replace(config.data, root=root))


@dataclass(frozen=True)
class DataPaths:
    """Where the shared data stages of a config write (see module docstring)."""

    crops: Path
    depth: Path | None
    shards: Path
    knn: Path
    val_crops: Path
    val_depth: Path | None
    image_depth: Path | None = None  # per-image maps of the training split (data.depth_scope: image)
    val_image_depth: Path | None = None
    features: Path | None = None  # frozen features of every training crop (train.feature_store)


def _uses_depth(config: ExperimentConfig) -> bool:
    return config.data.depth_source != "none"


def _crop_tag(config: ExperimentConfig, *, train: bool) -> str:
    """What makes crops differ: split, size, five-crop, resizing (R3), JPEG round trip (R3), void class (R13)."""
    d = config.data
    split, size, five = (d.train_split, d.crop_size, d.five_crop) if train else (d.val_split, d.val_size, False)
    tag = f"{split}-{size}-{'five' if five else 'single'}-{d.resize}"
    if train and five and d.train_crop_codec != "png":  # only five-crops were stored as JPEG
        tag += f"-{d.train_crop_codec}"
    subset = d.train_subset if train else d.val_subset
    return tag + ("-void" if d.score_void else "") + (f"-first{subset}" if subset else "")


def _tta_tag(d) -> str:
    """``-notta`` for an estimator run without its test-time augmentation, else nothing."""
    return "" if d.depth_tta or d.depth_source not in ("zoedepth", "midas", "mde_features") else "-notta"


def _depth_tag(config: ExperimentConfig) -> str:
    """What makes depth maps differ: source, scope (R4), encoding (R4/R5), estimator test-time augmentation."""
    d = config.data
    return f"{d.depth_source}-{d.depth_scope}-{d.depth_encoding}{_tta_tag(d)}"


def data_key(config: ExperimentConfig) -> str:
    """Identity of an entry's shared data: runs with equal keys share crops, depth, shards and kNN.

    Both fidelities share a stage wherever their settings produce the same bytes (e.g. a STEGO entry's
    kNN table without depth), and never share it where they do not (NEAREST vs bilinear crops, R11's
    dropout in the kNN features).
    """
    d = config.data
    depth = _depth_tag(config) if _uses_depth(config) else "nodepth"
    return f"{d.dataset}/{_crop_tag(config, train=True)}/{depth}/{config.model.arch}/knn-dropout{d.knn_dropout:g}"


def _precision_tag(config: ExperimentConfig) -> str:
    """``""`` for ``model.backbone_precision: default``, else ``-bf16`` / ``-fp32`` (a store of other features)."""
    p = config.model.backbone_precision
    return "" if p == "default" else f"-{p}"


def data_paths(config: ExperimentConfig, work_dir: str | Path) -> DataPaths:
    """The shared data folders of a config under ``work_dir`` (named after :func:`data_key`'s parts)."""
    d = config.data
    base = data_root(config, work_dir) / d.dataset
    train, val = _crop_tag(config, train=True), _crop_tag(config, train=False)
    depth = _depth_tag(config) if _uses_depth(config) else None
    knn_drop = f"-drop{d.knn_dropout:g}" if d.knn_dropout else ""
    image_depth = {}
    if depth and d.depth_scope == "image":
        from repro.data.image_depth import image_depth_store

        tag = f"{d.depth_source}-{image_depth_store(d.depth_encoding)}{_tta_tag(d)}"
        first = {n: f"-first{n}" if n else "" for n in (d.train_subset, d.val_subset)}
        image_depth = {"image_depth": base / f"depth-image-{d.train_split}{first[d.train_subset]}-{tag}",
                       "val_image_depth": base / f"depth-image-{d.val_split}{first[d.val_subset]}-{tag}"}
    return DataPaths(
        crops=base / f"crops-{train}",
        depth=base / f"depth-{train}-{depth}" if depth else None,
        shards=base / f"shards-{train}-{depth or 'nodepth'}",
        knn=base / f"knn-{train}-{config.model.arch}{knn_drop}.npz",  # RGB only: one per crops folder, any depth
        val_crops=base / f"crops-{val}",
        val_depth=base / f"depth-{val}-{depth}" if depth else None,
        features=base / f"features-{train}-{config.model.arch}{_precision_tag(config)}" if config.train.feature_store
        else None,
        **image_depth,
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (concurrent array tasks wait for each other)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _crop_splits(config: ExperimentConfig, paths: DataPaths) -> tuple[tuple, tuple]:
    """``(split, folder, size, five_crop, codec, subset)`` of the training and the validation crops."""
    d = config.data
    return ((d.train_split, paths.crops, d.crop_size, d.five_crop, d.train_crop_codec, d.train_subset),
            (d.val_split, paths.val_crops, d.val_size, False, "png", d.val_subset))


def _prepare_crops(config: ExperimentConfig, split: str, crops: Path, size: int, five: bool, codec: str,
                   subset: int, quiet: bool) -> Path:
    """Crop one split of the config's dataset into ``crops`` (:func:`repro.data.pipeline.prepare_stage`)."""
    from repro.data.pipeline import prepare_stage

    d = config.data
    return prepare_stage(_dataset(config, split, subset), crops, five_crop=five, size=size, resize=d.resize, codec=codec,
                         score_void=d.score_void, progress=not quiet)


def _dataset(config: ExperimentConfig, split: str, subset: int = 0):
    """The split's adapter; its first ``subset`` images when ``subset`` > 0 (``data.train_subset`` / ``val_subset``)."""
    from repro.data import FirstImages, get_dataset

    d = config.data
    kwargs = {"require_depth": True} if d.dataset == "nyuv2" and d.depth_source == "sensor" else {}
    dataset = get_dataset(d.dataset, d.root, split, **kwargs)
    return FirstImages(dataset, subset) if subset else dataset


def prepare_data(config: ExperimentConfig | str, *, work_dir: str | Path | None = None, overrides: Sequence[str] = (),
                 quiet: bool = False, timings: dict | None = None) -> DataPaths:
    """Run the shared data stages of an entry: crops, depth, shards, kNN (train) and crops, depth (val).

    Args:
        config: a resolved config or an entry name / YAML path.
        work_dir: the work folder (default :func:`default_work_dir`).
        overrides: ``key=value`` overrides when ``config`` is a name.
        quiet: no progress bars.
        timings: filled with seconds per stage (0.0 for a skipped stage is not distinguished).

    Returns:
        :class:`DataPaths`.
    """
    from repro.data.image_depth import image_depth_stage, image_depth_store
    from repro.data.pipeline import depth_stage, knn_stage, shards_stage
    from repro.depth.files import FILE_SOURCES, check_depth_files
    from repro.training.loop import resolve_checkpoint

    if not isinstance(config, ExperimentConfig):
        config = resolve_entry(config, overrides=overrides)
    work_dir = Path(work_dir) if work_dir is not None else default_work_dir()
    config = with_stand_ins(config, work_dir)
    paths, d = data_paths(config, work_dir), config.data
    timings = {} if timings is None else timings
    weights = os.path.expandvars(d.depth_weights) if d.depth_weights else None
    depth_files = os.path.expandvars(d.depth_files) if d.depth_files else None

    def timed(stage: str, fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
        return out

    with _locked(data_root(config, work_dir) / f".{d.dataset}.lock"):
        for split, crops, size, five, codec, subset in _crop_splits(config, paths):
            if not (crops / "index.json").is_file():
                timed("prepare", _prepare_crops, config, split, crops, size, five, codec, subset, quiet)
        if paths.depth is not None:
            store = image_depth_store(d.depth_encoding)
            for split, subset, crops, image_depth, out in (
                    (d.train_split, d.train_subset, paths.crops, paths.image_depth, paths.depth),
                    (d.val_split, d.val_subset, paths.val_crops, paths.val_image_depth, paths.val_depth)):
                if d.depth_scope == "image":  # reused when its params match, an error when they do not
                    timed("depth_image", image_depth_stage, _dataset(config, split, subset), image_depth,
                          source=d.depth_source, weights=weights, tta=d.depth_tta, store=store, progress=not quiet,
                          depth_files=depth_files)
                if d.depth_source in FILE_SOURCES and depth_files and d.depth_scope == "crop" \
                        and not (out / "index.json").is_file():
                    # every image's map: missing, wrong size, NaN, constant -> an error naming the file
                    timed("depth", check_depth_files, _dataset(config, split, subset), depth_files)
                timed("depth", depth_stage, crops, out, source=d.depth_source, weights=weights, scope=d.depth_scope,
                      encoding=d.depth_encoding, tta=d.depth_tta, image_depth=image_depth, resize=d.resize,
                      progress=not quiet, depth_files=depth_files)
        timed("shards", shards_stage, paths.crops, paths.depth, paths.shards, shard_size=d.shard_size,
              depth_source=d.depth_source)
        timed("knn", knn_stage, paths.shards, paths.knn, arch=config.model.arch, checkpoint=resolve_checkpoint(config),
              k=d.knn_k, dropout=d.knn_dropout, seed=KNN_DROPOUT_SEED, identity=paths.crops)
        if paths.features is not None:
            timed("features", _feature_store, config, paths, quiet)
    return paths


def _feature_store(config: ExperimentConfig, paths: DataPaths, quiet: bool) -> Path:
    """The training crops' frozen features, once per (crops, backbone): :mod:`repro.data.features`."""
    from repro.data.features import feature_store_stage
    from repro.data.stages import read_params
    from repro.models.backbone import DinoBackbone
    from repro.training.loop import resolve_checkpoint

    checkpoint = resolve_checkpoint(config)
    params = {"crops": str(paths.crops.resolve()), "arch": config.model.arch, "checkpoint": str(checkpoint),
              "checkpoint_sha256": content_sha256(checkpoint), "pos_embed": config.model.pos_embed}
    if config.model.backbone_precision != "default":
        params["precision"] = config.model.backbone_precision
    index = paths.features / "index.json"
    if index.is_file() and not content_mismatch(read_params(index), params):
        return feature_store_stage(paths.crops, paths.features, None, params=params)  # checks params, reuses
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone = DinoBackbone(config.model.arch, checkpoint, pos_embed=config.model.pos_embed,
                            precision=config.model.backbone_precision).to(device)
    return feature_store_stage(paths.crops, paths.features, backbone, params=params, device=device,
                               progress=not quiet)


def data_root(config: ExperimentConfig, work_dir: str | Path) -> Path:
    """``<work_dir>/data``, or ``<work_dir>/<scale>/data`` for a scale other than ``full`` (never shared with it)."""
    return scale_root(work_dir, config.scale) / "data"


def run_dir_for(config: ExperimentConfig, work_dir: str | Path) -> Path:
    """``<work_dir>/<entry>/<fidelity>/seed<S>``: the two fidelities of an entry never share a folder.

    Runs of a scale other than ``full`` go to ``<work_dir>/<scale>/<entry>/<fidelity>/seed<S>``.

    Raises:
        ConfigError: a run name that would leave the work folder (:func:`repro.config.identity.check_run_name`).
    """
    name = check_run_name(config.name)
    return scale_root(work_dir, config.scale) / name / config.fidelity / f"seed{config.train.seed}"


def prepare_val_crops(config: ExperimentConfig, work_dir: str | Path, *, quiet: bool = False) -> Path:
    """Only the validation crops of a config (no training data, depth, shards or kNN), under the dataset lock.

    Returns:
        The crops folder (:attr:`DataPaths.val_crops`), made as :func:`prepare_data` makes it.
    """
    work_dir = Path(work_dir)
    paths = data_paths(config, work_dir)
    split, crops, size, five, codec, subset = _crop_splits(config, paths)[1]
    with _locked(data_root(config, work_dir) / f".{config.data.dataset}.lock"):
        if not (crops / "index.json").is_file():
            _prepare_crops(config, split, crops, size, five, codec, subset, quiet)
    return crops


RELEASED_LABEL = "released-checkpoint"
"""The folder of a published checkpoint's evaluation under its entry (beside the fidelity folders)."""


def released_metrics_path(work_dir: str | Path, entry: str, scale: str = "full") -> Path:
    """``<work_dir>/<entry>/released-checkpoint/metrics.json`` (``<work_dir>/<scale>/...`` for another scale)."""
    from repro.config.scales import scale_root

    return scale_root(work_dir, scale) / entry / RELEASED_LABEL / "metrics.json"
