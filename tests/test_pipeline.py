"""The data chain on real NYUv2 samples: prepare -> depth -> shards -> knn, and bad input."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from repro.data import get_dataset
from repro.data.crops import five_crop_boxes, iter_crops, make_crops
from repro.data.knn import load_knn
from repro.data.pipeline import depth_stage, knn_stage, prepare_stage, shards_stage
from repro.data.shards import ShardError, ShardRandomAccess, iter_shards, verify_shards
from repro.depth import normalize_depth
from repro.models.backbone import init_random_checkpoint
from sample_helpers import FirstN


@pytest.fixture(scope="module")
def nyu(shared_data):
    return get_dataset("nyuv2", shared_data / "nyuv2-mini", "test")


@pytest.fixture(scope="module")
def chain(nyu, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    crops = prepare_stage(nyu, work / "crops", five_crop=True, size=224, progress=False)
    depth = depth_stage(crops, work / "depth-sensor", source="sensor", progress=False)
    shards = shards_stage(crops, depth, work / "shards-sensor", shard_size=16, depth_source="sensor")
    return work, crops, depth, shards


def test_five_crop_boxes_cover_the_corners_and_centre():
    boxes = five_crop_boxes(480, 640)
    assert boxes == [(0, 0, 240, 320), (0, 320, 240, 320), (240, 0, 240, 320), (240, 320, 240, 320), (120, 160, 240, 320)]


def test_crops_keep_image_label_and_depth_aligned(nyu):
    sample = nyu[0]
    crops = make_crops(sample, five_crop=True, size=224)
    assert [c.key for c in crops] == [f"{sample.key}_{s}" for s in ("tl", "tr", "bl", "br", "c")]
    for c in crops:
        assert c.image.shape == (224, 224, 3) and c.label.shape == (224, 224) and c.depth.shape == (224, 224)
        assert c.depth.dtype == np.float32 and c.label.dtype == np.int64
        assert set(np.unique(c.label)) <= set(range(-1, 13))  # nearest neighbour: no new label values
    # top-left crop: the 240x320 window resized to 224x298 (torchvision: int(224 * 320 / 240); nearest
    # for labels), centre-cropped at column offset 37; each label pixel comes from source pixel
    # floor((x + 0.5) * in / out)
    tl = crops[0]
    for r, c in [(0, 0), (10, 10), (100, 200), (223, 223), (150, 5)]:
        src_r, src_c = int((r + 0.5) * 240 / 224), int((c + 37 + 0.5) * 320 / 298)
        assert tl.label[r, c] == sample.label[src_r, src_c]


def test_chain_round_trip_is_exact(chain, nyu):
    work, crops, depth, shards = chain
    verify_shards(shards)
    by_key = {c.key: c for c in iter_crops(crops)}
    read = list(iter_shards(shards, verify=True))
    assert [s["key"] for s in read] == list(by_key)  # deterministic order: index order
    assert len(read) == 5 * len(nyu) == 50
    for s in read:
        crop = by_key[s["key"]]
        assert np.array_equal(s["image"], crop.image)
        assert np.array_equal(s["label"], crop.label)  # labels bit-exact, -1 preserved
        expected, (lo, hi) = normalize_depth(crop.depth)
        assert np.allclose(s["depth"], expected, atol=1e-3, rtol=0)  # float16 storage
        assert s["depth"].min() == 0.0 and s["depth"].max() == pytest.approx(1.0, abs=1e-3)
        assert s["meta"]["depth_range"] == pytest.approx([lo, hi]) and 0.5 < lo < hi < 10.5  # metres
    access = ShardRandomAccess(shards)
    probe = read[37]
    again = access.get(probe["key"])
    assert np.array_equal(again["image"], probe["image"]) and np.array_equal(again["depth"], probe["depth"])


def test_rerun_skips_finished_stages(chain, nyu):
    work, crops, depth, shards = chain
    stamp = os.stat(crops / "index.json").st_mtime_ns
    assert prepare_stage(nyu, work / "crops", five_crop=True, size=224, progress=False) == crops
    assert depth_stage(crops, work / "depth-sensor", source="sensor", progress=False) == depth
    assert os.stat(crops / "index.json").st_mtime_ns == stamp
    shard_stamp = os.stat(shards / "index.json").st_mtime_ns
    assert shards_stage(crops, depth, shards, shard_size=16, depth_source="sensor") == shards
    assert os.stat(shards / "index.json").st_mtime_ns == shard_stamp
    with pytest.raises(FileExistsError, match="other parameters"):
        shards_stage(crops, depth, shards, shard_size=8, depth_source="sensor")
    with pytest.raises(FileExistsError, match="other parameters"):
        prepare_stage(nyu, work / "crops", five_crop=False, size=224, progress=False)


def test_zoedepth_path_through_transformers(nyu, tmp_path):
    from repro.depth.hf import save_random_model

    weights = save_random_model("zoedepth", tmp_path / "zoedepth-tiny")
    crops = prepare_stage(FirstN(nyu, 1), tmp_path / "crops", five_crop=True, size=224, progress=False)
    depth = depth_stage(crops, tmp_path / "depth-zoe", source="zoedepth", weights=weights, batch_size=5, progress=False)
    index = json.loads((depth / "index.json").read_text())
    assert len(index["ranges"]) == 5
    for key, (lo, hi) in index["ranges"].items():
        d = np.load(depth / f"{key}.npy")
        assert d.shape == (224, 224) and d.min() >= 0 and d.max() <= 1 and np.isfinite([lo, hi]).all()
    shards = shards_stage(crops, depth, tmp_path / "shards-zoe", depth_source="zoedepth")
    assert [s["meta"]["depth_source"] for s in iter_shards(shards)] == ["zoedepth"] * 5


def test_knn_table_on_shards(chain, tmp_path):
    work, crops, depth, shards = chain
    ckpt = init_random_checkpoint("vit_small_patch8", tmp_path / "dino_deitsmall8_pretrain.pth")
    path = knn_stage(shards, work / "knn.npz", arch="vit_small_patch8", checkpoint=ckpt, batch_size=25)
    table = load_knn(path)
    assert len(table.keys) == 50 and table.indices.shape == (50, 30)
    assert (table.indices[:, 0] == np.arange(50)).all()  # rank 0 is the crop itself
    assert (np.diff(table.similarities, axis=1) <= 1e-5).all()
    rng = np.random.default_rng(0)
    partners = {table.draw_partner(table.keys[3], rng) for _ in range(200)}
    allowed = {table.keys[i] for i in table.indices[3, 1:8]}
    assert partners == allowed  # uniform over ranks 1..7, never itself
    mtime = os.stat(path).st_mtime_ns
    knn_stage(shards, work / "knn.npz", arch="vit_small_patch8", checkpoint=ckpt)
    assert os.stat(path).st_mtime_ns == mtime
    # recorded as made from the crops: shards of the same crops with other depth (another folder) reuse it
    shared = knn_stage(shards, work / "knn-crops.npz", arch="vit_small_patch8", checkpoint=ckpt, identity=crops)
    other = shutil.copytree(shards, tmp_path / "other-depth-shards")
    mtime = os.stat(shared).st_mtime_ns
    assert knn_stage(other, shared, arch="vit_small_patch8", checkpoint=ckpt, identity=crops) == shared
    assert os.stat(shared).st_mtime_ns == mtime and np.array_equal(load_knn(shared).indices, table.indices)


def test_truncated_shard_names_the_shard(chain, tmp_path):
    _, _, _, shards = chain
    broken = shutil.copytree(shards, tmp_path / "broken")
    victim = broken / "shard-000001.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(ShardError, match="shard-000001.tar"):
        verify_shards(broken)
    with pytest.raises(ShardError, match="shard-000001.tar"):
        for _ in iter_shards(broken):
            pass


def test_missing_depth_map_names_the_file(chain, tmp_path):
    _, crops, depth, _ = chain
    partial_depth = shutil.copytree(depth, tmp_path / "depth")
    first = json.loads((crops / "index.json").read_text())["keys"][0]
    (partial_depth / f"{first}.npy").unlink()
    with pytest.raises(FileNotFoundError, match=f"{first}.npy"):
        shards_stage(crops, partial_depth, tmp_path / "shards")
    assert not (tmp_path / "shards").exists()  # nothing half-written left behind


def test_blocked_knn_search_equals_one_search_and_brute_force():
    from repro.data.knn import search_knn

    rng = np.random.default_rng(0)
    feats = rng.standard_normal((300, 64)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    blocked, whole = search_knn(feats, k=10, block=7), search_knn(feats, k=10, block=100_000)
    assert np.array_equal(blocked[0], whole[0]) and np.array_equal(blocked[1], whole[1])
    brute = np.argsort(-(feats.astype(np.float64) @ feats.T.astype(np.float64)), axis=1, kind="stable")[:, :10]
    assert np.array_equal(blocked[0], brute)
    with pytest.raises(ValueError, match="block"):
        search_knn(feats, k=10, block=0)
