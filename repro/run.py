"""``repro run ENTRY``: every stage of one table entry and seed, resumable stage by stage.

Layout under the work folder (``--work-dir``, ``$REPRO_WORK`` or ``./runs``)::

    data/<dataset>/crops-<split>-<size>-<five|single>/         shared by every entry of the dataset
    data/<dataset>/depth-<split>-<size>-<five|single>-<source>/
    data/<dataset>/depth-image-<split>-<source>-<uint8|float>/   per-image maps (depth_scope: image)
    data/<dataset>/shards-<split>-224-<five|single>-<source>/
    data/<dataset>/knn-<split>-224-<five|single>-<source>-<arch>.npz
    <entry>/<fidelity>/seed<S>/   config.yaml env.json status.json logs/run.log train/ model.pt best.pt
                                  metrics.json figures/ .lock        (fidelity: paper | released)

A stage whose valid output exists is skipped, so a rerun (or a requeued SLURM task) continues
where the previous one stopped; the data stages of one dataset run under a file lock, so
array tasks that share them compute them once. A run folder is locked too, without waiting
(:mod:`repro.rundir`): a second ``repro run``/``repro eval`` of it fails at once. Whatever stops
a run (any exception, a full disk included), ``status.json`` says ``failed`` with the error; a
failed run that produced nothing may be rerun in place with a corrected config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from repro.config.loader import ConfigError, load_config, save_config
from repro.config.schema import ExperimentConfig
from repro.identity import check_run_name, config_diff, config_hash
from repro.rundir import check_saved_config as _check_saved_config
from repro.rundir import record_failure as _status_failed
from repro.rundir import run_lock as _run_lock
from repro.rundir import write_status as _status

__all__ = ["DataPaths", "resolve_entry", "data_key", "data_paths", "prepare_data", "run_dir_for", "run_entry",
           "evaluate_run", "eval_entry", "ValidationContext", "default_work_dir", "STAGES"]

log = logging.getLogger("repro.run")
STAGES = ("prepare", "depth", "shards", "knn", "train", "eval")
KNN_DROPOUT_SEED = 0  # R11: seed of the kNN-feature dropout masks (the released precompute_knns.py seeded 0)


def default_work_dir() -> Path:
    """``$REPRO_WORK`` or ``./runs``."""
    return Path(os.environ.get("REPRO_WORK", "runs"))


def resolve_entry(entry: str | Path, *, seed: int | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load a registered entry (``table1/depthg-vits8``) or a YAML file, apply overrides and the seed.

    ``data.root`` may use environment variables (``${REPRO_DATA}/cocostuff``); they are expanded here.

    Raises:
        ConfigError: bad config, an unsafe run name (:func:`repro.identity.check_run_name`), or
            ``data.root`` naming an unset variable.
        KeyError: an unknown entry name.
    """
    overrides = list(overrides) + ([f"train.seed={seed}"] if seed is not None else [])
    path = Path(entry)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        config = load_config(path, overrides)
        config.name = config.name or path.stem
    else:
        from repro.config.registry import load_entry

        config = load_entry(str(entry), overrides)
    check_run_name(config.name or "unnamed", f"{entry}: config key 'name'")
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
    return tag + ("-void" if d.score_void else "")


def _depth_tag(config: ExperimentConfig) -> str:
    """What makes depth maps differ: source, scope (R4), encoding (R4/R5), estimator test-time augmentation."""
    d = config.data
    tta = "" if d.depth_tta or d.depth_source not in ("zoedepth", "midas") else "-notta"
    return f"{d.depth_source}-{d.depth_scope}-{d.depth_encoding}{tta}"


def data_key(config: ExperimentConfig) -> str:
    """Identity of an entry's shared data: runs with equal keys share crops, depth, shards and kNN.

    Both fidelities share a stage wherever their settings produce the same bytes (e.g. a STEGO entry's
    kNN table without depth), and never share it where they do not (NEAREST vs bilinear crops, R11's
    dropout in the kNN features).
    """
    d = config.data
    depth = _depth_tag(config) if _uses_depth(config) else "nodepth"
    return f"{d.dataset}/{_crop_tag(config, train=True)}/{depth}/{config.model.arch}/knn-dropout{d.knn_dropout:g}"


