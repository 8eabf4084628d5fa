"""Every cached product of a frozen network is keyed by the bytes of its weights, not by their path.

The README's own sequence writes random weights to a path and the real file to the same path later;
each stage built from the first file must be rebuilt from the second, saying once why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import pytest

import repro.utils.files
from repro.config.identity import content_mismatch
from repro.depth.hf import save_random_model
from repro.models.backbone import init_random_checkpoint
from repro.runs.workdir import prepare_data, resolve_entry
from repro.utils.files import cached_file_sha256, content_sha256, file_sha256
from sample_helpers import quick_demo_overrides

ENTRY = "demo/nyuv2-mini"


def _digest(path):
    """sha256 of a file, or of every file below a folder (sorted relative paths, index files left out)."""
    if path.is_file():
        return file_sha256(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != "index.json")
    return hashlib.sha256(b"".join(p.relative_to(path).as_posix().encode() + file_sha256(p).encode()
                                   for p in files)).hexdigest()


def test_cached_file_sha256_reads_a_file_once_until_it_changes(tmp_path, monkeypatch):
    path = tmp_path / "w.pth"
    path.write_bytes(b"first")
    calls = []
    real = repro.utils.files.file_sha256
    monkeypatch.setattr(repro.utils.files, "file_sha256", lambda p: calls.append(p) or real(p))
    assert cached_file_sha256(path) == hashlib.sha256(b"first").hexdigest() == cached_file_sha256(path)
    assert len(calls) == 1
    path.write_bytes(b"second!")  # another size: read again
    assert cached_file_sha256(path) == hashlib.sha256(b"second!").hexdigest() and len(calls) == 2
    os.utime(path, ns=(1, 1))  # same size, another mtime: read again
    assert cached_file_sha256(path) == hashlib.sha256(b"second!").hexdigest() and len(calls) == 3
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.bin").write_bytes(b"a")
    lines = f"sub/a.bin {hashlib.sha256(b'a').hexdigest()}"
    assert content_sha256(folder) == hashlib.sha256(lines.encode()).hexdigest()
    assert content_sha256(tmp_path / "absent") is None


def test_content_mismatch_only_when_nothing_but_content_keys_differ():
    a = {"checkpoint": "w.pth", "checkpoint_sha256": "1", "k": 30, "depth_params": {"weights_sha256": "x"}}
    assert content_mismatch(a, a) is None
    assert content_mismatch(a, {**a, "checkpoint_sha256": "2"}) == ["checkpoint_sha256"]
    assert content_mismatch(a, {**a, "depth_params": {"weights_sha256": "y"}}) == ["depth_params.weights_sha256"]
    assert content_mismatch(a, {**a, "checkpoint_sha256": "2", "k": 7}) is None  # other settings: not a content swap
    old = {k: v for k, v in a.items() if k != "checkpoint_sha256"}  # made before content keys were recorded
    assert content_mismatch(old, a) == ["checkpoint_sha256"]


def test_swapping_the_weights_at_the_same_path_rebuilds_every_stage(shared_data, tmp_path, caplog):
    """Attack: `repro knn` / the feature store / depth folders were reused after the weights at their path changed."""
    work = tmp_path / "work"
    dino = init_random_checkpoint("vit_small_patch8", tmp_path / "dino.pth", seed=0)
    zoe = save_random_model("zoedepth", tmp_path / "zoedepth", seed=0)
    overrides = quick_demo_overrides(shared_data, dino, "data.depth_source=zoedepth", f"data.depth_weights={zoe}",
                                     "data.depth_scope=image", "train.feature_store=true")
    config = resolve_entry(ENTRY, overrides=overrides)
    paths = prepare_data(config, work_dir=work, quiet=True)
    stages = {"image depth": paths.image_depth, "depth": paths.depth, "shards": paths.shards, "knn": paths.knn,
              "features": paths.features}
    before = {name: _digest(p) for name, p in stages.items()}
    assert prepare_data(config, work_dir=work, quiet=True) == paths  # unchanged weights: every stage reused
    assert {name: _digest(p) for name, p in stages.items()} == before
    init_random_checkpoint("vit_small_patch8", dino, seed=1)  # the same paths, other bytes
    save_random_model("zoedepth", zoe, seed=1)
    with caplog.at_level(logging.WARNING, logger="repro"):
        prepare_data(config, work_dir=work, quiet=True)
    after = {name: _digest(p) for name, p in stages.items()}
    assert [name for name in stages if after[name] == before[name]] == []  # shards hold the depth maps
    rebuilt = [r.getMessage() for r in caplog.records if "rebuilding" in r.getMessage()]
    for name in ("image depth", "depth", "shards", "knn", "features"):
        assert sum(str(stages[name]) in m for m in rebuilt) == 1, (name, rebuilt)  # said once per stage
    assert any("checkpoint_sha256 changed" in m for m in rebuilt) and any("weights_sha256" in m for m in rebuilt)
    recorded = json.loads(paths.knn.with_suffix(".npz.json").read_text())["params"]
    assert recorded["checkpoint_sha256"] == file_sha256(dino)
    features = json.loads((paths.features / "index.json").read_text())["params"]
    assert features["checkpoint_sha256"] == file_sha256(dino)
    assert json.loads((paths.image_depth / "index.json").read_text())["params"]["weights_sha256"] == content_sha256(zoe)
