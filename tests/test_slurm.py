"""Array jobs, time limits and requeues on a real single-node SLURM (``tests/slurm_cluster.py``).

``repro.cluster.launch.launch`` runs the demo entry for real (a real entry through ``sbatch slurm/*.sh`` is in
``test_smoke_rehearsal.py``); the time-limit
tests use stand-ins from ``slurm_helpers`` (seconds instead of minutes) that keep the
checkpoint-on-signal contract of ``run_entry``. The local-executor test needs no SLURM.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import slurm_helpers
from repro.cluster.launch import LaunchError, launch

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}
TINY_JOB = {"gpus": 0, "cpus": 1, "mem_gb": 1, "time_min": 1}  # one minute: the time-limit tests need it short


def _state(cluster, job_id: str) -> str:
    """Latest accounting state of a job or array task (``COMPLETED``, ``REQUEUED``, ...)."""
    lines = _history(cluster, job_id, all_attempts=False)
    return lines[-1] if lines else "UNKNOWN"


def _wait(cluster, job_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _state(cluster, job_id)
        if state in TERMINAL:
            return state
        time.sleep(1)
    cluster.run("scancel", job_id.split("_")[0], check=False)
    return f"still {_state(cluster, job_id)} after {timeout:.0f} s"


def _history(cluster, job_id: str, all_attempts: bool = True) -> list[str]:
    """Every attempt's state, oldest first (``-D`` keeps requeued attempts); ``CANCELLED by 0`` -> ``CANCELLED``."""
    flags = ["-D"] if all_attempts else []
    out = cluster.run("sacct", "-j", job_id, "-X", *flags, "-n", "-P", "-o", "State", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _submitit_state(job, timeout: float = 30) -> str:
    """submitit's view of a job once SLURM has finished it (the result file lands a moment earlier)."""
    deadline = time.monotonic() + timeout
    while True:
        state = job.get_info(mode="force").get("State", "UNKNOWN").split()[0]
        if state in TERMINAL or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def _sbatch(cluster, script: Path, *args: str, env: dict[str, str]) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *args, str(script)], env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _logs(folder: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')}" for p in sorted(folder.rglob("*.out")))


@pytest.fixture(scope="module")
def demo(shared_data, tmp_path_factory):
    """A work folder and the overrides that make ``demo/nyuv2-mini`` take seconds (random backbone)."""
    from repro.models.backbone import init_random_checkpoint

    work = tmp_path_factory.mktemp("demo-work")
    ckpt = init_random_checkpoint("vit_small_patch8", work / "dino_random.pth")
    overrides = [f"data.root={shared_data / 'nyuv2-mini'}", f"model.checkpoint={ckpt}", "data.five_crop=false",
                 "train.max_steps=2", "train.batch_size=2", "train.num_workers=0", "train.val_every=0",
                 "eval.crf=false", "eval.num_figures=0"]
    return work, overrides


@pytest.fixture
def helpers_importable(monkeypatch):
    """Jobs started from this test can import ``slurm_helpers`` (submitit pickles functions by module name)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))


@pytest.fixture
def job_env(slurm_cluster, helpers_importable, monkeypatch, tmp_path):
    """Point submitit and sbatch at the test cluster; put the fake ``repro`` and ``apptainer`` first on PATH."""
    fake_bin = slurm_helpers.write_fake_tools(tmp_path / "fake-bin")
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("REPRO_APPTAINER", str(fake_bin / "apptainer"))
    monkeypatch.setenv("FAKE_APPTAINER_LOG", str(tmp_path / "apptainer-calls.txt"))
    return fake_bin


@pytest.mark.slurm
@pytest.mark.slow
def test_launch_runs_a_table_as_one_array_job_and_resumes_a_signalled_task(slurm_cluster, job_env, demo, tmp_path):
    """``launch(["demo"])`` with seeds 1 and 2: one data job, one array of two real ``run_entry`` tasks.

    Task seed 1 gets the time-limit signal (USR1) while training: the trainer checkpoints, submitit
    requeues the task, and the next attempt resumes from the checkpoint and finishes.
    """
    work, overrides = demo
    start = time.monotonic()
    launched = launch(["demo"], seeds=[1, 2], fidelity="paper", executor="slurm", work_dir=work,
                      overrides=[*overrides, "train.max_steps=6", "train.checkpoint_every=1"],
                      log_dir=tmp_path / "submitit", resources={**TINY_JOB, "time_min": 30})
    data = [j for j in launched if j.kind == "data"]
    entries = [j for j in launched if j.kind == "entry"]
    assert len(data) == 1 and [(j.entry, j.seed) for j in entries] == [("demo/nyuv2-mini", 1), ("demo/nyuv2-mini", 2)]
    array_ids = {re.fullmatch(r"(\d+)_(\d+)", j.job_id).group(1) for j in entries}
    assert len(array_ids) == 1, [j.job_id for j in entries]

    signalled = entries[0]
    run_dir = work / "demo" / "nyuv2-mini" / "paper" / "seed1"
    deadline = time.monotonic() + 300
    while not list((run_dir / "train" / "checkpoints").glob("step_*")):  # the training loop is running
        assert time.monotonic() < deadline and _state(slurm_cluster, signalled.job_id) not in TERMINAL, \
            f"seed 1 never reached training: {_state(slurm_cluster, signalled.job_id)}"
        time.sleep(0.5)
    slurm_cluster.run("scancel", "--signal=USR1", signalled.job_id)

    for item in launched:
        try:
            item.job.result()
        except Exception:
            pytest.fail(f"{item} failed:\n{item.job.stdout() or ''}\n{item.job.stderr() or ''}")
        assert _submitit_state(item.job) == "COMPLETED"
        assert item.job.state == "COMPLETED"
    tasks = slurm_cluster.run("sacct", "-j", array_ids.pop(), "-X", "-n", "-P", "-o", "JobID,State").stdout.split()
    assert sorted(tasks) == sorted(f"{j.job_id}|COMPLETED" for j in entries)
    assert _history(slurm_cluster, signalled.job_id)[0] == "REQUEUED"
    log = (run_dir / "logs" / "run.log").read_text()
    assert "received signal" in log and "resumed from" in log, log
    for item in entries:
        metrics = json.loads((work / "demo" / "nyuv2-mini" / "paper" / f"seed{item.seed}" / "metrics.json").read_text())
        assert metrics["seed"] == item.seed and metrics["final"]["step"] == 6
    (record,) = [p for p in (work / "launch").glob("*.json")]
    assert [j["job_id"] for j in json.loads(record.read_text())["jobs"]] == [j.job_id for j in launched]
    print(f"launch demo x 2 seeds, one signalled and requeued: {time.monotonic() - start:.0f} s")


@pytest.mark.slurm
def test_time_limit_checkpoints_requeues_and_resumes(slurm_cluster, job_env, tmp_path):
    """``--time=1 --signal=USR1@59``: USR1 within ~30 s, submitit requeues, the next attempt finishes.

    Two launches at once: ``run_entry`` in the job's Python, and ``repro run`` in an (fake)
    Apptainer image, where the job forwards the signal to its child.
    """
    start = time.monotonic()
    common = dict(seeds=1, fidelity="paper", executor="slurm", resources=TINY_JOB, signal_delay_s=59,
                  log_dir=tmp_path / "submitit")
    in_process = launch(["demo/nyuv2-mini"], work_dir=tmp_path / "w-host", runner=slurm_helpers.interruptible_run,
                        data_runner=slurm_helpers.quick_prepare, **common)
    container = launch(["demo/nyuv2-mini"], work_dir=tmp_path / "w-sif", sif=str(tmp_path / "fake.sif"), **common)
    for launched, work in ((in_process, tmp_path / "w-host"), (container, tmp_path / "w-sif")):
        entry = launched[-1]
        try:
            run_dir = Path(entry.job.result())
        except Exception:
            pytest.fail(f"{entry} failed:\n{entry.job.stdout() or ''}\n{entry.job.stderr() or ''}")
        assert run_dir == work / "demo" / "nyuv2-mini" / "paper" / "seed0"
        assert (work / "data" / "prepared.txt").read_text().split() == ["demo/nyuv2-mini"]
        assert _submitit_state(entry.job) == "COMPLETED"  # waits: the result file lands before SLURM's record
        history = _history(slurm_cluster, entry.job_id)
        assert history[0] == "REQUEUED" and history[-1] == "COMPLETED", history
        if work.name == "w-host":
            progress = json.loads((run_dir / "progress.json").read_text())
            assert progress["attempts"] >= 2 and progress["signals"][0] == "SIGUSR1", progress
            metrics = json.loads((run_dir / "metrics.json").read_text())
            assert metrics["steps"] == progress["step"] > slurm_helpers.MORE_STEPS  # resumed, not restarted
        else:
            metrics = json.loads((run_dir / "metrics.json").read_text())
            assert metrics["attempts"] >= 2 and metrics["steps"] > 5, metrics
            calls = (tmp_path / "apptainer-calls.txt").read_text()
            assert (f"exec --nv --bind {work} {tmp_path / 'fake.sif'} repro run demo/nyuv2-mini --fidelity paper "
                    "--seed 0") in calls
    print(f"time limit + requeue (host and container): {time.monotonic() - start:.0f} s")


@pytest.mark.slurm
def test_sbatch_script_requeues_itself_at_the_time_limit(slurm_cluster, job_env, tmp_path):
    """The shell path: ``--signal=B:USR1@59`` reaches the script, it forwards and requeues; both modes."""
    (tmp_path / "logs" / "repro-nyuv2").mkdir(parents=True)
    # PATH starts with the fake repro and apptainer (job_env); no environment beside the scripts
    env = {**os.environ, "REPRO_ROOT": str(REPO), "VENV": str(tmp_path / "no-venv")}
    (tmp_path / "fake.sif").write_bytes(b"")
    args = [f"--chdir={tmp_path}", "--array=0", "--time=1", "--signal=B:USR1@59", "--gpus-per-node=0",
            "--cpus-per-task=1", "--mem=200M"]
    start = time.monotonic()
    jobs = {
        "host": _sbatch(slurm_cluster, REPO / "slurm" / "nyuv2.sh", *args,
                        f"--export=ALL,ENTRIES=demo/nyuv2-mini,SEEDS=1,FIDELITY=paper,REPRO_WORK={tmp_path / 'w-host'}",
                        env=env),
        "sif": _sbatch(slurm_cluster, REPO / "slurm" / "nyuv2.sh", *args,
                       f"--export=ALL,ENTRIES=demo/nyuv2-mini,SEEDS=1,FIDELITY=paper,REPRO_WORK={tmp_path / 'w-sif'},"
                       f"REPRO_SIF={tmp_path / 'fake.sif'}", env=env),
    }
    for mode, job in jobs.items():
        state = _wait(slurm_cluster, f"{job}_0", timeout=200)
        log = (tmp_path / "logs" / "repro-nyuv2" / f"{job}_0.out").read_text()
        assert state == "COMPLETED", log
        history = _history(slurm_cluster, f"{job}_0")
        assert history[0] == "REQUEUED" and history[-1] == "COMPLETED", history
        assert "caught SIGUSR1" in log and "requeueing job" in log, log
        run_dir = tmp_path / f"w-{mode}" / "demo" / "nyuv2-mini" / "paper" / "seed0"
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["attempts"] >= 2 and metrics["steps"] > 5, (metrics, log)
    calls = (tmp_path / "apptainer-calls.txt").read_text()
    assert f"exec --nv --bind {tmp_path / 'w-sif'} {tmp_path / 'fake.sif'} repro run demo/nyuv2-mini" in calls
    print(f"sbatch script time limit + requeue (host and container): {time.monotonic() - start:.0f} s")


def test_local_executor_runs_the_same_job_path(helpers_importable, tmp_path):
    work = tmp_path / "work"
    launched = launch(["demo"], seeds=2, fidelity="paper", executor="local", work_dir=work, log_dir=tmp_path / "submitit",
                      runner=slurm_helpers.quick_run, data_runner=slurm_helpers.quick_prepare, wait=True)
    assert [(j.kind, j.seed) for j in launched] == [("data", None), ("entry", 0), ("entry", 1)]
    for item in launched[1:]:
        run_dir = Path(item.job.result())
        assert run_dir == work / "demo" / "nyuv2-mini" / "paper" / f"seed{item.seed}"
        assert json.loads((run_dir / "metrics.json").read_text())["data_ready"]  # data job ran first
    assert (tmp_path / "submitit").is_dir() and not (work / "launch" / "logs").exists()
    (record,) = (work / "launch").glob("*.json")
    assert json.loads(record.read_text())["executor"] == "local"

    with pytest.raises(LaunchError, match="planned failure of demo/nyuv2-mini seed 0"):
        launch(["demo/nyuv2-mini"], seeds=1, fidelity="paper", executor="local", work_dir=work,
               log_dir=tmp_path / "submitit",
               runner=slurm_helpers.failing_run, data_runner=slurm_helpers.quick_prepare, wait=True)
