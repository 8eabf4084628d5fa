"""Run folders of a work dir as ``repro compare`` reads them: one :class:`SeedRun` per seed folder.

Read under the work directory (``$REPRO_WORK``)::

    <entry>/<fidelity>/seed<S>/       a trained run (fidelity ``paper`` or ``released``): config.yaml,
                                      status.json, metrics.json, env.json, train/summary.json
    <entry>/released-checkpoint/      the published checkpoint evaluated by repro: metrics.json with
                                      ``summary`` and ``checkpoint: {file, sha256}``
    <entry>/seed<S>/                  the older layout; its fidelity comes from its config.yaml
    smoke/<entry>/...                 the same layout at the ``smoke`` scale (pipeline checks:
                                      :func:`collect_smoke`; never merged into the record)

``status.json`` is ``{"state": "running" | "done" | "failed", "stage", "log", "updated", "timings"}``;
a done run has ``metrics.json`` (``{"summary": {metric: value}, "best_on_val": {"summary": ...}, "env"}``).
A run is compared with the registered entry in its fidelity by its config's identity
(:mod:`repro.config.identity`); NaN or infinite numbers make a failed run, with the reason.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from repro.config.entries import load_entry
from repro.config.identity import config_diff, config_hash
from repro.results.document import FIDELITIES, METRICS, finite

__all__ = ["SMOKE_DIR", "SeedRun", "collect_runs", "collect_checkpoint", "collect_smoke", "registered_config",
           "registered_paper", "reference_hash", "env_identity"]

SMOKE_DIR = "smoke"
"""Sub-folder of the work dir that holds the runs of the ``smoke`` scale (brief contract 1)."""

_PER_RUN_ENV = {"hostname", "slurm_job_id", "slurm_array_job_id", "slurm_array_task_id", "slurm_job_name",
                "slurm_nodelist", "backbone_checkpoint", "fidelity_deviations"}


@dataclass
class SeedRun:
    """One run directory ``<work>/<entry>/<fidelity>/seed<S>/`` as read from disk.

    ``config`` is the identity hash of its ``config.yaml`` (None if missing or unreadable);
    ``diff`` the identity keys where it differs from the registered entry (``{key: (run, entry)}``);
    ``reason`` why a failed run failed (from ``status.json``, or what is wrong with its files).
    """

    seed: int
    path: Path
    state: str  # done | running | failed | pending
    log: str = ""
    summary: dict[str, float] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    fidelity: str = "paper"
    config: str | None = None
    diff: dict = field(default_factory=dict)
    config_error: str = ""
    reason: str = ""
    date: str = ""
    resources: dict = field(default_factory=dict)
    backbone_sha256: str = ""
    scale: str = "full"


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _numbers(block: object) -> dict[str, float]:
    """The metrics of :data:`METRICS` in a ``summary`` block; NaN and inf are kept (so they can be refused)."""
    if not isinstance(block, dict):
        return {}
    out = {}
    for k, v in block.items():
        if k in METRICS and isinstance(v, (int, float)) and not isinstance(v, bool):
            try:
                out[k] = float(v)
            except OverflowError:  # an integer beyond float range
                out[k] = math.inf
    return out


@functools.lru_cache(maxsize=None)
def _reference(entry: str, fidelity: str):
    """The registered entry's config in ``fidelity`` (None for an unregistered name)."""
    try:
        return load_entry(entry, [f"fidelity={fidelity}"])
    except (KeyError, ValueError, FileNotFoundError):
        return None


def registered_config(entry: str, fidelity: str):
    """The registered entry's resolved config in ``fidelity`` (cached per process; None if not registered).

    Treat it as read-only: it is shared by every caller.
    """
    return _reference(entry, fidelity)


def registered_paper(entry: str) -> dict:
    """The registered entry's paper numbers (``{}`` if not registered)."""
    ref = _reference(entry, FIDELITIES[0])
    return dict(ref.paper) if ref is not None else {}


@functools.lru_cache(maxsize=None)
def reference_hash(entry: str, fidelity: str) -> str | None:
    """:func:`repro.config.identity.config_hash` of the registered entry in ``fidelity``; None if not registered."""
    ref = _reference(entry, fidelity)
    return None if ref is None else config_hash(ref)


def _scale(path: Path, metrics: dict | None) -> str:
    """``smoke`` when the run's config.yaml or metrics.json says ``scale: smoke`` (read as plain YAML/JSON)."""
    if metrics and metrics.get("scale") == "smoke":
        return "smoke"
    try:
        raw = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return "full"
    return "smoke" if isinstance(raw, dict) and raw.get("scale") == "smoke" else "full"


