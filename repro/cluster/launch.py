"""``repro launch``: every entry of a table (times its seeds) as one SLURM array job, via submitit.

What a launch submits, in order:

1. one *data job* per distinct :func:`repro.runs.entry.data_key` among the entries (crops, depth,
   shards and kNN are shared by every entry with the same dataset, depth source and backbone),
   calling :func:`repro.runs.entry.prepare_data`;
2. one *array job* per table, one task per (entry, fidelity, seed), each calling
   :func:`repro.runs.entry.run_entry`. Under SLURM the array depends on its data jobs
   (``--dependency=afterok:...``, ``--kill-on-invalid-dep=yes``); the local executor runs the data
   jobs first and then the entries, ``array_parallelism`` at a time (default one at a time).

Preemption and time limits: jobs ask for ``--signal=USR1@120`` and ``--requeue``, and submitit's
handler listens on USR1 (``SUBMITIT_PREEMPT_SIGNAL=USR1``). The trainer checkpoints on USR1 and
then calls that handler, which asks :meth:`EntryJob.checkpoint` for a fresh copy of the job and
requeues it; the requeued task calls ``run_entry`` again, which skips finished stages and
resumes training from the checkpoint.

Containers: with ``sif`` (or ``$REPRO_SIF``) a job runs ``repro run`` inside the image and
forwards USR1/TERM to it (:mod:`repro.cluster.jobs`); without, it calls ``run_entry`` in the job's own Python.

Every launch writes ``<work_dir>/launch/<timestamp>.json`` (job ids, entries, seeds, run folders);
submitit's pickles and logs go to ``log_dir`` (default ``<work_dir>/launch/logs/<job id>/``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from repro.cluster.jobs import (
    PREEMPT_SIGNAL, RELEASED_RESOURCES, SIGNAL_DELAY_S, DataJob, EntryJob, JobError, ReleasedJob, Resources, resources_for,
)
from repro.config.fidelity import profiles_for
from repro.config.scales import get_scale, scale_root
from repro.utils.errors import UserError

__all__ = [
    "Resources",
    "resources_for",
    "EntryJob",
    "DataJob",
    "JobError",
    "LaunchedJob",
    "submitting",
    "LaunchError",
    "resolve_targets",
    "launch",
    "launch_released",
]


class LaunchError(UserError, RuntimeError):
    """A launch that cannot be submitted, or (with ``wait``) jobs that failed; the message names them."""


MULTI_GPU_REFUSED = (
    "--gpus {n}: an entry job starts ONE training process, so {idle} of the {n} GPUs would sit idle (no "
    "data-parallel launch is implemented); use --gpus 1 (the default): every (entry, fidelity, seed) is its own "
    "single-GPU array task, which is the cheaper shape for these runs (see `repro plan`)")


def _check_gpus(resources: dict | None) -> None:
    """Refuse ``gpus > 1``: :class:`EntryJob` runs one process, so extra GPUs would be paid for and unused.

    Raises:
        LaunchError: ``resources["gpus"]`` is above 1 (or negative).
    """
    n = (resources or {}).get("gpus")
    if n is None:
        return
    if int(n) < 0:
        raise LaunchError(f"--gpus must be 0 or 1, got {n}")
    if int(n) > 1:
        raise LaunchError(MULTI_GPU_REFUSED.format(n=int(n), idle=int(n) - 1))


def _max_resources(items: Sequence[Resources]) -> Resources:
    return Resources(*(max(getattr(r, f) for r in items) for f in ("gpus", "cpus", "mem_gb", "time_min")))


# --------------------------------------------------------------------------------------- planning
def resolve_targets(targets: Sequence[str]) -> dict[str, list[str]]:
    """Expand table keys and entry names into entries grouped by table.

    Args:
        targets: table keys (``table1``, ``demo``) and/or entry names (``table2/stego-vitb8``).

    Returns:
        ``{table: [entry, ...]}`` in the order first seen, without duplicates.

    Raises:
        UnknownEntryError: an unknown table or entry (with close matches).
        LaunchError: no targets.
    """
    from repro.config.entries import TABLES, entry_path, list_entries

    if not targets:
        raise LaunchError("nothing to launch: name table keys (table1, demo, ...) or entries (table1/depthg-vits8)")
    groups: dict[str, list[str]] = {}
    for target in targets:
        names = list_entries(target) if target in TABLES else [target.removesuffix(".yaml").strip("/")]
        for name in names:
            entry_path(name)  # raises for an unknown name
            table = name.split("/", 1)[0]
            if name not in groups.setdefault(table, []):
                groups[table].append(name)
    return groups


@dataclass
class LaunchedJob:
    """One submitted job of a launch.

    Attributes:
        kind: ``"data"`` or ``"entry"``.
        entry: the entry it runs (for a data job: the representative entry of its key).
        seed: the seed (``None`` for a data job).
        data_key: the :func:`repro.runs.entry.data_key` it prepares or reads.
        job: the submitit job (``job.job_id``, ``job.state``, ``job.result()``); ``None`` in a dry run.
        record: the launch record ``<work_dir>/launch/<timestamp>.json`` listing every job of the launch.
        fidelity: the run's profile (``paper`` / ``released``); for a data job, the profile it prepares for.
    """

    kind: str
    entry: str
    seed: int | None
    data_key: str
    job: Any = field(repr=False)
    record: Path | None = None
    fidelity: str = "paper"

    @property
    def job_id(self) -> str:
        """The scheduler's id (``1234_5`` for an array task, a pid for the local executor)."""
        return str(self.job.job_id)


