"""``repro run ENTRY``: every stage of one table entry and seed, resumable stage by stage.

The work folder's layout (shared data, run folders) is :mod:`repro.runs.workdir`. A stage whose valid
output exists is skipped, so a rerun (or a requeued SLURM task) continues where the previous one
stopped. A run folder is locked, without waiting (:mod:`repro.runs.rundir`): a second ``repro run`` /
``repro eval`` of it fails at once. Whatever stops a run (any exception, a full disk included),
``status.json`` says ``failed`` with the error; a failed run that produced nothing may be rerun
in place with a corrected config. Under ``accelerate launch`` (several processes), process 0 owns
the run folder and evaluates; the others prepare (under the data lock) and train with it.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from repro.config.loader import ConfigError, load_config, save_config
from repro.config.schema import ExperimentConfig
from repro.utils.errors import MissingFileError
from repro.config.identity import config_diff, config_hash
from repro.runs.rundir import check_saved_config as _check_saved_config
from repro.runs.rundir import record_failure as _status_failed
from repro.runs.rundir import run_lock as _run_lock
from repro.runs.rundir import write_status as _status
from repro.runs.standins import with_stand_ins
from repro.runs.workdir import (DataPaths, data_key, data_paths, default_work_dir, prepare_data,  # noqa: F401
                           prepare_val_crops, resolve_entry, run_dir_for)

__all__ = ["DataPaths", "resolve_entry", "data_key", "data_paths", "prepare_data", "run_dir_for", "run_entry",
           "evaluate_run", "eval_entry", "ValidationContext", "default_work_dir", "STAGES"]  # layout: repro.runs.workdir

log = logging.getLogger("repro.runs.entry")
STAGES = ("prepare", "depth", "shards", "knn", "train", "eval")


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
        from repro.training.loop import resolve_checkpoint

        return DinoBackbone(self.config.model.arch, resolve_checkpoint(self.config),
                            pos_embed=self.config.model.pos_embed,
                            precision=self.config.model.backbone_precision).to(self.device)

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
    from repro.data.datasets.registry import class_names_for, num_classes_for
    from repro.utils.env import collect_env
    from repro.evaluate.report import evaluate_many, result_summary, save_eval_figures, write_json
    from repro.models.bundle import load_parts
    from repro.training.loop import BEST, FINAL

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
    write_json(_metrics_file(run_dir, variant), metrics)
    return metrics


def _metrics_file(run_dir: Path, variant: str | None) -> Path:
    """``metrics.json``, or ``metrics.<variant>.json`` for an evaluation with other ``eval.*`` settings."""
    return run_dir / ("metrics.json" if variant is None else f"metrics.{variant}.json")


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
    work_dir = Path(work_dir) if work_dir is not None else default_work_dir()
    config = with_stand_ins(config, work_dir)
    run_dir = run_dir_for(config, work_dir)
    if _process_rank() > 0:  # accelerate launch: process 0 owns the run folder; this one helps train
        return _run_helper(config, run_dir, work_dir, quiet=quiet, until=until)
    with _run_lock(run_dir):
        _check_saved_config(config, run_dir)
        return _run_locked(config, run_dir, work_dir, quiet=quiet, until=until)


def _process_rank() -> int:
    """This process's rank in a multi-process launch (``accelerate launch`` / ``torchrun`` set ``RANK``); 0 alone."""
    return int(os.environ.get("RANK", "0") or 0)


def _run_helper(config: ExperimentConfig, run_dir: Path, work_dir: Path, *, quiet: bool, until: str | None) -> Path:
    """A process of rank > 0: prepare the data (under the data lock, reused once built) and train along.

    It writes nothing in the run folder but its checkpoint streams (:func:`repro.training.state.save_checkpoint`);
    status, config, evaluation and the final parts are process 0's.
    """
    from repro.training.loop import FINAL, train

    paths = prepare_data(config, work_dir=work_dir, quiet=True)
    if until not in ("prepare", "depth", "shards", "knn") and not (run_dir / FINAL).is_file():
        train(config, run_dir, shards=paths.shards, knn=paths.knn, quiet=True, features=paths.features)
    return run_dir


def _run_locked(config: ExperimentConfig, run_dir: Path, work_dir: Path, *, quiet: bool, until: str | None) -> Path:
    from repro.utils.env import file_record, write_env
    from repro.evaluate.report import write_json
    from repro.training.loop import FINAL, resolve_checkpoint, train

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
      (:mod:`repro.config.identity`): the result goes to ``metrics.json``;
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
    config = with_stand_ins(config, work_dir)
    run_dir = run_dir_for(config, work_dir)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise MissingFileError(f"the run's config ({run_dir} holds no run of {config.name})", saved,
                               "train it first: `repro run` or `repro train` with the same entry, --work-dir and --set")
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
        try:
            prepare_val_crops(config, work_dir, quiet=quiet)  # derived data: rebuilt when the work folder lost it
            metrics = evaluate_run(config, run_dir, data_paths(config, work_dir), quiet=quiet, variant=variant)
        except BaseException as exc:  # the folder says so: never a stale "done" over a failed evaluation
            if not isinstance(exc, (SystemExit, KeyboardInterrupt)):
                _status_failed(run_dir, "eval", exc)
            raise
        if _read_status(run_dir).get("state") == "failed":
            _status(run_dir, "done", "eval")  # a retried evaluation that succeeded
    return metrics, _metrics_file(run_dir, variant)


def _read_status(run_dir: Path) -> dict:
    import json

    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def _validator(config: ExperimentConfig, context: ValidationContext):
    """``parts -> unsupervised mIoU`` on the validation crops without CRF (for the best-on-val pick)."""
    from repro.evaluate.report import evaluate_parts

    def validate(parts) -> float:
        return evaluate_parts(parts, context.backbone, context.val, crf=False, batch_size=config.eval.batch_size,
                              device=context.device).cluster.miou

    return validate