def data_paths(config: ExperimentConfig, work_dir: str | Path) -> DataPaths:
    """The shared data folders of a config under ``work_dir`` (named after :func:`data_key`'s parts)."""
    d = config.data
    base = Path(work_dir) / "data" / d.dataset
    train, val = _crop_tag(config, train=True), _crop_tag(config, train=False)
    depth = _depth_tag(config) if _uses_depth(config) else None
    knn_drop = f"-drop{d.knn_dropout:g}" if d.knn_dropout else ""
    image_depth = {}
    if depth and d.depth_scope == "image":
        from repro.data.image_depth import image_depth_store

        tta = "" if d.depth_tta or d.depth_source not in ("zoedepth", "midas") else "-notta"
        tag = f"{d.depth_source}-{image_depth_store(d.depth_encoding)}{tta}"
        image_depth = {"image_depth": base / f"depth-image-{d.train_split}-{tag}",
                       "val_image_depth": base / f"depth-image-{d.val_split}-{tag}"}
    return DataPaths(
        crops=base / f"crops-{train}",
        depth=base / f"depth-{train}-{depth}" if depth else None,
        shards=base / f"shards-{train}-{depth or 'nodepth'}",
        knn=base / f"knn-{train}-{depth or 'nodepth'}-{config.model.arch}{knn_drop}.npz",
        val_crops=base / f"crops-{val}",
        val_depth=base / f"depth-{val}-{depth}" if depth else None,
        features=base / f"features-{train}-{config.model.arch}" if config.train.feature_store else None,
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


def _dataset(config: ExperimentConfig, split: str):
    from repro.data import get_dataset

    kwargs = {"require_depth": True} if config.data.dataset == "nyuv2" and config.data.depth_source == "sensor" else {}
    return get_dataset(config.data.dataset, config.data.root, split, **kwargs)


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
    from repro.data.pipeline import depth_stage, knn_stage, prepare_stage, shards_stage
    from repro.train import resolve_checkpoint

    if not isinstance(config, ExperimentConfig):
        config = resolve_entry(config, overrides=overrides)
    work_dir = Path(work_dir) if work_dir is not None else default_work_dir()
    paths, d = data_paths(config, work_dir), config.data
    timings = {} if timings is None else timings
    weights = os.path.expandvars(d.depth_weights) if d.depth_weights else None

    def timed(stage: str, fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
        return out

    with _locked(work_dir / "data" / f".{d.dataset}.lock"):
        for split, crops, size, five, codec in ((d.train_split, paths.crops, d.crop_size, d.five_crop, d.train_crop_codec),
                                                (d.val_split, paths.val_crops, d.val_size, False, "png")):
            if not (crops / "index.json").is_file():
                timed("prepare", prepare_stage, _dataset(config, split), crops, five_crop=five, size=size,
                      resize=d.resize, codec=codec, score_void=d.score_void, progress=not quiet)
        if paths.depth is not None:
            store = image_depth_store(d.depth_encoding)
            for split, crops, image_depth, out in ((d.train_split, paths.crops, paths.image_depth, paths.depth),
                                                   (d.val_split, paths.val_crops, paths.val_image_depth, paths.val_depth)):
                if d.depth_scope == "image":  # reused when its params match, an error when they do not
                    timed("depth_image", image_depth_stage, _dataset(config, split), image_depth, source=d.depth_source,
                          weights=weights, tta=d.depth_tta, store=store, progress=not quiet)
                timed("depth", depth_stage, crops, out, source=d.depth_source, weights=weights, scope=d.depth_scope,
                      encoding=d.depth_encoding, tta=d.depth_tta, image_depth=image_depth, resize=d.resize,
                      progress=not quiet)
        timed("shards", shards_stage, paths.crops, paths.depth, paths.shards, shard_size=d.shard_size,
              depth_source=d.depth_source)
        timed("knn", knn_stage, paths.shards, paths.knn, arch=config.model.arch, checkpoint=resolve_checkpoint(config),
              k=d.knn_k, dropout=d.knn_dropout, seed=KNN_DROPOUT_SEED)
        if paths.features is not None:
            timed("features", _feature_store, config, paths, quiet)
    return paths


def _feature_store(config: ExperimentConfig, paths: DataPaths, quiet: bool) -> Path:
    """The training crops' frozen features, once per (crops, backbone): :mod:`repro.data.features`."""
    from repro.data.features import feature_store_stage
    from repro.models.backbone import DinoBackbone
    from repro.train import resolve_checkpoint

    checkpoint = resolve_checkpoint(config)
    params = {"crops": str(paths.crops.resolve()), "arch": config.model.arch, "checkpoint": str(checkpoint),
              "pos_embed": config.model.pos_embed}
    if (paths.features / "index.json").is_file():
        return feature_store_stage(paths.crops, paths.features, None, params=params)  # checks params, reuses
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone = DinoBackbone(config.model.arch, checkpoint, pos_embed=config.model.pos_embed).to(device)
    return feature_store_stage(paths.crops, paths.features, backbone, params=params, device=device,
                               progress=not quiet)


def run_dir_for(config: ExperimentConfig, work_dir: str | Path) -> Path:
    """``<work_dir>/<entry>/<fidelity>/seed<S>``: the two fidelities of an entry never share a folder."""
    return Path(work_dir) / (config.name or "unnamed") / config.fidelity / f"seed{config.train.seed}"


class ValidationContext:
    """The frozen backbone and the validation crops of one run, each built on first use.

    One context serves the best-on-val checks during training and the final evaluation, so
    the validation features are computed once per run.
    """

    def __init__(self, config: ExperimentConfig, paths: DataPaths, device: str | None = None) -> None:
        self.config, self.paths = config, paths
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    @functools.cached_property
    def backbone(self):
        """The frozen DINO backbone on :attr:`device`."""
        from repro.models.backbone import DinoBackbone
        from repro.train import resolve_checkpoint

        return DinoBackbone(self.config.model.arch, resolve_checkpoint(self.config),
                            pos_embed=self.config.model.pos_embed).to(self.device)

    @functools.cached_property
    def val(self):
        """The 320 px validation crops (with their depth folder, for the figures)."""
        from repro.evaluate.report import ValidationSet

        return ValidationSet(self.paths.val_crops, self.paths.val_depth, self.config.train.feature_cache_gb)


def evaluate_run(config: ExperimentConfig, run_dir: str | Path, paths: DataPaths, *, quiet: bool = False,
                 device: str | None = None, context: ValidationContext | None = None,
                 variant: str | None = None) -> dict:
    """Evaluate ``model.pt`` (final) and ``best.pt`` (best on val) of a run; write ``metrics.json`` and figures.

    ``context`` reuses the backbone and validation features of training-time validation.
    ``variant`` (see :func:`eval_entry`) writes ``metrics.<variant>.json`` and ``figures.<variant>/`` instead.

    Returns:
        The metrics dictionary (also written to ``<run_dir>/metrics.json``).
    """
    from repro.data.registry import class_names_for, num_classes_for
    from repro.env import collect_env
    from repro.evaluate.report import evaluate_many, result_summary, save_eval_figures, write_json
    from repro.models.bundle import load_parts
    from repro.train import BEST, FINAL

    run_dir = Path(run_dir)
    context = context or ValidationContext(config, paths, device)
    backbone, val, device = context.backbone, context.val, context.device
    k = num_classes_for(config)
    e = config.eval
    metrics: dict = {"entry": config.name, "seed": config.train.seed, "fidelity": config.fidelity,
                     "config_hash": config_hash(config), "dataset": config.data.dataset, "num_images": len(val),
                     "protocol": {"crf": e.crf, "flip": e.flip, "size": config.data.val_size,
                                  "crf_image": e.crf_image if e.crf else None, "resize": config.data.resize}}
    if variant is not None:
        metrics["variant"] = variant
    figures = run_dir / ("figures" if variant is None else f"figures.{variant}")
    loaded = {label: load_parts(run_dir / filename, config, backbone.feature_dim, k)
              for label, filename in (("final", FINAL), ("best_on_val", BEST)) if (run_dir / filename).is_file()}
    # final and best-on-val in one pass over the images: features computed once, CRF pool kept busy
    results = evaluate_many({label: parts.to(device) for label, (parts, _) in loaded.items()}, backbone, val,
                            crf=e.crf, flip=e.flip, crf_processes=e.crf_processes, batch_size=e.batch_size,
                            device=device, keep_first=e.num_figures, crf_image=e.crf_image)
    for label, result in results.items():
        metrics[label] = {"step": loaded[label][1].get("step"), "summary": result_summary(result),
                          "cluster": result.cluster.to_dict(), "linear": result.linear.to_dict()}
        if label == "best_on_val":
            metrics[label]["selection"] = ("highest unsupervised mIoU on the validation set during training "
                                           "(no CRF); that set is also the test set, as in the papers")
        if e.num_figures > 0:
            save_eval_figures(figures / label, result, val, class_names_for(config),
                              title=f"{config.name} ({config.fidelity}) seed {config.train.seed} ({label})")
    metrics["summary"] = metrics["final"]["summary"]
    metrics["env"] = collect_env()
    write_json(run_dir / ("metrics.json" if variant is None else f"metrics.{variant}.json"), metrics)
    return metrics


def _log_to(run_dir: Path) -> logging.Handler:
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "logs" / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("repro").addHandler(handler)
    logging.getLogger("repro").setLevel(logging.INFO)
    return handler


def run_entry(entry: str | Path | ExperimentConfig, *, seed: int | None = None, work_dir: str | Path | None = None,
              overrides: Sequence[str] = (), quiet: bool = False, until: str | None = None) -> Path:
    """Run every stage of one entry and seed; finished stages are skipped.

    Args:
        entry: registered name (``table1/depthg-vits8``), YAML path, or a resolved config.
        seed: overrides ``train.seed``.
        work_dir: the work folder (default :func:`default_work_dir`).
        overrides: ``key.sub=value`` config overrides.
        quiet: no progress bars.
        until: stop after this stage (one of :data:`STAGES`).

    Returns:
        The run folder ``<work_dir>/<entry>/seed<S>``.

    Raises:
        RunBusyError: another live process runs or evaluates the same folder (this call changes nothing).
        FileExistsError: the run folder holds results (checkpoints, model, metrics) of a different
            config. A folder whose earlier attempt produced none of these is reused with the new config.
        ConfigError: an unsafe run name (``--set name=../x``) or a bad config.
        MissingFileError, ShardError, DatasetError, OSError, ...: from the stages (``status.json``
            then says ``failed`` with the error and names the log).
    """
    if until is not None and until not in STAGES:
        raise ValueError(f"until must be one of {STAGES}, got {until!r}")
    config = entry if isinstance(entry, ExperimentConfig) else resolve_entry(entry, seed=seed, overrides=overrides)
    check_run_name(config.name or "unnamed")
    work_dir = Path(work_dir) if work_dir is not None else default_work_dir()
    run_dir = run_dir_for(config, work_dir)
    with _run_lock(run_dir):
        _check_saved_config(config, run_dir)
        return _run_locked(config, run_dir, work_dir, quiet=quiet, until=until)


def _run_locked(config: ExperimentConfig, run_dir: Path, work_dir: Path, *, quiet: bool, until: str | None) -> Path:
    from repro.env import file_record, write_env
    from repro.evaluate.report import write_json
    from repro.train import FINAL, resolve_checkpoint, train

    handler = None
    stage, timings = "prepare", {}
    try:
        _status(run_dir, "running", stage)
        save_config(config, run_dir / "config.yaml")
        checkpoint = resolve_checkpoint(config)
        # R1: which backbone file (the 300-epoch ViT-S/8 or another one given by path) this run used
        write_env(run_dir / "env.json", {"fidelity": config.fidelity, "fidelity_deviations": config.fidelity_deviations,
                                         "backbone_checkpoint": file_record(checkpoint) if checkpoint.is_file() else
                                         {"path": str(checkpoint), "missing": True}})
        handler = _log_to(run_dir)
        log.info("run %s (%s) seed %d in %s", config.name, config.fidelity, config.train.seed, run_dir)
        if config.fidelity_deviations:  # recorded in config.yaml and env.json too
            log.warning("%s (%s) deviates from its fidelity profile: %s", config.name, config.fidelity,
                        "; ".join(f"{k}: {v}" for k, v in config.fidelity_deviations.items()))
        paths = prepare_data(config, work_dir=work_dir, quiet=quiet, timings=timings)
        context = ValidationContext(config, paths)  # one backbone and one validation-feature cache per run
        if until in ("prepare", "depth", "shards", "knn"):
            _status(run_dir, "done", until, timings=timings)
            return run_dir
        stage = "train"
        _status(run_dir, "running", stage, timings=timings)
        if not (run_dir / FINAL).is_file():
            start = time.perf_counter()
            validate = _validator(config, context) if config.train.val_every > 0 else None
            out = train(config, run_dir, shards=paths.shards, knn=paths.knn, validate=validate, quiet=quiet,
                        features=paths.features)
            timings["train"] = time.perf_counter() - start
            if out != run_dir / FINAL:
                _status(run_dir, "running", stage, note="stopped before the last batch; rerun to resume")
                return run_dir
        if until == "train":
            _status(run_dir, "done", stage, timings=timings)
            return run_dir
        stage = "eval"
        _status(run_dir, "running", stage, timings=timings)
        metrics_path = run_dir / "metrics.json"
        if not metrics_path.is_file() or metrics_path.stat().st_mtime < (run_dir / FINAL).stat().st_mtime:
            start = time.perf_counter()
            metrics = evaluate_run(config, run_dir, paths, quiet=quiet, context=context)
            timings["eval"] = time.perf_counter() - start
            metrics["timings_s"] = timings
            write_json(metrics_path, metrics)
        _status(run_dir, "done", stage, timings=timings)
        return run_dir
    except BaseException as exc:
        if not isinstance(exc, SystemExit):
            log.exception("stage %s failed", stage)
            _status_failed(run_dir, stage, exc)
        raise
    finally:
        if handler is not None:
            logging.getLogger("repro").removeHandler(handler)
            handler.close()


def eval_entry(config: ExperimentConfig, *, work_dir: str | Path | None = None, quiet: bool = False) -> tuple[dict, Path]:
    """``repro eval``: evaluate a trained run folder with ``config``, never contradicting its ``config.yaml``.

    The run folder's ``metrics.json`` always describes the config saved next to it. So:

    - ``config`` equal to the saved one on every key that identifies a run
      (:mod:`repro.identity`): the result goes to ``metrics.json``;
    - different only in evaluation keys (``eval.crf``, ``eval.flip``, ...): the result goes to a
      separate file labelled with them, ``metrics.<key>-<value>[_...].json`` (e.g.
      ``metrics.crf-false.json``; figures under ``figures.<label>/``); ``metrics.json`` is untouched;
    - different in anything else (what was trained): refused.

    Returns:
        ``(metrics, path written)``.

    Raises:
        FileNotFoundError: the folder has no ``config.yaml`` (nothing was run there).
        ConfigError: ``config`` differs from the saved config outside ``eval.*`` (names the keys).
        RunBusyError: another live process holds the run folder.
    """
    work_dir = Path(work_dir) if work_dir is not None else default_work_dir()
    check_run_name(config.name or "unnamed")
    run_dir = run_dir_for(config, work_dir)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise FileNotFoundError(f"{saved} not found: {run_dir} holds no run of {config.name}; "
                                "train it first (`repro run` or `repro train`)")
    diff = config_diff(config, load_config(saved, base=None))
    trained = {k: v for k, v in diff.items() if not k.startswith("eval.")}
    if trained:
        shown = ", ".join(f"{k}={v[0]!r} (run: {v[1]!r})" for k, v in trained.items())
        raise ConfigError(f"command line: the evaluation config differs from the run's {saved} in what was trained: "
                          f"{shown}; evaluate with the run's config (drop those --set) or train that config "
                          "under another name (--set name=...)")
    variant = "_".join(re.sub(r"[^A-Za-z0-9._-]", "-", f"{k[len('eval.'):]}-{str(v[0]).lower()}")
                       for k, v in diff.items()) or None
    with _run_lock(run_dir):
        metrics = evaluate_run(config, run_dir, data_paths(config, work_dir), quiet=quiet, variant=variant)
    return metrics, run_dir / ("metrics.json" if variant is None else f"metrics.{variant}.json")


def _validator(config: ExperimentConfig, context: ValidationContext):
    """``parts -> unsupervised mIoU`` on the validation crops without CRF (for the best-on-val pick)."""
    from repro.evaluate.report import evaluate_parts

    def validate(parts) -> float:
        return evaluate_parts(parts, context.backbone, context.val, crf=False, batch_size=config.eval.batch_size,
                              device=context.device).cluster.miou

    return validate
