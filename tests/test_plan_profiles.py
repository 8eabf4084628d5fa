"""Published-throughput profiles, unit labels, the feature-store choice, shares and derived peak memory of repro plan."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from repro.config.entries import load_entry
from repro.cluster.plan import format_plan, load_profile, make_plan, plan_targets, units
from repro.cluster.costs import GIB, peak_memory
from test_plan import fake_profile

REPO = Path(__file__).resolve().parents[1]
PROFILES = REPO / "benchmarks" / "profiles"


def _published():
    spec = importlib.util.spec_from_file_location("published_profiles", REPO / "benchmarks" / "published_profiles.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.delenv("REPRO_DATA", raising=False)
    monkeypatch.delenv("REPRO_PROFILE", raising=False)
    monkeypatch.delenv("REPRO_PROFILES", raising=False)


def test_committed_published_profiles_are_rebuilt_exactly():
    pub = _published()
    cpu = json.loads((PROFILES / "cpu-2core.json").read_text())
    for name in pub.GPUS:
        committed = json.loads((PROFILES / f"{name}.json").read_text())
        assert committed == json.loads(json.dumps(pub.build(name, cpu, pub.cpu_beit_rate()))), name
        assert committed["published"] is True and committed["measured"] is None
        for key, rec in committed["stages"].items():  # every figure names its source or its derivation
            assert ("source" in rec) != ("derived" in rec), key
            assert rec["kind"] == "cpu" or rec["device"] == "cuda", key


def test_backbone_rates_are_the_published_rows_times_the_documented_factors():
    pub = _published()
    p4090 = json.loads((PROFILES / "published-amp-pt240-rtx4090.json").read_text())["stages"]
    v100 = json.loads((PROFILES / "published-fp32-v100.json").read_text())["stages"]
    # timm rtx4090 pt240 CSV rows: vit_small_patch8_224 1790.17, vit_base_patch8_224 659.1 (AMP); fp32 = half
    assert p4090["backbone/vit_small_patch8/224/bf16"]["rate"] == 1790.17
    assert p4090["backbone/vit_small_patch8/224/fp32"]["rate"] == pytest.approx(1790.17 * 0.5)
    assert p4090["backbone/vit_base_patch8/224/fp32"]["rate"] == pytest.approx(659.1 * 0.5)
    assert v100["backbone/vit_small_patch8/224/fp32"]["rate"] == 180.0 and v100["backbone/vit_base_patch8/224/fp32"][
        "rate"] == 63.0
    # 320 px: 12 blocks x (12 N D^2 + 2 N^2 D), N = 40^2 + 1 vs 28^2 + 1
    for arch, d in (("vit_small_patch8", 384), ("vit_base_patch8", 768)):
        ratio = (12 * 1601 * d * d + 2 * 1601**2 * d) / (12 * 785 * d * d + 2 * 785**2 * d)
        assert pub.vit_macs(arch, 320) / pub.vit_macs(arch, 224) == pytest.approx(ratio)
        assert p4090[f"backbone/{arch}/320/bf16"]["rate"] == pytest.approx(p4090[f"backbone/{arch}/224/bf16"]["rate"]
                                                                           / ratio)
    # a CPU-measured GPU stage: CPU rate x (GPU backbone / CPU backbone at the same arch, size and the run's precision)
    cpu = json.loads((PROFILES / "cpu-2core.json").read_text())["stages"]
    key = "train/table1/stego-vits8/released/cached"
    speed = 1790.17 * 0.5 / cpu["backbone/vit_small_patch8/224/fp32"]["rate"]
    assert p4090[key]["rate"] == pytest.approx(cpu[key]["rate"] * speed)
    assert p4090["eval/crf/serial"]["rate"] == cpu["eval/crf/serial"]["rate"]  # CPU stages copied
    # depth: MiDaS README's 13 FPS (RTX 3090) x the timm BEiT-L-384 4090/3090 ratio, over the CPU's forwards/s
    # (the CPU measured maps with flip TTA: two forwards each)
    speed = 13.0 * (274.3 / 146.92) / (2 * cpu["depth/midas/full/crop"]["rate"])
    assert p4090["depth/zoedepth/full/crop"]["rate"] == pytest.approx(cpu["depth/zoedepth/full/crop"]["rate"] * speed)
    assert p4090["depth/midas/full/crop"]["rate"] == pytest.approx(13.0 * 274.3 / 146.92 / 2)  # maps/s with TTA


def test_a_cpu_profile_never_prints_gpu_hours(tmp_path):
    path = fake_profile(tmp_path / "cpu.json")
    data = json.loads(path.read_text())
    data["device"] = "cpu"
    path.write_text(json.dumps(data))
    profile = load_profile(path)
    text = format_plan(make_plan({"table1": ["table1/stego-vits8"]}, profile, seeds=1))
    assert "GPU-h" not in text and units(profile) == ("h@CPU(1thr)", "core-h@CPU")
    gpu = load_profile("published-amp-pt240-rtx4090")  # a NAME of benchmarks/profiles/
    assert units(gpu) == ("GPU-h@RTX 4090", "core-h@CPU")
    text = format_plan(make_plan({"table1": ["table1/stego-vits8"]}, gpu, seeds=1))
    assert "PUBLISHED throughput for NVIDIA GeForce RTX 4090 (compiled " in text and "NOT measured" in text


def test_feature_store_auto_is_the_cheaper_and_shares_add_up(tmp_path):
    profile = load_profile(fake_profile(tmp_path / "p.json"))
    groups = plan_targets(["table1/stego-vits8", "table4/stego"])
    plans = {m: make_plan(groups, profile, seeds=1, fidelities=("paper",), feature_store=m,
                          overrides=["train.feature_cache_gb=0"]) for m in ("on", "off", "auto")}
    on, off, auto = (plans[m].totals(None)[0] for m in ("on", "off", "auto"))
    assert auto == min(on, off) and on != off
    assert plans["auto"].store_note.startswith(f"feature store {'ON' if on < off else 'OFF'} (--feature-store auto")
    for plan in plans.values():  # every shared folder booked once: the tables' shares add up to the total
        gpu, cpu, _, _ = plan.totals(None)
        attributed = plan.attributed()
        assert sum(g for g, _ in attributed.values()) == pytest.approx(gpu)
        assert sum(c for _, c in attributed.values()) == pytest.approx(cpu)
    assert "share by table" in format_plan(plans["auto"]) and "share by stage" in format_plan(plans["auto"])


def test_peak_memory_against_a_hand_computation():
    cfg = load_entry("table1/stego-vits8", ["fidelity=released"])  # fp32, batch 32, Q 70? read from the config
    q, s, eb = cfg.model.code_dim, cfg.sampling.feature_samples, cfg.eval.batch_size
    assert cfg.train.precision == "fp32" and cfg.sampling.mode != "full" and not cfg.lhp.enabled
    weights = 21.67e6 * 4
    train = (weights + 64 * 785 * 9 * 384 * 4 + 64 * 384 * 784 * 4 + 64 * 784 * (2 * 384 + q) * 4 * 3
             + 64 * s**4 * 4 * 8)
    evaluate = weights + eb * 1601 * 9 * 384 * 4 + eb * 320**2 * (q + 2 * 27) * 4 * 2
    assert peak_memory(cfg) == pytest.approx({"train": train / GIB, "eval": evaluate / GIB})
    paper = peak_memory(load_entry("table1/stego-vits8", ["fidelity=paper"]))  # bf16: half the backbone activations
    assert paper["train"] < peak_memory(cfg)["train"]


def test_supplied_maps_cost_a_cut_and_mde_features_cost_the_zoedepth_network(tmp_path):
    profile = load_profile(fake_profile(tmp_path / "p.json"))
    plan = make_plan({"table5": ["table5/kbr", "table5/zoedepth"], "supp3": ["supp3/mde-features-coco"]}, profile,
                     seeds=1, fidelities=("paper",))
    by_label = {d.label: d.gpu_by_stage for d in plan.data.values() if d.stage == "depth"}
    kbr = by_label["cocostuff27/depth-train-224-five-bilinear-kbr-crop-float"]
    zoe = by_label["cocostuff27/depth-train-224-five-bilinear-zoedepth-crop-float"]
    mde = by_label["cocostuff27/depth-train-224-five-bilinear-mde_features-crop-float"]
    assert set(zoe) == set(mde) == {"depth"} and set(kbr) <= {"depth"}  # no network: a GPU-free cut
    assert mde["depth"] == pytest.approx(zoe["depth"]) and kbr.get("depth", 0.0) < zoe["depth"]
    assert not any("no estimator" in w for w in plan.warnings)


def test_one_knn_table_per_crops_folder_whatever_the_depth():
    from repro.runs.workdir import data_paths

    paths = {e: data_paths(load_entry(e, ["fidelity=paper"]), Path("W")) for e in ("table5/zoedepth", "table5/midas",
                                                                                   "table1/stego-vits8")}
    assert len({p.knn for p in paths.values()}) == 1 and len({p.shards for p in paths.values()}) == 3
