"""repro plan: the cost arithmetic against hand computations, sharing of data stages, fidelities, profiles."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch

from repro.cli.main import main
from repro.config.entries import list_entries
from repro.cluster.plan import PROFILE_SCHEMA, PlanError, format_plan, load_profile, make_plan, plan_targets
from repro.cluster.costs import cache_misses
from repro.training.state import FeatureCache

# A small fake profile with round rates (items per second); CPU stages say how many cores they used.
RATES = {
    "prepare/train224-five": (10.0, "cpu", 1), "prepare/val320": (40.0, "cpu", 1),
    "depth/perspective_plane/stage": (500.0, "cpu", 1), "depth/image_plane/stage": (500.0, "cpu", 1),
    "depth/zoedepth/full/crop": (20.0, "gpu", 1), "depth/zoedepth/full/image": (16.0, "gpu", 1),
    "depth/midas/tiny/crop": (50.0, "gpu", 1), "depth/midas/tiny/image": (40.0, "gpu", 1),
    "shards/train224": (100.0, "cpu", 1), "loader/train224": (250.0, "cpu", 2),
    "depth/crop_from_image/stage": (1000.0, "cpu", 1),
    "store/vit_small_patch8/write": (300.0, "gpu", 1), "store/vit_small_patch8/read": (2000.0, "cpu", 1),
    "backbone/vit_small_patch8/224/fp32": (400.0, "gpu", 1), "backbone/vit_small_patch8/320/fp32": (160.0, "gpu", 1),
    "backbone/vit_base_patch8/224/fp32": (100.0, "gpu", 1), "backbone/vit_base_patch8/320/fp32": (40.0, "gpu", 1),
    "val/vit_small_patch8/segment": (800.0, "gpu", 1), "val/vit_base_patch8/segment": (500.0, "gpu", 1),
    "val/vit_small_patch8/dino": (300.0, "gpu", 1), "val/vit_base_patch8/dino": (200.0, "gpu", 1),
    "eval/crf/serial": (0.25, "cpu", 1),
}
for _arch in ("vit_small_patch8", "vit_base_patch8"):
    for _kind in ("segment", "dino"):
        RATES[f"eval/{_arch}/{_kind}/head"] = (5000.0, "gpu", 1)
        RATES[f"eval/{_arch}/{_kind}/upsample_probes"] = (1000.0, "gpu", 1)
STEPS = {  # (method, arch, fidelity, lhp, sampling) -> steps/s at batch 8
    "table1/stego-vits8/paper": (("stego", "vit_small_patch8", "paper", "none", "random"), 4.0),
    "table1/stego-vits8/released": (("stego", "vit_small_patch8", "released", "none", "random"), 3.0),
    "table1/depthg-vits8/paper": (("depthg", "vit_small_patch8", "paper", "none", "fps"), 2.0),
    "table1/depthg-vits8/released": (("depthg", "vit_small_patch8", "released", "none", "fps"), 2.5),
}


def fake_profile(path: Path, *, crf_rate: float = 0.25) -> Path:
    stages = {k: {"rate": r, "unit": "item/s", "kind": kind, "cores": cores} for k, (r, kind, cores) in RATES.items()}
    stages["eval/crf/serial"]["rate"] = crf_rate
    for key, (sig, rate) in STEPS.items():
        stages[f"train/{key}/cached"] = {"rate": rate, "unit": "step/s", "kind": "gpu", "cores": 1, "batch": 8,
                                         "signature": dict(zip(("method", "arch", "fidelity", "lhp", "sampling"), sig))}
    payload = {"schema": PROFILE_SCHEMA, "device": "cuda", "device_name": "fake", "threads": 1, "stages": stages,
               "knn_fit": {"384": {"a": 1e-8, "b": 2.0, "kind": "cpu", "cores": 4},
                           "768": {"a": 2e-8, "b": 2.0, "kind": "cpu", "cores": 4}}}
    path.write_text(json.dumps(payload))
    return path


@pytest.fixture()
def profile(tmp_path, monkeypatch):
    monkeypatch.delenv("REPRO_DATA", raising=False)  # dataset sizes from data_manifests/
    monkeypatch.delenv("REPRO_PROFILE", raising=False)
    return load_profile(fake_profile(tmp_path / "fake.json"))


def test_one_entry_against_a_hand_computation(profile):
    plan = make_plan({"table1": ["table1/stego-vits8"]}, profile, seeds=3, fidelities=("paper",),
                     overrides=["train.feature_cache_gb=0"])
    (run,) = plan.runs
    # COCO-Stuff-27 curated: 49,629 train images -> 248,145 five-crops; 2,175 val images; batch 32, 7000 batches,
    # validation every 500 batches (14 passes); final + best-on-val checkpoints scored in one pass: the backbone
    # once per image and once per flipped image, per checkpoint the head twice (flip), upsampling and the CRF of
    # both probes. No feature cache: every lookup misses.
    gpu = {"train-step": 7000 * (32 / 8) / 4.0, "train-backbone": 2 * 32 * 7000 / 400.0,
           "validation": 14 * 2175 / 800.0 + 14 * 2175 / 160.0, "eval-backbone": (2175 + 2175) / 160.0,
           "eval-head": 2 * 2 * 2175 / 5000.0, "eval-upsample": 2 * 2175 / 1000.0}
    cpu = {"train-loader": 32 * 7000 / 250.0 * 2, "eval-crf": 2 * 2 * 2175 / 0.25}
    assert run.gpu_by_stage == pytest.approx({k: 3 * v / 3600 for k, v in gpu.items()})
    assert run.cpu_by_stage == pytest.approx({k: 3 * v / 3600 for k, v in cpu.items()})
    data = {d.stage: d for d in plan.data.values() if "val" not in d.label}
    assert data["prepare"].cpu_h == pytest.approx(49629 / 10.0 / 3600)
    assert data["shards"].cpu_h == pytest.approx(248145 / 100.0 / 3600)
    assert data["knn"].gpu_h == pytest.approx(248145 / 400.0 / 3600)
    assert data["knn"].cpu_h == pytest.approx(1e-8 * 248145**2 * 4 / 3600)
    assert "depth" not in data  # STEGO: no depth
    val_prep = [d for d in plan.data.values() if d.stage == "prepare" and "val" in d.label]
    assert val_prep[0].cpu_h == pytest.approx(2175 / 40.0 / 3600)
    gpu_total, cpu_total, _, _ = plan.totals(None)
    assert gpu_total == pytest.approx(run.gpu_h + sum(d.gpu_h for d in plan.data.values()))
    assert cpu_total == pytest.approx(run.cpu_h + sum(d.cpu_h for d in plan.data.values()))
    # feature store: fp16 28 x 28 x 384 features of every training crop
    assert list(plan.storage.values()) == [(248145, 248145 * 28 * 28 * 384 * 2)]


def test_depth_scope_and_tta_per_fidelity(profile):
    plan = make_plan({"table1": ["table1/depthg-vits8"]}, profile, seeds=1)
    depth = {d.label: (d.gpu_h, d.cpu_h) for d in plan.data.values() if d.stage == "depth"}
    # paper: the estimator on every crop (eq. 4); released: once per full image into a folder shared by every
    # released entry with that source, then each crop's map cut from it (R4). Both with flip TTA: the fake
    # profile measured single forwards, so twice as many
    assert depth["cocostuff27/depth-train-224-five-bilinear-zoedepth-crop-float"] == pytest.approx(
        (2 * 248145 / 20.0 / 3600, 0))
    assert depth["cocostuff27/depth-image-train-zoedepth-uint8"] == pytest.approx((2 * 49629 / 16.0 / 3600, 0))
    assert depth["cocostuff27/depth-image-val-zoedepth-uint8"] == pytest.approx((2 * 2175 / 16.0 / 3600, 0))
    assert depth["cocostuff27/depth-train-224-five-nearest-jpeg-zoedepth-image-uint8"] == pytest.approx(
        (0, 248145 / 1000.0 / 3600))
    runs = {r.fidelity: r for r in plan.runs}
    assert runs["paper"].batches == 7000 and runs["released"].batches == 2334  # R9
    assert runs["paper"].gpu_by_stage["train-step"] == pytest.approx(7000 * 4 / 2.0 / 3600)
    assert runs["released"].gpu_by_stage["train-step"] == pytest.approx(2334 * 4 / 2.5 / 3600)


def test_feature_store_moves_the_backbone_into_shared_data(profile):
    plan = make_plan(plan_targets(["table1/stego-vits8", "table4/stego"]), profile, seeds=1, fidelities=("paper",),
                     overrides=["train.feature_cache_gb=0", "train.feature_store=true"])
    for run in plan.runs:  # every lookup reads the store instead of running the ViT
        assert "train-backbone" not in run.gpu_by_stage
        assert run.cpu_by_stage["train-store-read"] == pytest.approx(2 * 32 * 7000 / 2000.0 / 3600)
    (store,) = [d for d in plan.data.values() if d.stage == "features"]  # one store for both entries
    assert store.label == "cocostuff27/features-train-224-five-bilinear-vit_small_patch8"
    assert store.gpu_h == pytest.approx(248145 / 300.0 / 3600)


def test_feature_cache_misses_match_the_trainers_cache():
    calls = []
    n, capacity, lookups = 40, 10, 120
    entry = 4 * 4  # bytes of one (4,) float32 row
    totals = []
    for trial in range(200):
        rng = random.Random(trial)
        cache = FeatureCache(lambda ids, x: (calls.append(len(x)), x)[1], budget_gb=capacity * entry / 2**30)
        for _ in range(lookups):
            i = rng.randrange(n)
            cache(torch.tensor([i]), torch.full((1, 4), float(i)))
        totals.append(cache.misses)
    assert sum(totals) / len(totals) == pytest.approx(cache_misses(lookups, n, capacity), rel=0.02)
    assert cache_misses(lookups, n, 0) == lookups and cache_misses(0, n, capacity) == 0


def test_shared_data_counted_once_and_both_fidelities(profile):
    # table1/stego-vits8 and table4/stego have equal data keys in each fidelity: their data is counted once
    plan = make_plan(plan_targets(["table1/stego-vits8", "table4/stego"]), profile, seeds=2)
    assert {(r.entry, r.fidelity) for r in plan.runs} == {(e, f) for e in ("table1/stego-vits8", "table4/stego")
                                                          for f in ("paper", "released")}
    by_fid = {}
    for run in plan.runs:
        by_fid.setdefault(run.fidelity, []).append(run.data)
    for fid, lists in by_fid.items():
        assert lists[0] == lists[1], fid
    assert len(plan.data) == 2 * 4  # per fidelity: train crops, val crops, shards, kNN
    gpu_total, cpu_total, _, _ = plan.totals(None)
    runs_gpu = sum(r.gpu_h for r in plan.runs)
    assert gpu_total == pytest.approx(runs_gpu + sum(d.gpu_h for d in plan.data.values()))
    t1, t4 = plan.totals("table1"), plan.totals("table4")
    assert t1[0] + t4[0] > gpu_total  # each table counts the shared data; the total counts it once


def test_dominant_stage_is_named(profile, tmp_path):
    plan = make_plan({"table1": ["table1/stego-vits8"]}, profile, seeds=1, fidelities=("paper",))
    _, _, gpu_st, cpu_st = plan.totals(None)
    assert max(cpu_st, key=cpu_st.get) == "eval-crf"
    assert max(gpu_st, key=gpu_st.get) == "train-step"
    text = format_plan(plan)
    assert "dominant stage: GPU-h@fake train-step" in text and "core-h@CPU eval-crf" in text
    slow = load_profile(fake_profile(tmp_path / "slow.json", crf_rate=1e-4))
    assert re.search(r"dominant stage: GPU-h@fake \S+ \d+%; core-h@CPU eval-crf (99|100)%",
                     format_plan(make_plan({"table1": ["table1/stego-vits8"]}, slow, seeds=1)))


def test_all_covers_every_table_but_the_demo():
    groups = plan_targets(["all"])
    assert set(groups) == {"table1", "table2", "table3", "table4", "table5", "table6", "supp3", "supp4", "supp5",
                           "supp6"}
    assert sum(len(v) for v in groups.values()) == len(list_entries()) - len(list_entries("demo"))


def test_missing_profile_is_said_loudly(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("REPRO_PROFILE", raising=False)
    with pytest.raises(PlanError, match=r"missing\.json not found.*bench_stages\.py --out"):
        load_profile(tmp_path / "missing.json")
    monkeypatch.setenv("REPRO_PROFILES", str(tmp_path / "none"))  # no default profile either
    assert main(["plan", "table1/stego-vits8"]) == 2
    assert "published-amp-pt240-rtx4090.json not found" in capsys.readouterr().out
    (tmp_path / "profiles").mkdir()
    fake_profile(tmp_path / "profiles" / "published-amp-pt240-rtx4090.json")
    monkeypatch.setenv("REPRO_PROFILES", str(tmp_path / "profiles"))
    assert main(["plan", "table1/stego-vits8", "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert "no --profile (or $REPRO_PROFILE): using the default profile published-amp-pt240-rtx4090.json" in out
    assert "table1/stego-vits8" in out
    fake_profile(tmp_path / "profiles" / "other.json")  # a NAME of the profiles folder
    assert main(["plan", "table1/stego-vits8", "--seeds", "1", "--profile", "other"]) == 0
    assert "other.json -- MEASURED on cuda" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(PlanError, match="is not a stage profile"):
        load_profile(tmp_path / "bad.json")


def test_launch_dry_run_prints_the_plan(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("REPRO_DATA", raising=False)
    monkeypatch.setenv("REPRO_PROFILE", str(fake_profile(tmp_path / "p.json")))
    assert main(["launch", "table1/stego-vits8", "--seeds", "2", "--executor", "slurm", "--work-dir",
                 str(tmp_path / "w"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "seeds 2, fidelities paper+released" in out and "dominant stage:" in out
    assert "profile: " in out and "p.json -- MEASURED on cuda" in out and "default profile" not in out
