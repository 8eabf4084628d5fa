"""What runs on a compute node: one entry and seed (:class:`EntryJob`) or the shared data stages (:class:`DataJob`).

Both are callables that submitit pickles; both have ``checkpoint()``, so a job that receives
the preemption/time-limit signal is requeued with a fresh copy of itself, and the copy resumes
(``run_entry`` skips finished stages and training restarts from its last checkpoint).

In-process (no image) a job calls :func:`repro.runs.entry.run_entry` / :func:`repro.runs.entry.prepare_data`;
the trainer catches USR1/TERM itself, checkpoints and then hands the signal to submitit's
handler. With an Apptainer image it runs ``apptainer exec --nv --bind WORK SIF repro run ...``
(extra options from ``$REPRO_APPTAINER_ARGS``, the binary from ``$REPRO_APPTAINER``), forwards
USR1/TERM to that child and calls submitit's handler once the child has checkpointed and exited.
:func:`resources_for` sizes each job's request. :mod:`repro.cluster.launch` submits them.
"""

from __future__ import annotations

import importlib
import json
import os
import shlex
import signal
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from repro.utils.errors import UserError

__all__ = ["PREEMPT_SIGNAL", "SIGNAL_DELAY_S", "JobError", "Resources", "resources_for", "EntryJob", "DataJob",
           "ReleasedJob", "RELEASED_RESOURCES"]

PREEMPT_SIGNAL = "USR1"
"""The signal SLURM sends before the time limit; the trainer checkpoints on it (``repro.training.loop``)."""
SIGNAL_DELAY_S = 120
"""Seconds between that signal and the time limit."""


class JobError(UserError, RuntimeError):
    """A job that ended without finishing its run (``status.json`` is not ``done``)."""


@dataclass(frozen=True)
class Resources:
    """What one job asks the scheduler for.

    Attributes:
        gpus: GPUs per node (``--gpus-per-node``; 0 asks for none).
        cpus: CPUs per task (``--cpus-per-task``).
        mem_gb: memory in GB (``--mem``).
        time_min: wall-clock limit in minutes (``--time``); a task that reaches it checkpoints and requeues.
    """

    gpus: int = 1
    cpus: int = 8
    mem_gb: int = 32
    time_min: int = 8 * 60


# (dataset) -> (data job, entry with ViT-S/8, entry with ViT-B/8): (hours, GB of memory)
_DEFAULTS: dict[str, tuple[tuple[int, int], tuple[int, int], tuple[int, int]]] = {
    "cocostuff27": ((24, 64), (12, 64), (24, 64)),
    "cityscapes27": ((8, 48), (8, 48), (16, 48)),
    "potsdam3": ((4, 32), (6, 32), (12, 32)),
    "nyuv2": ((2, 16), (2, 16), (4, 16)),
}


