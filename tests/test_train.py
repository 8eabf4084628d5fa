"""The trainer on real nyuv2-mini shards: learning signals, TensorBoard, SIGTERM + resume."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from repro.runs.entry import prepare_data, resolve_entry
from repro.training.loop import FINAL, train
from repro.training.state import latest_checkpoint
from sample_helpers import quick_demo_overrides, random_dino

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "repro" / "config" / "experiments" / "demo" / "nyuv2-mini.yaml"


@pytest.fixture(scope="module")
def setup(shared_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("train")
    base = quick_demo_overrides(shared_data, random_dino(work), "train.val_every=0", "eval.num_figures=0")
    paths = prepare_data(resolve_entry(DEMO, overrides=base), work_dir=work, quiet=True)
    return work, base, paths


def _config(setup, *extra):
    _, base, _ = setup
    return resolve_entry(DEMO, overrides=base + list(extra))


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {p.parent for p in (run_dir / "train").rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    out = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    out["_histograms"] = acc.Tags()["histograms"]
    return out


def test_short_training_learns_and_logs(setup, tmp_path):
    work, _, paths = setup
    cfg = _config(setup, "train.max_steps=30", "train.log_every=1", "train.hist_every=10", "train.checkpoint_every=10",
                  "train.keep_checkpoints=10")
    run_dir = tmp_path / "run"
    out = train(cfg, run_dir, shards=paths.shards, knn=paths.knn, quiet=True)
    assert out == run_dir / FINAL
    payload = torch.load(out, weights_only=True)
    assert payload["meta"]["step"] == 30
    checkpoints = sorted((run_dir / "train" / "checkpoints").glob("step_*"))
    assert [c.name for c in checkpoints] == ["step_0000010", "step_0000020", "step_0000030"]
    at_ten = torch.load(checkpoints[0] / "state.pt", weights_only=True)["modules"]["head"]
    assert at_ten.keys() == payload["head"].keys()
    changed = [k for k, v in payload["head"].items() if not torch.equal(v, at_ten[k])]
    assert changed, "the head's parameters did not change"
    logs = _scalars(run_dir)
    for tag in ("loss/total", "loss/self", "loss/knn", "loss/random", "loss/depthg", "probe/cluster", "probe/linear",
                "schedule/feature_samples"):
        values = [v for _, v in logs[tag]]
        assert len(values) == 30 and all(v == v and abs(v) < 1e6 for v in values), tag
    for tag in ("probe/cluster", "probe/linear"):
        values = [v for _, v in logs[tag]]
        assert sum(values[-5:]) / 5 < sum(values[:5]) / 5, f"{tag} did not go down: {values[:5]} -> {values[-5:]}"
    assert {"correlation/self", "correlation/knn"} <= set(logs["_histograms"])


RESUME_SCRIPT = """
import sys
from repro.runs.entry import resolve_entry
from repro.training.loop import train
cfg = resolve_entry(sys.argv[1], overrides=sys.argv[4:])
train(cfg, sys.argv[2], shards=sys.argv[3] + "/shards", knn=sys.argv[3] + "/knn.npz", quiet=False)
"""


def _train_subprocess(setup, run_dir: Path, extra: list[str]) -> subprocess.Popen:
    work, base, paths = setup
    link = run_dir.parent / "data"
    link.mkdir(parents=True, exist_ok=True)
    for name, target in (("shards", paths.shards), ("knn.npz", paths.knn)):
        if not (link / name).exists():
            (link / name).symlink_to(target)
    cmd = [sys.executable, "-c", RESUME_SCRIPT, str(DEMO), str(run_dir), str(link), *base, *extra]
    return subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, bufsize=1)


def test_sigterm_checkpoint_and_resume_match_uninterrupted_run(setup, tmp_path):
    extra = ["train.max_steps=10", "train.checkpoint_every=100"]
    # interrupted: SIGTERM once batch 4 is done, then resume (with loader workers this time)
    proc = _train_subprocess(setup, tmp_path / "interrupted", extra)
    seen, deadline = "", time.time() + 300
    while "4/10" not in seen and time.time() < deadline and proc.poll() is None:
        seen += proc.stderr.read(1)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGTERM, proc.stderr.read()
    ckpt = latest_checkpoint(tmp_path / "interrupted" / "train" / "checkpoints")
    assert ckpt is not None and 4 <= int(ckpt.name.split("_")[1]) < 10
    assert not (tmp_path / "interrupted" / FINAL).exists()
    resumed = _train_subprocess(setup, tmp_path / "interrupted", extra + ["train.num_workers=2"])
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()

    straight = _train_subprocess(setup, tmp_path / "straight", extra)
    assert straight.wait(timeout=600) == 0, straight.stderr.read()
    a = torch.load(tmp_path / "interrupted" / FINAL, weights_only=True)
    b = torch.load(tmp_path / "straight" / FINAL, weights_only=True)
    assert a["meta"]["step"] == b["meta"]["step"] == 10
    for part in ("head", "cluster_probe", "linear_probe"):
        for key in b[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after resume"


def test_dino_baseline_trains_only_the_probes(setup, tmp_path):
    _, _, paths = setup
    cfg = _config(setup, "method=dino", "train.max_steps=4")
    out = train(cfg, tmp_path / "dino", shards=paths.shards, knn=paths.knn, quiet=True)
    payload = torch.load(out, weights_only=True)
    assert payload["head"] == {}
    assert payload["cluster_probe"]["clusters"].shape == (13, 384)  # K=13 centroids on raw ViT-S features


def test_released_fidelity_and_lhp_run(setup, tmp_path):
    _, _, paths = setup
    for i, extra in enumerate((["fidelity=released", "train.max_steps=6"],
                               ["lhp.enabled=true", "train.max_steps=2"],
                               ["lhp.enabled=true", "lhp.propagation=attention", "sampling.mode=random",
                                "train.max_steps=2"],
                               ["sampling.mode=full", "train.max_steps=2"])):
        cfg = _config(setup, *extra)
        out = train(cfg, tmp_path / f"v{i}", shards=paths.shards, knn=paths.knn, quiet=True)
        assert torch.load(out, weights_only=True)["meta"]["step"] == (2 if cfg.train.step_unit == "released" else cfg.train.max_steps)