def seed_numbers(seeds: int | Sequence[int]) -> list[int]:
    if isinstance(seeds, int):
        if seeds < 1:
            raise LaunchError(f"seeds must be >= 1, got {seeds}")
        return list(range(seeds))
    out = [int(s) for s in seeds]
    if not out or len(set(out)) != len(out):
        raise LaunchError(f"seeds must be a non-empty list without repeats, got {out}")
    return out


def _executor_kind(executor: str, dry_run: bool = False) -> str:
    """``"slurm"`` or ``"local"``; ``auto`` is slurm where sbatch is on PATH. A dry run submits nothing, so it may
    plan SLURM jobs on a machine without sbatch (a laptop, a CI runner)."""
    if executor == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    if executor not in ("slurm", "local"):
        raise LaunchError(f"executor must be slurm, local or auto, got {executor!r}")
    if executor == "slurm" and not dry_run and not shutil.which("sbatch"):
        raise LaunchError("--executor slurm (make: EXECUTOR=slurm) but there is no sbatch on PATH: run on a SLURM "
                          "login node, or use --executor local (make: EXECUTOR=local) to run the jobs on this machine")
    return executor


def _make_executor(kind: str, log_dir: Path, res: Resources, name: str, *, partition: str | None,
                   parallelism: int, dependency: list[str], signal_delay_s: int):
    """A submitit executor for one job or array; ``dependency`` holds sbatch terms (``afterok:12:13``)."""
    import submitit

    executor = submitit.AutoExecutor(folder=str(log_dir / "%j"), cluster=kind, slurm_max_num_timeout=50)
    params: dict[str, Any] = {"timeout_min": res.time_min, "cpus_per_task": res.cpus, "mem_gb": res.mem_gb,
                              "name": name, "stderr_to_stdout": True}
    setup = [f"export SUBMITIT_PREEMPT_SIGNAL={PREEMPT_SIGNAL}"]
    if kind == "slurm":
        extra: dict[str, Any] = {"requeue": True, "signal": f"{PREEMPT_SIGNAL}@{signal_delay_s}"}
        if dependency:
            extra.update({"dependency": ",".join(dependency), "kill-on-invalid-dep": "yes"})
        params.update(slurm_array_parallelism=parallelism, slurm_setup=setup, slurm_additional_parameters=extra,
                      slurm_signal_delay_s=signal_delay_s)
        if res.gpus:
            params["gpus_per_node"] = res.gpus
        if partition:
            params["slurm_partition"] = partition
    else:
        params.update(local_setup=setup, gpus_per_node=res.gpus)
    executor.update_parameters(**params)
    return executor


