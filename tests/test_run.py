"""``repro run`` end to end on nyuv2-mini: stage skipping, metrics by hand, CRF on/off, failures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from repro.cli.main import main
from repro.data.datasets.registry import DATASETS
from repro.evaluate.report import ValidationSet, evaluate_parts
from repro.models.backbone import DinoBackbone
from repro.models.bundle import load_parts
from repro.runs.entry import data_paths, resolve_entry, run_entry
from sample_helpers import quick_demo_overrides, random_dino

ENTRY = "demo/nyuv2-mini"


@pytest.fixture(scope="module")
def done(shared_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("run")
    overrides = quick_demo_overrides(shared_data, random_dino(work), "train.max_steps=6", "train.val_every=3",
                                     "eval.crf=false", "eval.num_figures=2")
    run_dir = run_entry(ENTRY, work_dir=work, overrides=overrides, quiet=True)
    return work, overrides, run_dir


def test_first_run_writes_everything(done):
    _, _, run_dir = done
    for name in ("config.yaml", "env.json", "status.json", "metrics.json", "model.pt", "best.pt", "logs/run.log",
                 "figures/final/qualitative.png", "figures/final/confusion.png", "figures/best_on_val/qualitative.png"):
        assert (run_dir / name).is_file(), name
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "done" and {"prepare", "train", "eval"} <= set(status["timings"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["summary"] == metrics["final"]["summary"]
    assert metrics["best_on_val"]["step"] in (3, 6) and "test set" in metrics["best_on_val"]["selection"]
    assert len(metrics["final"]["cluster"]["per_class_iou"]) == 13
    assert np.asarray(metrics["final"]["linear"]["confusion"]).shape == (13, 13)
    env = json.loads((run_dir / "env.json").read_text())
    assert env["packages"]["torch"] and env["hostname"] and "git_sha" in env


def test_second_run_skips_every_finished_stage(done):
    work, overrides, run_dir = done
    paths = data_paths(resolve_entry(ENTRY, overrides=overrides), work)
    watched = [run_dir / "model.pt", run_dir / "best.pt", run_dir / "metrics.json", paths.shards / "index.json",
               paths.knn, paths.crops / "index.json", paths.depth / "index.json", paths.val_crops / "index.json"]
    before = {p: p.stat().st_mtime_ns for p in watched}
    assert run_entry(ENTRY, work_dir=work, overrides=overrides, quiet=True) == run_dir
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    timings = json.loads((run_dir / "status.json").read_text())["timings"]
    assert "train" not in timings and "eval" not in timings and "prepare" not in timings


def test_metrics_equal_a_hand_computation_from_saved_predictions(done):
    work, overrides, run_dir = done
    config = resolve_entry(ENTRY, overrides=overrides)
    paths = data_paths(config, work)
    backbone = DinoBackbone(config.model.arch, config.model.checkpoint)
    parts, _ = load_parts(run_dir / "model.pt", config, backbone.feature_dim, 13)
    val = ValidationSet(paths.val_crops)
    result = evaluate_parts(parts, backbone, val, crf=False, flip=config.eval.flip, keep_predictions=True)
    pred = np.concatenate([p.ravel() for p in result.predictions["cluster"]])
    label = np.concatenate([lab.ravel() for lab in result.predictions["label"]])
    keep = label >= 0
    counts = np.zeros((13, 13), dtype=np.int64)
    np.add.at(counts, (pred[keep], label[keep]), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    tp = counts[rows, cols]
    mapped = np.zeros_like(counts)
    mapped[cols] = counts[rows]
    fp, fn = mapped.sum(1) - np.diag(mapped), counts.sum(0) - np.diag(mapped)
    denom = np.diag(mapped) + fp + fn
    by_hand = {"unsup_acc": 100 * tp.sum() / keep.sum(), "unsup_miou": 100 * np.mean(np.diag(mapped)[denom > 0] / denom[denom > 0])}
    saved = json.loads((run_dir / "metrics.json").read_text())["final"]["summary"]
    assert saved["unsup_acc"] == pytest.approx(by_hand["unsup_acc"], abs=1e-9)
    assert saved["unsup_miou"] == pytest.approx(by_hand["unsup_miou"], abs=1e-9)
    linear = np.concatenate([p.ravel() for p in result.predictions["linear"]])
    assert saved["linear_acc"] == pytest.approx(100 * np.mean(linear[keep] == label[keep]), abs=1e-9)


def test_eval_command_with_crf_on_and_off(done, capsys):
    work, overrides, run_dir = done
    args = ["eval", ENTRY, "--work-dir", str(work), "--quiet"] + [a for o in overrides for a in ("--set", o)]
    assert main(args + ["--crf"]) == 0  # the run was configured without CRF: a separate, labelled file
    with_crf = json.loads((run_dir / "metrics.crf-true.json").read_text())
    assert main(args + ["--no-crf"]) == 0  # the run's own config: metrics.json
    without = json.loads((run_dir / "metrics.json").read_text())
    assert with_crf["protocol"]["crf"] is True and without["protocol"]["crf"] is False
    assert with_crf["variant"] == "crf-true" and "variant" not in without
    for m in (with_crf, without):
        assert all(0 <= v <= 100 for v in m["final"]["summary"].values())
    assert with_crf["final"]["cluster"]["confusion"] != without["final"]["cluster"]["confusion"]
    assert "unsup mIoU" in capsys.readouterr().out


def test_other_config_in_the_same_run_folder_is_refused(done):
    work, overrides, _ = done
    with pytest.raises(FileExistsError, match="different config"):
        run_entry(ENTRY, work_dir=work, overrides=overrides + ["loss.lambda_self=0.5"], quiet=True)


def test_failure_is_recorded_with_the_log(done, tmp_path):
    _, overrides, _ = done
    bad = overrides + [f"data.root={tmp_path / 'nowhere'}"]
    with pytest.raises(FileNotFoundError):
        run_entry(ENTRY, work_dir=tmp_path, overrides=bad, quiet=True)
    (status_path,) = tmp_path.rglob("status.json")
    status = json.loads(status_path.read_text())
    assert status["state"] == "failed" and status["stage"] == "prepare" and "nowhere" in status["error"]
    assert "nowhere" in Path(status["log"]).read_text()


def test_unset_data_variable_is_a_clear_error(monkeypatch):
    from repro.config.loader import ConfigError

    monkeypatch.delenv("REPRO_DATA", raising=False)
    with pytest.raises(ConfigError, match="REPRO_DATA"):
        resolve_entry("table1/depthg-vits8")
    assert DATASETS["nyuv2"].num_classes == 13
