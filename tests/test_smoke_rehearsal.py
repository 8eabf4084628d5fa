"""The dress rehearsal as a new cluster user runs it: README commands, a real SLURM, data as published.

Tiny fake datasets in the layouts the datasets are published in (:mod:`published_datasets`), no
weights at all (the smoke scale writes random stand-ins), and the README's verbs verbatim:
``make reproduce-table1 SCALE=smoke``, one entry of every other table through ``repro launch
--scale smoke`` (what every other ``make reproduce-*`` target runs), ``make reproduce-checkpoints
SCALE=smoke``, then ``make results``. Every run must reach ``done``, the smoke block must list
every one of them, and every other block of RESULTS.md must be byte-identical to a regeneration
without them. A second test submits ``slurm/cityscapes.sh`` with nothing on PATH but the system's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import published_datasets as pub

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
REPRO = Path(sys.prefix) / "bin" / "repro"  # the environment `make test` made (VENV, default .venv)
OTHER_TABLES = ["table2/depthg-vitb8", "table3/depthg-lhp-vits8", "table4/fps", "table5/midas",
                "table6/attention-lhp", "supp3/perspective-plane-potsdam", "supp4/n6", "supp5/scheduling",
                "supp6/sensor"]
"""One entry of every table but Table 1: every dataset, both backbones, every depth source repro estimates.

