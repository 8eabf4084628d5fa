"""Smoke test of benchmarks/bench_stages.py: a --quick --tiny run writes a profile with every stage group that
repro plan reads. Timing numbers are not checked here (performance figures live in benchmarks/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from repro.cluster.plan import load_profile, make_plan, plan_targets

REPO = Path(__file__).resolve().parents[1]
GROUPS = ("prepare", "depth", "shards", "loader", "knn", "backbone", "store", "train", "val", "eval", "memory")


def test_quick_tiny_run_writes_every_stage(tmp_path):
    out = tmp_path / "profile.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_stages.py"), "--quick", "--tiny",
                           "--threads", "1", "--out", str(out), "--work", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    profile = json.loads(out.read_text())
    stages = profile["stages"]
    assert {key.split("/")[0] for key in stages} == set(GROUPS) == set(profile["groups"])
    arch = "vit_small_patch8"
    for key in ("prepare/train224-five", "prepare/val320", "depth/zoedepth/tiny/crop", "depth/midas/tiny/image",
                "depth/perspective_plane/stage", "depth/zoedepth/tiny/image_stage", "depth/crop_from_image/stage",
                f"store/{arch}/write", f"store/{arch}/read", "shards/train224", "loader/train224", "knn/C768/n256",
                f"backbone/{arch}/224/fp32", f"backbone/{arch}/320/bf16", f"val/{arch}/segment",
                f"eval/{arch}/segment/head", f"eval/{arch}/segment/upsample_probes", "eval/crf/cluster/serial",
                "eval/crf/linear/pool", f"eval/{arch}/segment/end_to_end"):
        assert stages[key]["rate"] > 0, key
    for entry in ("table1/depthg-vits8", "table1/stego-vits8"):
        for fidelity in ("paper", "released"):
            for cache in ("cached", "nocache"):
                rec = stages[f"train/{entry}/{fidelity}/{cache}"]
                assert rec["rate"] > 0 and rec["signature"]["fidelity"] == fidelity
    assert stages["memory/train"]["rss_peak_mib"] > 100 and stages["memory/eval"]["rss_peak_mib"] > 100
    assert set(profile["knn_fit"]) == {"384", "768"}
    assert f"x ref: steps/s relative to {profile['reference']}" in proc.stdout
    # the plan reads it (ViT-S/8 entries only: --tiny measures no ViT-B/8)
    plan = make_plan(plan_targets(["table1/stego-vits8"]), load_profile(out), seeds=1)
    assert plan.totals(None)[0] > 0 and len(plan.runs) == 2
