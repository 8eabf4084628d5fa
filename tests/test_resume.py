"""Exact resume with validation on, and checkpoints that never unpickle arbitrary objects (issue 11).

A run of the demo entry is interrupted in three ways (kill -9 between checkpoints, kill -9 while a
checkpoint is being written, SIGTERM as SLURM's requeue path sends it) with best-on-val validation
ON, and rerun; the final parameters, the best-on-val parameters and the metrics must equal those of
an uninterrupted run bit for bit. Validation builds its own backbone on first use, which touches the
global RNG at a point that differs between an interrupted and an uninterrupted run: nothing the loop
draws may depend on it.
"""

from __future__ import annotations

import json
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repro.runs.entry import prepare_data, resolve_entry, run_dir_for
from repro.training.state import CheckpointError, latest_checkpoint
from sample_helpers import quick_demo_overrides, random_dino

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "repro" / "config" / "experiments" / "demo" / "nyuv2-mini.yaml"

# kill points are injected from outside repro: the script wraps repro's own functions
RUN_SCRIPT = """
import os, signal, sys
import repro.training.loop, repro.training.state
kill = os.environ.get("KILL_AT", "")
if kill.startswith(("batch:", "term:")):  # SIGKILL, or SIGTERM as SLURM sends it, while batch N is computed
    at, sig = int(kill.split(":")[1]), signal.SIGKILL if kill.startswith("batch:") else signal.SIGTERM
    forward = repro.training.loop.TrainModule.forward
    def dying(self, f, fk, batch, step, *a, **k):
        if step == at:
            os.kill(os.getpid(), sig)
        return forward(self, f, fk, batch, step, *a, **k)
    repro.training.loop.TrainModule.forward = dying
elif kill.startswith("save:"):
    at = int(kill.split(":")[1])
    save = repro.training.state.torch.save
    def dying_save(obj, f, *a, **k):
        save(obj, f, *a, **k)
        if f".tmp_step_{at:07d}" in str(f):  # the first file of that checkpoint is on disk, the rest is not
            os.kill(os.getpid(), signal.SIGKILL)
    repro.training.state.torch.save = dying_save
from repro.runs.entry import run_entry
run_entry(sys.argv[1], work_dir=sys.argv[2], overrides=sys.argv[3:], quiet=False)
"""
STEPS = 20


@pytest.fixture(scope="module")
def demo(shared_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("resume")
    overrides = quick_demo_overrides(shared_data, random_dino(work), f"train.max_steps={STEPS}", "train.val_every=3",
                                     "train.checkpoint_every=8", "eval.crf=false", "eval.num_figures=0")
    prepare_data(resolve_entry(DEMO, overrides=overrides), work_dir=work, quiet=True)
    return work, overrides


def _run(work: Path, name: str, overrides: list[str], kill: str = "") -> subprocess.Popen:
    env = {"PATH": "/usr/bin:/bin", "KILL_AT": kill, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", RUN_SCRIPT, str(DEMO), str(work), f"name=resume/{name}",
                             *overrides], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _outputs(run_dir: Path) -> tuple[dict, dict, dict]:
    final = torch.load(run_dir / "model.pt", weights_only=True)
    best = torch.load(run_dir / "best.pt", weights_only=True)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return final, best, metrics


def _assert_same(a: tuple, b: tuple, what: str) -> None:
    for label, x, y in (("final", a[0], b[0]), ("best", a[1], b[1])):
        assert x["meta"]["step"] == y["meta"]["step"], (what, label)
        for part in ("head", "cluster_probe", "linear_probe"):
            for key in y[part]:
                assert torch.equal(x[part][key], y[part][key]), f"{what}: {label} {part}.{key} differs"
    for label in ("final", "best_on_val"):
        assert a[2][label]["summary"] == b[2][label]["summary"], (what, label)
        assert a[2][label]["cluster"]["confusion"] == b[2][label]["cluster"]["confusion"], (what, label)


def test_interrupted_runs_resume_exactly_with_validation_on(demo):
    work, overrides = demo
    straight = _run(work, "straight", overrides)
    assert straight.wait(timeout=900) == 0, straight.stderr.read()
    reference = _outputs(run_dir_for(resolve_entry(DEMO, overrides=[*overrides, "name=resume/straight"]), work))
    assert reference[0]["meta"]["step"] == STEPS and reference[1]["meta"]["step"] % 3 == 0

    for name, kill in (("kill-between", "batch:13"), ("kill-saving", "save:16")):
        proc = _run(work, name, overrides, kill)
        assert proc.wait(timeout=900) == -signal.SIGKILL, proc.stderr.read()
        run_dir = run_dir_for(resolve_entry(DEMO, overrides=[*overrides, f"name=resume/{name}"]), work)
        assert latest_checkpoint(run_dir / "train" / "checkpoints").name == "step_0000008"
        resumed = _run(work, name, overrides)
        assert resumed.wait(timeout=900) == 0, resumed.stderr.read()
        assert "resumed from" in (run_dir / "logs" / "run.log").read_text()
        _assert_same(_outputs(run_dir), reference, name)

    proc = _run(work, "sigterm", overrides, "term:13")  # the batch finishes, a checkpoint is written, then exit
    assert proc.wait(timeout=900) == -signal.SIGTERM, proc.stderr.read()
    run_dir = run_dir_for(resolve_entry(DEMO, overrides=[*overrides, "name=resume/sigterm"]), work)
    assert latest_checkpoint(run_dir / "train" / "checkpoints").name == "step_0000014"
    resumed = _run(work, "sigterm", overrides)
    assert resumed.wait(timeout=900) == 0, resumed.stderr.read()
    _assert_same(_outputs(run_dir), reference, "sigterm")


class _Payload:
    """Unpickling this runs ``os.system`` (what a crafted checkpoint file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_crafted_pickles_in_a_checkpoint_are_refused_and_never_run(demo, tmp_path):
    from repro.training.loop import train

    work, overrides = demo
    config = resolve_entry(DEMO, overrides=[*overrides, "train.max_steps=4", "train.checkpoint_every=2",
                                            "train.val_every=0"])
    from repro.runs.entry import data_paths

    paths = data_paths(config, work)
    run_dir = tmp_path / "run"
    train(config, run_dir, shards=paths.shards, knn=paths.knn, quiet=True, stop_after=2)
    ckpt = latest_checkpoint(run_dir / "train" / "checkpoints")
    crafted = tmp_path / "run2" / "train" / "checkpoints" / ckpt.name
    shutil.copytree(ckpt, crafted)
    marker = tmp_path / "pwned"
    # 1. an extra file such as Accelerate's custom_checkpoint_0.pkl is never read
    (ckpt / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    assert train(config, run_dir, shards=paths.shards, knn=paths.knn, quiet=True) == run_dir / "model.pt"
    assert not marker.exists()
    # 2. a crafted state file is refused with a clear error, and nothing runs
    torch.save({"step": 2, "modules": _Payload(marker)}, crafted / "state.pt")
    with pytest.raises(CheckpointError, match="refusing to load .*state.pt"):
        train(config, tmp_path / "run2", shards=paths.shards, knn=paths.knn, quiet=True)
    assert not marker.exists()
    (crafted / "state.pt").write_bytes(b"\x80\x04truncated")
    with pytest.raises(CheckpointError, match="state.pt"):
        train(config, tmp_path / "run2", shards=paths.shards, knn=paths.knn, quiet=True)
