"""The feature store: frozen features of every training crop computed once, memory-mapped fp16, verified."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from repro.data.crops import iter_crops
from repro.data.features import FeatureStore, FeatureStoreError
from repro.data.transforms import images_to_tensor
from repro.models.backbone import DinoBackbone
from repro.runs.entry import prepare_data, resolve_entry
from repro.training.loop import FINAL, train
from sample_helpers import quick_demo_overrides, random_dino

ENTRY = "demo/nyuv2-mini"


@pytest.fixture(scope="module")
def store(shared_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("store")
    ckpt = random_dino(work)
    overrides = quick_demo_overrides(shared_data, ckpt, "train.val_every=0", "train.feature_store=true",
                                     "train.max_steps=4")
    config = resolve_entry(ENTRY, overrides=overrides)
    paths = prepare_data(config, work_dir=work, quiet=True)
    return config, paths, ckpt


def test_stored_features_are_the_backbones_in_float16(store):
    config, paths, ckpt = store
    crops = list(iter_crops(paths.crops))
    features = FeatureStore(paths.features)
    assert len(features) == len(crops) == 50
    backbone = DinoBackbone(config.model.arch, ckpt)
    for start in (0, 40):
        batch = crops[start:start + 10]
        direct = backbone(images_to_tensor([c.image for c in batch]))
        stored = features.get([c.key for c in batch])
        assert stored.shape == direct.shape == (10, 384, 14, 14)
        assert torch.allclose(stored, direct, rtol=2e-3, atol=2e-3)  # float16 rounding
        assert torch.equal(stored, direct.half().float())
    with pytest.raises(KeyError, match="not in the feature store"):
        features.get(["no-such-crop"])


def test_training_reads_the_store_deterministically_and_a_rerun_reuses_it(store, tmp_path):
    config, paths, _ = store
    stamp = (paths.features / "features.npy").stat().st_mtime_ns
    a = train(config, tmp_path / "a", shards=paths.shards, knn=paths.knn, quiet=True, features=paths.features)
    b = train(config, tmp_path / "b", shards=paths.shards, knn=paths.knn, quiet=True, features=paths.features)
    pa, pb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert a == tmp_path / "a" / FINAL and pa["meta"]["step"] == 4
    assert all(torch.equal(pa["head"][k], pb["head"][k]) for k in pa["head"])
    assert pa["meta"]["feature_cache"]["misses"] > 0
    prepare_data(config, work_dir=paths.features.parents[2], quiet=True)  # the store is reused, not rebuilt
    assert (paths.features / "features.npy").stat().st_mtime_ns == stamp


def test_a_modified_store_is_refused(store, tmp_path):
    _, paths, _ = store
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("features.npy", "index.json"):
        (copy / name).write_bytes((paths.features / name).read_bytes())
    raw = bytearray((copy / "features.npy").read_bytes())
    raw[-3] ^= 0xFF
    (copy / "features.npy").write_bytes(bytes(raw))
    with pytest.raises(FeatureStoreError, match="does not match its checksum"):
        FeatureStore(copy)
    index = json.loads((copy / "index.json").read_text())
    assert index["shape"] == [50, 384, 14, 14] and index["dtype"] == "float16"
    np.load(copy / "features.npy", mmap_mode="r")  # still a valid .npy: only the checksum catches it