They run in the paper profile: Table 1 covers the released profile's code paths (and the published
checkpoints its evaluation on Cityscapes and Potsdam), which keeps CI within its hour on 2 cores."""


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> Path:
    """``$REPRO_DATA`` with ``cocostuff/`` (STEGO's copy), ``cityscapes/``, ``potsdam/`` and ``nyuv2/`` (converted)."""
    from repro.data.datasets.nyuv2_convert import convert_nyuv2

    root = tmp_path_factory.mktemp("datasets")
    pub.write_cocostuff_stego(root / "cocostuff", n_train=5, n_val=3)
    pub.write_cityscapes(root / "cityscapes", per_city=2)
    pub.write_potsdam(root / "potsdam", n_labelled_train=4, n_labelled_test=2, n_unlabelled=3)
    src = pub.write_nyuv2(root / "nyu-official", train=(2, 3, 6, 7), test=(1, 4, 5), n_frames=8)
    meta = src / "nyuv2-meta-data"
    convert_nyuv2(src / "nyu_depth_v2_labeled.mat", src / "splits.mat",
                  [meta / "classMapping40.mat", meta / "class13Mapping.mat"], root / "nyuv2", progress=False)
    return root


def _env(cluster, data: Path, work: Path, weights: Path) -> dict[str, str]:
    env = dict(cluster.env)
    env.update(REPRO_DATA=str(data), REPRO_WORK=str(work), REPRO_WEIGHTS=str(weights))
    env.pop("REPRO_SIF", None)
    return env


def _make(*args: str, env: dict[str, str], timeout: float = 600) -> str:
    proc = subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"make {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _job_ids(records: list[Path]) -> list[str]:
    ids = []
    for record in records:
        ids += [j["job_id"] for j in json.loads(record.read_text())["jobs"] if j.get("job_id")]
    return ids


def _wait_for(cluster, job_ids: list[str], timeout: float) -> dict[str, str]:
    """Wait until every job (array tasks included) has left the queue; return ``{task id: final state}``."""
    base = sorted({i.split("_")[0] for i in job_ids})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queued = cluster.run("squeue", "-h", "-o", "%i", "-j", ",".join(base), check=False).stdout.split()
        if not queued:
            break
        time.sleep(5)
    else:
        pytest.fail(f"jobs {base} still queued after {timeout:.0f} s:\n"
                    + cluster.run("squeue", "-o", "%i %T %R", check=False).stdout)
    states: dict[str, str] = {}
    for _ in range(30):  # accounting lags the queue by a moment
        out = cluster.run("sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(base), check=False).stdout
        states = dict(line.split("|", 1) for line in out.split() if "|" in line)
        if states and all(s not in ("PENDING", "RUNNING", "REQUEUED") for s in states.values()):
            break
        time.sleep(1)
    return states


def _blocks(text: str) -> dict[str, str]:
    return dict(re.findall(r"<!-- repro:begin (\S+) -->(.*?)<!-- repro:end \1 -->", text, flags=re.S))


def test_smoke_rehearsal_of_every_table_through_make_and_slurm(slurm_cluster, datasets, tmp_path):
    work, weights = tmp_path / "work", tmp_path / "no-weights-yet"
    env = _env(slurm_cluster, datasets, work, weights)
    start = time.monotonic()
    _make("reproduce-table1", "SCALE=smoke", "EXECUTOR=slurm", env=env)
    launch = [str(REPRO), "launch", *OTHER_TABLES, "--scale", "smoke", "--executor", "slurm",
              "--seeds", "1", "--fidelity", "paper", "--work-dir", str(work)]
    proc = subprocess.run(launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    _make("reproduce-checkpoints", "SCALE=smoke", "EXECUTOR=slurm", env=env)
    records = sorted((work / "smoke" / "launch").glob("*.json"))
    assert len(records) == 3 and not (work / "launch").exists()  # rehearsal records never mix with real ones
    states = _wait_for(slurm_cluster, _job_ids(records), timeout=2400)
    wall = time.monotonic() - start
    failed = {job: s for job, s in states.items() if s != "COMPLETED"}
    logs = sorted((work / "smoke" / "launch" / "logs").rglob("*.out"))
    assert not failed, f"jobs not COMPLETED: {failed}\n" + "\n".join(
        f"--- {p}\n{p.read_text()[-1500:]}" for p in logs if any(j.split("_")[0] in p.name for j in failed))

    runs = sorted((work / "smoke").glob("*/*/*/seed0/status.json"))
    entries = {"/".join(p.relative_to(work / "smoke").parts[:2]) for p in runs}
    table1 = {f"table1/{p.stem}" for p in (REPO / "repro/config/experiments/table1").glob("*.yaml")}
    assert entries == table1 | set(OTHER_TABLES)
    assert len(runs) == 2 * len(table1) + len(OTHER_TABLES)  # Table 1 in both fidelities
    assert all(json.loads(p.read_text())["state"] == "done" for p in runs), [p for p in runs]
    for status in runs:
        run = status.parent
        config = (run / "config.yaml").read_text()
        assert "scale: smoke" in config and "train_subset: 4" in config
        assert (run / "metrics.json").is_file() and list((run / "figures").rglob("*.png"))
        assert "random-" in json.loads((run / "env.json").read_text())["backbone_checkpoint"]["path"]
    released = sorted((work / "smoke").glob("*/*/released-checkpoint/metrics.json"))
    assert len(released) == 7 and all(json.loads(p.read_text())["scale"] == "smoke" for p in released)
    assert not (work / "data").exists() and not [p for p in work.iterdir() if p.name != "smoke"]

    # make results: the smoke block lists every run; every other block equals a regeneration without them
    out = tmp_path / "results" / "RESULTS.md"
    clean = tmp_path / "clean" / "RESULTS.md"
    for target in (out, clean):
        target.parent.mkdir(parents=True)
        shutil.copy(REPO / "RESULTS.md", target)
    _make("results", f"RESULTS={out}", env=env)
    subprocess.run([str(REPRO), "compare", "--record-only", "--out", str(clean)], cwd=REPO,
                   env=env, check=True, capture_output=True, timeout=600)
    got, want = _blocks(out.read_text()), _blocks(clean.read_text())
    assert "smoke" in got
    smoke = got.pop("smoke")
    want.pop("smoke", None)
    assert got == want
    assert "Pipeline check" in smoke and smoke.count("| released-checkpoint | scored |") == 7
    for entry in entries:
        assert f"| `{entry}` | paper | 1 done |" in smoke, entry
    print(f"smoke rehearsal of {len(runs)} runs and 7 published checkpoints through SLURM: {wall:.0f} s")


def test_sbatch_script_with_only_the_system_path(slurm_cluster, datasets, tmp_path):
    work = tmp_path / "work"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SLURM_CONF": slurm_cluster.env["SLURM_CONF"],
           "LANG": "C.UTF-8"}
    exports = f"ALL,SCALE=smoke,FIDELITY=paper,ENTRIES=table2/stego-vitb8,REPRO_DATA={datasets}," \
              f"REPRO_WORK={work},REPRO_WEIGHTS={tmp_path / 'none'},VENV={sys.prefix}"
    proc = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=6G", "--time=30",
                           "--array=0", f"--export={exports}", "slurm/cityscapes.sh"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    states = _wait_for(slurm_cluster, [job], timeout=900)
    log = next((REPO / "logs" / "repro-cityscapes").glob(f"{job}_0.out"))
    text = log.read_text()
    log.unlink()
    assert set(states.values()) == {"COMPLETED"}, text
    assert f"{REPRO} run table2/stego-vitb8 --fidelity paper --seed 0" in text and "--scale smoke" in text
    status = json.loads((work / "smoke/table2/stego-vitb8/paper/seed0/status.json").read_text())
    assert status["state"] == "done"


def test_sbatch_script_without_any_repro_stops_before_work_naming_the_fix(slurm_cluster, tmp_path):
    checkout = tmp_path / "checkout"  # a copy of the scripts with no .venv beside them
    shutil.copytree(REPO / "slurm", checkout / "slurm")
    (checkout / "logs" / "repro-cityscapes").mkdir(parents=True)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SLURM_CONF": slurm_cluster.env["SLURM_CONF"]}
    proc = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=1G", "--array=0",
                           f"--export=ALL,REPRO_WORK={tmp_path / 'work'}", "slurm/cityscapes.sh"],
                          cwd=checkout, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    states = _wait_for(slurm_cluster, [job], timeout=120)
    text = next((checkout / "logs" / "repro-cityscapes").glob(f"{job}_0.out")).read_text()
    assert set(states.values()) == {"FAILED"}, (states, text)
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("repro: error: no repro for this task") and "make setup" in lines[0]
    assert not (tmp_path / "work").exists()


def test_a_request_the_scheduler_refuses_is_one_line_naming_the_request_and_the_knob(slurm_cluster, datasets,
                                                                                      tmp_path):
    env = _env(slurm_cluster, datasets, tmp_path / "work", tmp_path / "weights")  # the test cluster has no GPU
    proc = subprocess.run(["make", "--no-print-directory", "reproduce-table2", "EXECUTOR=slurm"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("repro: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr and "sbatch: error:" in errors[0]
    assert "1 GPU(s)" in errors[0] and "--gpus" in errors[0] and "GPUS=" in errors[0]
    proc = subprocess.run(["make", "--no-print-directory", "reproduce-table2", "EXECUTOR=slurm", "GPUS=0", "CPUS=1",
                           "MEM_GB=2", "TIME_MIN=5", "DRY_RUN=1", "SET=train.max_steps=3"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(next((tmp_path / "work" / "launch").glob("*.json")).read_text())
    assert record["dry_run"] and record["overrides"] == ["train.max_steps=3"]
    assert all(j["job_id"] is None for j in record["jobs"])