def resources_for(config: Any, *, stage: str = "entry", overrides: dict[str, int] | None = None) -> Resources:
    """The default request of one job, from its dataset and backbone.

    Defaults (one GPU, 8 CPUs; sized for one A100-class GPU, time covers 7000 steps plus
    evaluation with CRF, data jobs cover ZoeDepth and the kNN table)::

        dataset        data job     entry ViT-S/8   entry ViT-B/8
        cocostuff27    24 h, 64 GB  12 h, 64 GB     24 h, 64 GB
        cityscapes27    8 h, 48 GB   8 h, 48 GB     16 h, 48 GB
        potsdam3        4 h, 32 GB   6 h, 32 GB     12 h, 32 GB
        nyuv2           2 h, 16 GB   2 h, 16 GB      4 h, 16 GB

    Entries of the ``demo`` table ask for 1 h, 16 GB and 4 CPUs; a config of another scale than
    ``full`` asks for that scale's ``resources`` (``smoke``: no GPU, 1 CPU, 6 GB, 30 min). A task that runs out of time is
    requeued and resumes, so these are slices, not hard limits on a run.

    Args:
        config: an :class:`~repro.config.schema.ExperimentConfig` (reads ``name``, ``scale``,
            ``data.dataset`` and ``model.arch``).
        stage: ``"entry"`` (train + eval of one seed) or ``"data"`` (the shared data stages).
        overrides: values that replace the defaults, keys of :class:`Resources`
            (``{"gpus": 0, "time_min": 30}``).

    Returns:
        The :class:`Resources` of the job.

    Raises:
        ValueError: an unknown ``stage`` or override key.
    """
    if stage not in ("entry", "data"):
        raise ValueError(f"stage must be 'entry' or 'data', got {stage!r}")
    data_job, small, base = _DEFAULTS.get(config.data.dataset, ((8, 32), (8, 32), (16, 32)))
    hours, mem = data_job if stage == "data" else (base if "base" in config.model.arch else small)
    res = Resources(gpus=1, cpus=8, mem_gb=mem, time_min=hours * 60)
    if str(config.name).startswith("demo/"):
        res = Resources(gpus=1, cpus=4, mem_gb=16, time_min=60)
    scale = getattr(config, "scale", "full")
    if scale != "full":  # e.g. smoke: one CPU core, no GPU (repro/config/scales.yaml)
        from repro.config.scales import get_scale

        res = replace(res, **get_scale(scale).resources)
    if overrides:
        unknown = set(overrides) - {f for f in Resources.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown resource key(s) {sorted(unknown)}; known: gpus, cpus, mem_gb, time_min")
        res = replace(res, **{k: int(v) for k, v in overrides.items()})
    return res


def _apptainer_prefix(sif: str, work_dir: Path, binds: Sequence[Path] = ()) -> list[str]:
    binary = os.environ.get("REPRO_APPTAINER", "apptainer")
    extra = shlex.split(os.environ.get("REPRO_APPTAINER_ARGS", ""))
    bind_args = [arg for folder in binds for arg in ("--bind", str(folder))]
    return [binary, "exec", *bind_args, "--nv", "--bind", str(work_dir), *extra, sif]


def _run_forwarding(cmd: list[str]) -> None:
    """Run ``cmd``; forward SIGUSR1/SIGTERM to it, and once it has exited call the handler they had before.

    Under submitit that handler is the requeue handler (checkpoint + ``scontrol requeue`` + exit),
    so a containerised run saves its checkpoint before the job is requeued. The signal handler
    itself only forwards: it must not wait on the child (``Popen.wait`` holds a lock the
    interrupted main-line ``wait`` already owns).

    Raises:
        subprocess.CalledProcessError: the command failed.
    """
    proc = subprocess.Popen(cmd)
    caught: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        caught.append(signum)
        if proc.returncode is None:
            try:
                os.kill(proc.pid, signum)
            except ProcessLookupError:
                pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        returncode = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:  # we are leaving by an exception: do not leave the child behind
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    if caught:
        handler = previous[caught[0]]
        if callable(handler):
            handler(caught[0], None)  # submitit: checkpoint() + requeue + exit
        elif handler != signal.SIG_IGN:
            signal.signal(caught[0], signal.SIG_DFL)
            os.kill(os.getpid(), caught[0])
    if returncode != 0:
        raise subprocess.CalledProcessError(returncode, cmd)


def _set_args(overrides: Sequence[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


class _NodeJob:
    """What the job dataclasses below share: their command inside the image, their call in this Python,
    and submitit's requeue hook (the folders they write hold the progress).

    Subclasses have the fields ``work_dir``, ``sif``, ``quiet`` and ``runner``, define ``command()``,
    and name their in-process function in ``_default_runner`` (``"module:function"``, imported only
    when the job runs without an image).
    """

    _default_runner: ClassVar[str]

    def _in_image(self, cmd: list[str], binds: Sequence[Path] = ()) -> list[str]:
        """``cmd`` behind ``apptainer exec`` with the work folder (and ``binds``) bound, plus ``--quiet``."""
        return [*_apptainer_prefix(self.sif, Path(self.work_dir), binds), *cmd] + (["--quiet"] if self.quiet else [])

    def _execute(self, *args: Any, **kwargs: Any) -> Any:
        """With an image: run :meth:`command` in it, forwarding signals (returns ``None``). Without: call
        ``runner`` (default ``_default_runner``) with ``args``, ``kwargs`` and ``quiet``; return its value.

        Raises:
            subprocess.CalledProcessError: the containerised run failed. Exception: whatever the runner raises.
        """
        if self.sif:
            _run_forwarding(self.command())
            return None
        runner = self.runner
        if runner is None:
            module, name = self._default_runner.split(":")
            runner = getattr(importlib.import_module(module), name)
        return runner(*args, quiet=self.quiet, **kwargs)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit on preemption or the time-limit signal: the same job again.

        Returns:
            ``submitit.helpers.DelayedSubmission`` of a fresh copy with the same arguments; the copy
            resumes (finished stages are skipped, training restarts from its checkpoint).
        """
        import submitit

        return submitit.helpers.DelayedSubmission(replace(self))


@dataclass
class EntryJob(_NodeJob):
    """One (entry, seed) task: ``run_entry`` in this Python, or ``repro run`` inside an Apptainer image.

    A callable that submitit pickles and runs on the node. :meth:`checkpoint` makes it
    requeueable: on preemption or the time-limit signal submitit requeues a fresh copy, whose
    ``run_entry`` skips finished stages and resumes training from its checkpoint.

    Attributes:
        entry: entry name (``table1/depthg-vits8``).
        seed: the training seed (``train.seed``).
        work_dir: the work folder; the run lands in ``<work_dir>/<entry>/<fidelity>/seed<seed>/``.
        fidelity: ``"paper"`` or ``"released"`` (docs/fidelity.md).
        overrides: ``key=value`` config overrides (``--set``).
        sif: Apptainer image; ``None`` runs in-process.
        quiet: no progress bars.
        runner: replaces :func:`repro.runs.entry.run_entry` (same signature); for tests and tools.
    """

    entry: str
    seed: int
    work_dir: str
    fidelity: str = "paper"
    overrides: tuple[str, ...] = ()
    sif: str | None = None
    quiet: bool = False
    runner: Callable[..., Any] | None = None

    _default_runner = "repro.runs.entry:run_entry"

    def command(self) -> list[str]:
        """The container command line (only meaningful with ``sif``)."""
        return self._in_image(["repro", "run", self.entry, "--fidelity", self.fidelity, "--seed", str(self.seed),
                               "--work-dir", str(self.work_dir), *_set_args(self.overrides)])

    def run_dir(self) -> Path:
        """The task's run folder (:func:`repro.runs.workdir.run_dir_for`), where the run writes ``status.json`` and ``metrics.json``."""
        from repro.config.entries import load_entry
        from repro.runs.workdir import run_dir_for

        config = load_entry(self.entry, [f"fidelity={self.fidelity}", *self.overrides, f"train.seed={self.seed}"])
        return run_dir_for(config, self.work_dir)

    def __call__(self) -> str:
        """Run the entry to the end (resuming what a previous attempt finished).

        Returns:
            The run folder, as a string.

        Raises:
            subprocess.CalledProcessError: the containerised run failed.
            JobError: the run returned before it was done (``status.json`` is not ``done``).
            Exception: whatever ``run_entry`` raises (config, data or training errors).
        """
        result = self._execute(self.entry, seed=self.seed, work_dir=self.work_dir,
                               overrides=[f"fidelity={self.fidelity}", *self.overrides])
        run_dir = self.run_dir() if self.sif else Path(result)
        status_file = run_dir / "status.json"
        status = json.loads(status_file.read_text()) if status_file.is_file() else {}
        if status.get("state") != "done":
            raise JobError(f"{self.entry} ({self.fidelity}) seed {self.seed} stopped before it was done (status {status or 'missing'} "
                              f"in {run_dir}); resubmit it to resume")
        return str(run_dir)


@dataclass
class DataJob(_NodeJob):
    """The shared data stages of one data key: :func:`repro.runs.entry.prepare_data` for a representative entry.

    Attributes:
        entry: an entry whose data this prepares (any entry with the key).
        key: its :func:`repro.runs.entry.data_key`.
        work_dir: the work folder (data lands in ``<work_dir>/data/``).
        overrides: ``key=value`` config overrides.
        sif: Apptainer image; ``None`` runs in-process.
        quiet: no progress bars.
        runner: replaces :func:`repro.runs.entry.prepare_data` (same signature); for tests and tools.
    """

    entry: str
    key: str
    work_dir: str
    overrides: tuple[str, ...] = ()
    sif: str | None = None
    quiet: bool = False
    runner: Callable[..., Any] | None = None

    _default_runner = "repro.runs.entry:prepare_data"

    def command(self) -> list[str]:
        """The container command line (only meaningful with ``sif``)."""
        return self._in_image(["repro", "prepare-data", self.entry, "--work-dir",
                               str(self.work_dir), *_set_args(self.overrides)])

    def __call__(self) -> str:
        """Prepare the data (stages already done are skipped).

        Returns:
            The data key.

        Raises:
            subprocess.CalledProcessError: the containerised run failed.
            Exception: whatever ``prepare_data`` raises.
        """
        self._execute(self.entry, work_dir=self.work_dir, overrides=list(self.overrides))
        return self.key


RELEASED_RESOURCES = Resources(gpus=1, cpus=8, mem_gb=32, time_min=120)
"""Request of one published-checkpoint evaluation (validation crops, 2 passes per image, DenseCRF on 8 CPUs)."""


@dataclass
class ReleasedJob(_NodeJob):
    """One published checkpoint scored on its entry's validation set (:func:`repro.runs.released.evaluate_released`).

    Requeueable like :class:`EntryJob`; a rerun skips a checkpoint whose ``metrics.json`` already
    holds its result. With an Apptainer image it runs ``repro eval-released`` inside it (the
    checkpoint's folder is bound too).

    Attributes:
        entry: the table entry. ckpt_file: the ``.ckpt`` file. work_dir: the work folder.
        overrides: ``key=value`` config overrides. sif: Apptainer image or ``None``. quiet: no progress bars.
        runner: replaces :func:`repro.runs.released.evaluate_released` (same signature); for tests and tools.
    """

    entry: str
    ckpt_file: str
    work_dir: str
    overrides: tuple[str, ...] = ()
    sif: str | None = None
    quiet: bool = False
    runner: Callable[..., Any] | None = None

    _default_runner = "repro.runs.released:evaluate_released"

    def command(self) -> list[str]:
        """The container command line (only meaningful with ``sif``)."""
        return self._in_image(["repro", "eval-released", self.entry, "--checkpoint", str(self.ckpt_file),
                               "--work-dir", str(self.work_dir), *_set_args(self.overrides)],
                              binds=[Path(self.ckpt_file).absolute().parent])

    def __call__(self) -> str:
        """Evaluate (or skip a finished evaluation); return the ``metrics.json`` path.

        Raises:
            JobError: no ``metrics.json`` after the run. Exception: whatever the evaluation raises.
        """
        from repro.config.entries import load_entry
        from repro.runs.workdir import released_metrics_path

        self._execute(self.entry, self.ckpt_file, work_dir=self.work_dir, overrides=list(self.overrides))
        scale = load_entry(self.entry, ["fidelity=released", *self.overrides]).scale
        out = released_metrics_path(self.work_dir, self.entry, scale)
        if not out.is_file():
            raise JobError(f"{self.entry} ({self.ckpt_file}): no {out} after the evaluation; resubmit it")
        return str(out)