def _date(path: Path, status: dict | None) -> str:
    updated = (status or {}).get("updated")
    if isinstance(updated, str) and updated:
        return updated
    for name in ("metrics.json", "status.json", "config.yaml"):
        if (path / name).is_file():
            stamp = (path / name).stat().st_mtime
            return datetime.fromtimestamp(stamp, timezone.utc).isoformat(timespec="seconds")
    return ""


def _resources(path: Path, config, env: dict, status: dict | None, metrics: dict) -> dict:
    """World size, batch, accelerator type and count, measured wall and accelerator seconds of a done run.

    Wall seconds are the stage timings the finishing invocation recorded (``status.json``, else
    ``metrics.json`` ``timings_s``); a resumed run counts its last attempt only, and a data stage
    another run had built counts 0. Accelerator seconds are wall seconds times the accelerators held.
    """
    out: dict = {}
    summary = _read_json(path / "train" / "summary.json") or {}
    world = summary.get("processes")
    if isinstance(world, int) and not isinstance(world, bool) and world > 0:
        out["world_size"] = world
    if config is not None:
        out["batch_size"] = int(config.train.batch_size)
    cuda = env.get("cuda_available")
    devices = env.get("devices") if isinstance(env.get("devices"), list) else []
    if cuda is True and devices:
        out["accelerator"] = str(devices[0])
        if "world_size" in out:
            out["accelerator_count"] = out["world_size"]
    elif cuda is False:
        out["accelerator"] = "none (CPU)"
        out["accelerator_count"] = 0
    timings = (status or {}).get("timings") or metrics.get("timings_s") or {}
    seconds = [float(v) for v in timings.values() if finite(v) and v >= 0] if isinstance(timings, dict) else []
    if seconds:
        out["wall_s"] = round(sum(seconds), 1)
        if "accelerator_count" in out:
            out["accelerator_s"] = round(out["wall_s"] * out["accelerator_count"], 1)
    return out


def _read_seed(seed: int, path: Path, entry: str, fidelity: str | None, references: dict) -> SeedRun:
    """One run folder; ``fidelity`` None (older layout) takes it from the run's config.yaml."""
    from repro.config.loader import ConfigError, load_config

    run = SeedRun(seed, path, "pending", fidelity=fidelity or "paper")
    status, metrics = _read_json(path / "status.json"), _read_json(path / "metrics.json")
    run.scale = _scale(path, metrics)
    run.date = _date(path, status)
    config = None
    if not (path / "config.yaml").is_file():
        run.config_error = "config.yaml missing"
    elif run.scale == "full":
        try:
            config = load_config(path / "config.yaml", base=None)
        except (ConfigError, OSError) as exc:
            run.config_error = f"config.yaml unreadable: {str(exc).splitlines()[0][:80]}"
        else:
            run.fidelity = fidelity or config.fidelity
            run.config = config_hash(config)
            if run.fidelity not in references:
                references[run.fidelity] = _reference(entry, run.fidelity)
            reference = references[run.fidelity]
            run.diff = config_diff(config, reference) if reference is not None else {}
    if (path / "status.json").is_file() and status is None:
        run.state, run.reason = "failed", "status.json is not valid JSON"
        return run
    state = (status or {}).get("state") or ("done" if metrics else "pending")
    run.log = str((status or {}).get("log") or "")
    if state not in ("done", "running", "failed", "pending"):
        state, run.reason = "failed", f"unknown state {state!r} in status.json"
    elif state == "failed":
        run.reason = str((status or {}).get("error") or "status.json says failed")
    if state == "done" and metrics is None:
        state, run.reason = "failed", "status done but metrics.json missing or invalid"
    run.state = state
    if state != "done":
        return run
    run.summary = _numbers(metrics.get("summary"))
    run.best = _numbers((metrics.get("best_on_val") or {}).get("summary"))
    # final and best-on-val are checked apart: one must not hide a NaN of the other
    bad = [f"final {k}" for k, v in run.summary.items() if not math.isfinite(v)]
    bad += [f"best_on_val {k}" for k, v in run.best.items() if not math.isfinite(v)]
    missing = [m for m in METRICS if m not in run.summary]
    if bad or missing:
        run.state = "failed"
        run.reason = "metrics.json: " + "; ".join(filter(None, ["non-finite " + ", ".join(bad) if bad else "",
                                                              "missing " + ", ".join(missing) if missing else ""]))
        run.summary, run.best = {}, {}
        return run
    env_file = _read_json(path / "env.json") or {}
    run.env = metrics.get("env") or env_file
    run.backbone_sha256 = str((env_file.get("backbone_checkpoint") or {}).get("sha256") or "")
    run.resources = _resources(path, config, run.env, status, metrics)
    return run