def _run_local(executor: Any, jobs: list[Any], parallelism: int) -> list[Any]:
    """Run callables through a local executor, ``parallelism`` at a time; return their jobs when all ended."""
    running: list[Any] = []
    submitted: list[Any] = []
    for fn in jobs:
        while len([j for j in running if not j.done()]) >= parallelism:
            time.sleep(0.5)
        job = executor.submit(fn)
        running.append(job)
        submitted.append(job)
    for job in submitted:
        job.wait()
    return submitted


def _reason(exc: Exception) -> str:
    """The last line of a failed job's traceback (submitit wraps it between dashed lines) and its log."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    dashes = [i for i, line in enumerate(lines) if set(line) == {"-"}]
    reason = lines[dashes[-1] - 1] if len(dashes) >= 2 else (lines[-1] if lines else type(exc).__name__)
    log = next((line[2:] for line in lines if line.startswith("- ")), None)
    return f"{reason} (log: {log})" if log else reason


def _failures(launched: Sequence[LaunchedJob]) -> list[str]:
    out = []
    for item in launched:
        try:
            item.job.result()
        except Exception as exc:  # noqa: BLE001 - collected into one error
            seed = "" if item.seed is None else f" seed {item.seed}"
            out.append(f"{item.kind} {item.entry}{seed} (job {item.job_id}): {_reason(exc)}")
    return out


def _raise_failures(launched: Sequence[LaunchedJob], what: str, record: Path) -> None:
    """Raise one :class:`LaunchError` naming every failed job of ``launched`` (``what``: "job(s)", ...)."""
    failed = _failures(launched)
    if failed:
        raise LaunchError(f"{len(failed)} {what} failed (record: {record}):\n  " + "\n  ".join(failed))


def _request(res: Resources, partition: str | None) -> str:
    return (f"{res.gpus} GPU(s), {res.cpus} CPU(s), {res.mem_gb} GB, {res.time_min} min, "
            f"partition {partition or '(the cluster default)'}")


@contextlib.contextmanager
def submitting(what: str, res: Resources, partition: str | None) -> Iterator[None]:
    """Turn a refused submission (sbatch's error, no sbatch, submitit's failure) into one :class:`LaunchError`.

    The message names the refused request and the flags (``repro launch``) and make variables
    (``make reproduce-*``) that change it; ``REPRO_DEBUG=1`` keeps the traceback (``repro.cli.main.main``).
    """
    import io
    import subprocess
    import sys

    import submitit

    echoed = io.StringIO()  # submitit prints sbatch's stderr itself before raising: kept for success only
    try:
        with contextlib.redirect_stderr(echoed):
            yield
        sys.stderr.write(echoed.getvalue())
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError,
            subprocess.CalledProcessError, FileNotFoundError) as exc:
        text = " ".join(str(getattr(exc, "stderr", None) or exc).split())
        reason = next((part.strip() for part in reversed(text.split("sbatch: error:")) if part.strip()), text)
        if "sbatch: error:" in text:
            reason = "sbatch: error: " + reason
        raise LaunchError(f"the scheduler refused {what} ({_request(res, partition)}): {reason[:300]}; change the "
                          "request with --gpus/--cpus/--mem-gb/--time-min/--partition (make: GPUS= CPUS= MEM_GB= "
                          "TIME_MIN= PARTITION=), or try it first with --dry-run (make: DRY_RUN=1)") from exc


def _submit_array(executor: Any, kind: str, jobs: list[Any], parallelism: int) -> list[Any]:
    """Submit ``jobs`` as one SLURM array (one ``sbatch``), or run them locally, ``parallelism`` at a time."""
    if kind == "local":
        return _run_local(executor, jobs, parallelism)
    with executor.batch():
        return [executor.submit(job) for job in jobs]


def _launch_folders(work_dir: str | Path | None, scale: str, log_dir: str | Path | None) -> tuple[Path, Path, Path]:
    """(work folder, its scale root, submitit log folder) of a launch, all absolute; defaults as for ``launch``."""
    from repro.runs.entry import default_work_dir

    work = Path(work_dir if work_dir is not None else default_work_dir()).absolute()
    root = scale_root(work, scale)
    return work, root, Path(log_dir).absolute() if log_dir is not None else root / "launch" / "logs"


def launch(targets: Sequence[str], *, seeds: int | Sequence[int] = 1, fidelity: str = "both", executor: str = "auto",
           work_dir: str | Path | None = None, overrides: Sequence[str] = (), partition: str | None = None,
           sif: str | None = None, log_dir: str | Path | None = None, wait: bool = False,
           resources: dict[str, int] | None = None, array_parallelism: int | None = None,
           signal_delay_s: int = SIGNAL_DELAY_S, quiet: bool = True, runner: Callable[..., Any] | None = None,
           data_runner: Callable[..., Any] | None = None, dry_run: bool = False,
           scale: str = "full") -> list[LaunchedJob]:
    """Submit tables or entries: data jobs per shared data key, then one array job per table.

    Args:
        targets: table keys (``table1``, ``supp4``, ``demo``) and/or entry names.
        seeds: ``K`` runs seeds ``0..K-1``; a list runs exactly those seeds.
        fidelity: ``"paper"``, ``"released"`` or ``"both"`` (every entry in both profiles).
        executor: ``"slurm"``, ``"local"`` (this machine, no scheduler) or ``"auto"``
            (``slurm`` when ``sbatch`` is on ``PATH``).
        work_dir: the work folder shared by all jobs (default ``$REPRO_WORK`` or ``./runs``); must
            be on a file system every node sees.
        overrides: ``key=value`` config overrides for every entry (``--set``).
        partition: SLURM partition (default: the cluster's default partition).
        sif: Apptainer image to run the jobs in (default ``$REPRO_SIF``; unset: the job's Python).
        log_dir: submitit's folder for pickles and logs (default ``<work_dir>/launch/logs``).
        wait: block until every job ended; raise if one failed. The local executor always blocks.
        resources: overrides of :func:`resources_for` for every job (``{"gpus": 0, "time_min": 30}``).
            An array asks for the largest request among its entries.
        array_parallelism: most tasks of one array running at once (SLURM default: all;
            local default: 1).
        signal_delay_s: seconds before the time limit at which SLURM sends USR1.
        quiet: no progress bars in the jobs' logs.
        runner: replaces :func:`repro.runs.entry.run_entry` in the jobs (tests, tools).
        data_runner: replaces :func:`repro.runs.entry.prepare_data` in the data jobs.
        dry_run: plan and record, submit nothing (the jobs' ``job`` is ``None``).
        scale: ``full`` (the registered entries) or ``smoke`` (repro/config/scales.yaml: a dress rehearsal
            of every stage on a few images, with the scale's one-CPU request; runs, data, logs and the
            launch record under ``<work_dir>/smoke/``).

    Returns:
        The :class:`LaunchedJob` records: data jobs first, then one per (entry, fidelity, seed) in table order.

    Raises:
        UnknownEntryError: an unknown table or entry.
        ConfigError: an invalid override.
        LaunchError: bad arguments, a failed data job under the local executor, or (with ``wait``)
            failed jobs, each named with its job id.
    """
    from repro.config.entries import load_entry
    from repro.runs.entry import data_key

    _check_gpus(resources)
    kind = _executor_kind(executor, dry_run)
    seed_list = seed_numbers(seeds)
    try:
        profiles = profiles_for(fidelity)
        get_scale(scale)
    except ValueError as exc:
        raise LaunchError(str(exc)) from None
    work, root, logs = _launch_folders(work_dir, scale, log_dir)
    sif = sif or os.environ.get("REPRO_SIF") or None
    sif = str(Path(sif).absolute()) if sif else None
    overrides = ((f"scale={scale}",) if scale != "full" else ()) + tuple(overrides)
    groups = resolve_targets(targets)
    # runs are (entry, fidelity); the data of two runs is shared when their data keys are equal
    configs = {(name, f): load_entry(name, [f"fidelity={f}", *overrides])
               for names in groups.values() for name in names for f in profiles}
    keys = {run: data_key(cfg) for run, cfg in configs.items()}
    representative: dict[str, tuple[str, str]] = {}
    for run, key in keys.items():
        representative.setdefault(key, run)
    common = {"work_dir": str(work), "overrides": overrides, "sif": sif, "quiet": quiet}

    launched: list[LaunchedJob] = []
    data_ids: dict[str, str] = {}
    # 1. shared data stages; keys of one dataset run one after another (they share crops and a lock)
    last_of_dataset: dict[str, str] = {}
    for key, (name, profile) in representative.items():
        dataset = configs[name, profile].data.dataset
        res = resources_for(configs[name, profile], stage="data", overrides=resources)
        job = DataJob(entry=name, key=key, runner=data_runner,
                      **{**common, "overrides": (f"fidelity={profile}", *overrides)})
        submitted = None
        if not dry_run:
            after = [f"afterany:{last_of_dataset[dataset]}"] if dataset in last_of_dataset and kind == "slurm" else []
            ex = _make_executor(kind, logs, res, f"repro-data-{dataset}", partition=partition,
                                parallelism=1, dependency=after, signal_delay_s=signal_delay_s)
            with submitting(f"the data job of {dataset}", res, partition):
                submitted = _run_local(ex, [job], 1)[0] if kind == "local" else ex.submit(job)
            data_ids[key] = last_of_dataset[dataset] = str(submitted.job_id)
        launched.append(LaunchedJob("data", name, None, key, submitted, fidelity=profile))
    if kind == "local" and not dry_run:
        failed = _failures([j for j in launched if j.kind == "data"])
        if failed:
            raise LaunchError("data stages failed, no entry was started:\n  " + "\n  ".join(failed))

    # 2. one array per table
    for table, names in groups.items():
        tasks = [(name, f, seed) for name in names for f in profiles for seed in seed_list]
        res = _max_resources([resources_for(configs[n, f], overrides=resources) for n in names for f in profiles])
        jobs = [EntryJob(entry=name, seed=seed, fidelity=f, runner=runner, **common) for name, f, seed in tasks]
        submitted_jobs: list[Any] = [None] * len(jobs)
        if not dry_run:
            parallel = array_parallelism or (len(jobs) if kind == "slurm" else 1)
            deps = (["afterok:" + ":".join(sorted({data_ids[keys[n, f]] for n in names for f in profiles}))]
                    if kind == "slurm" else [])
            ex = _make_executor(kind, logs, res, f"repro-{table}", partition=partition, parallelism=parallel,
                                dependency=deps, signal_delay_s=signal_delay_s)
            with submitting(f"the {table} array ({len(jobs)} tasks)", res, partition):
                submitted_jobs = _submit_array(ex, kind, jobs, parallel)
        launched += [LaunchedJob("entry", name, seed, keys[name, f], sj, fidelity=f)
                     for (name, f, seed), sj in zip(tasks, submitted_jobs, strict=True)]

    record = _write_record(work, root, kind, list(targets), seed_list, overrides, sif, logs, launched, dry_run)
    for item in launched:
        item.record = record
    if wait and not dry_run:
        _raise_failures(launched, "job(s)", record)
    return launched


def _write_record(work: Path, root: Path, kind: str, targets: list[str], seeds: list[int], overrides: tuple[str, ...],
                  sif: str | None, logs: Path, launched: list[LaunchedJob], dry_run: bool) -> Path:
    folder = root / "launch"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = folder / f"{stamp}.json"
    n = 1
    while path.exists():
        n += 1
        path = folder / f"{stamp}-{n}.json"
    payload = {
        "created": datetime.now().astimezone().isoformat(timespec="seconds"),
        "executor": kind, "dry_run": dry_run, "targets": targets, "seeds": seeds, "overrides": list(overrides),
        "sif": sif, "work_dir": str(work), "log_dir": str(logs),
        "jobs": [{"kind": j.kind, "entry": j.entry, "fidelity": j.fidelity, "seed": j.seed, "data_key": j.data_key,
                  "job_id": None if j.job is None else j.job_id,
                  "run_dir": None if j.seed is None else str(root / j.entry / j.fidelity / f"seed{j.seed}")}
                 for j in launched],
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


# --------------------------------------------------------------------------------------- command line


def launch_released(*, folder: str | Path | None = None, executor: str = "auto", work_dir: str | Path | None = None,
                    overrides: Sequence[str] = (), partition: str | None = None, sif: str | None = None,
                    log_dir: str | Path | None = None, wait: bool = False, resources: dict[str, int] | None = None,
                    quiet: bool = True, runner=None, dry_run: bool = False, scale: str = "full") -> list:
    """Every present published checkpoint as one array job (submitit), one task per file.

    Args:
        folder: where the files are (default :func:`released_dir`); absent files are skipped.
        executor, work_dir, overrides, partition, sif, log_dir, wait, quiet, runner, dry_run: as in
            :func:`repro.cluster.launch.launch` (``runner`` replaces :func:`evaluate_released`).
        resources: overrides of :data:`repro.cluster.jobs.RELEASED_RESOURCES` (``{"gpus": 0}``), after the scale's.
        scale: ``full``, or ``smoke``: every registered file, a missing one replaced by a random-weight stand-in
            (:func:`repro.runs.standins.released_stand_in`), scored on the first validation images under
            ``<work>/smoke/`` with the scale's resources.

    Returns:
        :class:`repro.cluster.launch.LaunchedJob` records (kind ``"released"``), one per present file.

    Raises:
        LaunchError: no published checkpoint is present, or (with ``wait``) failed tasks.
    """
    from repro.runs.released import load_registry, local_path, released_dir
    from repro.runs.workdir import released_metrics_path

    kind = _executor_kind(executor, dry_run)
    try:
        spec = get_scale(scale)
    except ValueError as exc:
        raise LaunchError(str(exc)) from None
    work, root, logs = _launch_folders(work_dir, scale, log_dir)
    sif = sif or os.environ.get("REPRO_SIF") or None
    present = [(item, local_path(item, folder).absolute()) for item in load_registry()]
    present = [(item, path) for item, path in present if path.is_file() or spec.stand_ins]
    if not present:
        raise LaunchError(f"no published checkpoint found in {Path(folder or released_dir()).absolute()}; "
                          "`repro released list` shows the files and where they are published")
    res = replace(RELEASED_RESOURCES, **{**spec.resources, **(resources or {})})
    overrides = ((f"scale={scale}",) if scale != "full" else ()) + tuple(overrides)
    jobs = [ReleasedJob(item.entry, str(path), str(work), overrides, sif, quiet, runner) for item, path in present]
    submitted: list = [None] * len(jobs)
    if not dry_run:
        ex = _make_executor(kind, logs, res, "repro-released", partition=partition,
                            parallelism=len(jobs) if kind == "slurm" else 1, dependency=[], signal_delay_s=SIGNAL_DELAY_S)
        with submitting(f"the released-checkpoint array ({len(jobs)} tasks)", res, partition):
            submitted = _submit_array(ex, kind, jobs, 1)
    launched = [LaunchedJob("released", item.entry, None, item.name, job) for (item, _), job in zip(present, submitted)]
    record = root / "launch" / f"released-{time.strftime('%Y%m%d-%H%M%S')}.json"
    from repro.evaluate.report import write_json

    write_json(record, {"executor": kind, "dry_run": dry_run, "work_dir": str(work), "log_dir": str(logs), "sif": sif,
                        "jobs": [{"name": item.name, "entry": item.entry, "file": str(path),
                                  "job_id": None if j.job is None else j.job_id,
                                  "metrics": str(released_metrics_path(work, item.entry, scale))}
                                 for (item, path), j in zip(present, launched)]})
    for item in launched:
        item.record = record
    if wait and not dry_run:
        _raise_failures(launched, "evaluation(s)", record)
    return launched
