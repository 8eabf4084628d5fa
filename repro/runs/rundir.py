"""The run folder as a unit of work: its lock, its ``status.json``, and the config it belongs to.

- :func:`run_lock`: an exclusive, non-blocking ``flock`` on ``<run_dir>/.lock``. A second
  ``repro run`` / ``repro eval`` of the same folder while the first is alive fails at once with
  :class:`~repro.utils.errors.RunBusyError` naming the holder (``<pid>@<host>``), rather than waiting
  behind a training of hours or training the same folder twice. The lock goes with the process
  (``flock``), so a killed run leaves nothing to clean up.
- :func:`write_status` / :func:`record_failure`: ``{"state", "stage", "log", "updated", ...}``;
  a failure is recorded even when the disk is full (the file is then overwritten in place).
- :func:`check_saved_config`: a folder holding results of another config is refused; one whose
  earlier attempt produced nothing (no checkpoint, model or metrics) is reused with the new config.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from repro.config.loader import ConfigError, config_to_dict, load_config
from repro.config.schema import ExperimentConfig
from repro.utils.errors import OutputExistsError, RunBusyError

__all__ = ["run_lock", "write_status", "record_failure", "check_saved_config"]

log = logging.getLogger("repro.runs.entry")


def _record(run_dir: Path, state: str, stage: str, **extra) -> dict:
    return {"state": state, "stage": stage, "log": str(run_dir / "logs" / "run.log"),
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"), **extra}


def write_status(run_dir: Path, state: str, stage: str, **extra) -> None:
    """Write ``<run_dir>/status.json`` atomically (``state``: running | done | failed)."""
    from repro.evaluate.report import write_json

    write_json(run_dir / "status.json", _record(run_dir, state, stage, **extra))


def record_failure(run_dir: Path, stage: str, exc: BaseException) -> None:
    """Record ``state: failed`` with the error; never raises, so the caller's error is the one seen.

    When the atomic write fails too (full disk, read-only folder), the existing ``status.json``
    is overwritten in place, which needs neither a new file nor, for a few hundred bytes, new space;
    if even that fails, the error goes to stderr.
    """
    error = f"{type(exc).__name__}: {exc}"
    try:
        write_status(run_dir, "failed", stage, error=error)
        return
    except OSError as exc_atomic:
        first = exc_atomic
    path = run_dir / "status.json"
    try:
        with open(path, "r+" if path.exists() else "w") as fh:
            fh.write(json.dumps(_record(run_dir, "failed", stage, error=error)))
            fh.truncate()
    except OSError as second:
        print(f"repro: could not record the failure in {path} ({first}; {second}): {error}", file=sys.stderr)


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's exclusive lock (``<run_dir>/.lock``, created with the folder) or fail at once.

    Raises:
        RunBusyError: another live process holds it (names its ``<pid>@<host>`` from the lock file).
    """
    from repro.utils.files import owner_tag

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise RunBusyError(f"{run_dir} is in use by {holder} (lock {path}); wait for it to finish, or stop it "
                               "and rerun (the run resumes)") from None
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(owner_tag())
            fh.flush()
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def check_saved_config(config: ExperimentConfig, run_dir: Path) -> None:
    """Refuse a run folder that holds results of another config; allow redoing one that produced nothing.

    Raises:
        FileExistsError: ``config.yaml`` differs (or is unreadable) and the folder holds a
            checkpoint, ``model.pt``, ``best.pt`` or ``metrics.json``; names them and the fix.
    """
    from repro.training.loop import BEST, CHECKPOINTS, FINAL

    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    try:
        same = config_to_dict(load_config(saved, base=None)) == config_to_dict(config)
    except (ConfigError, OSError):
        same = False
    if same:
        return
    ckpts = run_dir / "train" / CHECKPOINTS
    produced = [p.name for p in (run_dir / FINAL, run_dir / BEST, run_dir / "metrics.json") if p.exists()]
    produced += [f"train/{CHECKPOINTS}/{p.name}" for p in (ckpts.iterdir() if ckpts.is_dir() else ())]
    if produced:
        raise OutputExistsError(f"{run_dir} holds a run of a different config ({saved}; it produced "
                              f"{', '.join(sorted(produced)[:3])}); use another --work-dir or name, or remove that folder")
    log.warning("%s: replacing the config of an earlier attempt that produced nothing", run_dir)