def collect_runs(work_dir: str | Path, entry: str, fidelity: str = "paper", *,
                 references: dict | None = None, scale: str = "full") -> list[SeedRun]:
    """Read every ``seed<S>`` directory of an entry in one fidelity.

    Args:
        work_dir: the work directory (``$REPRO_WORK``); for ``scale="smoke"`` pass ``<work>/smoke``.
        entry: entry name, e.g. ``table1/depthg-vits8``.
        fidelity: ``paper`` or ``released``; reads ``<entry>/<fidelity>/seed<S>/`` and those
            ``<entry>/seed<S>/`` (older layout) whose config.yaml says this fidelity (no
            config.yaml: ``paper``).
        references: the registered entry's config by fidelity, to compare each run with
            (resolved here and added when missing; pass one dict for several calls on one entry).
        scale: ``full`` returns the runs of the full scale only, ``smoke`` those whose config or
            metrics say ``scale: smoke`` (or every run, for a folder under ``<work>/smoke``).

    Returns:
        The runs sorted by seed (and path); empty if none. A seed whose ``status.json`` says done
        but whose ``metrics.json`` is unreadable, or lacks a metric, or holds NaN/inf in its final or
        best-on-val numbers, is failed (with the reason).
    """
    root = Path(work_dir) / entry
    references = {} if references is None else references
    in_smoke_tree = scale == "smoke" and Path(work_dir).name == SMOKE_DIR
    runs = []
    for folder, legacy in ((root / fidelity, False), (root, True)):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.is_dir() and re.fullmatch(r"seed\d+", p.name):
                run = _read_seed(int(p.name[4:]), p, entry, None if legacy else fidelity, references)
                if run.fidelity == fidelity and (in_smoke_tree or run.scale == scale):
                    runs.append(run)
    return sorted(runs, key=lambda r: (r.seed, str(r.path)))


def collect_checkpoint(work_dir: str | Path, entry: str) -> dict | None:
    """The published checkpoint's evaluation, ``<work>/<entry>/released-checkpoint/metrics.json``.

    Returns:
        ``{"file", "sha256", "metrics": {metric: value}}``, or None when there is no such file, it
        holds no finite metric, or it was scored at the ``smoke`` scale.
    """
    from repro.runs.workdir import released_metrics_path  # the work folder's module imports torch

    data = _read_json(released_metrics_path(work_dir, entry))
    if data is None or data.get("scale") == "smoke":
        return None
    numbers = {k: v for k, v in _numbers(data.get("summary")).items() if math.isfinite(v)}
    ckpt = data.get("checkpoint") or {}
    if not numbers:
        return None
    return {"file": str(ckpt.get("file") or ""), "sha256": str(ckpt.get("sha256") or ""), "metrics": numbers}


def collect_smoke(work_dir: str | Path, names: list[str]) -> list[dict]:
    """Smoke-scale runs of the registered ``names``: under ``<work>/smoke/`` or saying ``scale: smoke``.

    Returns:
        One row per (entry, fidelity) with any run, in the order of ``names``:
        ``{"entry", "fidelity", "runs": [SeedRun], "checkpoint": dict | None}``; fidelity
        ``released-checkpoint`` for a published checkpoint scored at the smoke scale.
    """
    from repro.runs.workdir import released_metrics_path  # the work folder's module imports torch

    work = Path(work_dir)
    rows = []
    for name in names:
        for fid in FIDELITIES:
            runs = collect_runs(work / SMOKE_DIR, name, fid, scale="smoke") + collect_runs(work, name, fid, scale="smoke")
            if runs:
                rows.append({"entry": name, "fidelity": fid, "runs": runs, "checkpoint": None})
        for root in (work / SMOKE_DIR, work):
            data = _read_json(released_metrics_path(root, name))
            if data is not None and (root != work or data.get("scale") == "smoke"):
                numbers = {k: v for k, v in _numbers(data.get("summary")).items() if math.isfinite(v)}
                rows.append({"entry": name, "fidelity": "released-checkpoint", "runs": [], "checkpoint": numbers})
                break
    return rows


def env_identity(env: dict) -> tuple[str, dict, str]:
    """``(environment id, the environment without per-run keys, host digest)`` of a run's env record."""
    flat = _flatten(env)
    kept = {k: v for k, v in flat.items() if k.split(".")[0] not in _PER_RUN_ENV}
    if "platform" in kept:  # OS and architecture; the kernel build names the machine, env.json keeps it
        parts = kept["platform"].split("-")
        kept["platform"] = "-".join(p for p in (parts[0], next((p for p in parts if p in ("x86_64", "aarch64",
                                                                                       "arm64")), "")) if p)
    digest = hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:12]
    # hosts are told apart, never named: RESULTS.md is shared, the run's env.json keeps the name
    host = hashlib.sha256(str(flat.get("hostname", "?")).encode()).hexdigest()[:8]
    return digest, kept, host


def _flatten(data: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        elif value is not None:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out
