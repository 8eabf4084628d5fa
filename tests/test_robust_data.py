"""Integrity on read, on the real NYUv2 sample: shard checksums and offsets, kNN indices, empty
manifests, NaN / all-zero / 8-bit depth, and sensor-depth holes filled on the full frame."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from repro.data import NYUv2, get_dataset
from repro.data.crops import iter_crops
from repro.data.knn import load_knn
from repro.data.pipeline import depth_stage, knn_stage, prepare_stage, shards_stage
from repro.data.shards import ShardError, ShardRandomAccess, verify_once, verify_shards
from repro.data.train_crops import TrainingCrops
from repro.depth import normalize_depth
from repro.models.backbone import init_random_checkpoint
from repro.utils.errors import DatasetError


@pytest.fixture(scope="module")
def chain(shared_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("robust-data")
    nyu = get_dataset("nyuv2", shared_data / "nyuv2-mini", "test")
    crops = prepare_stage(nyu, work / "crops", five_crop=True, size=64, progress=False)
    depth = depth_stage(crops, work / "depth", source="sensor", progress=False)
    shards = shards_stage(crops, depth, work / "shards", shard_size=16, depth_source="sensor")
    ckpt = init_random_checkpoint("vit_small_patch8", work / "dino.pth")
    knn = knn_stage(shards, work / "knn.npz", arch="vit_small_patch8", checkpoint=ckpt, k=10, batch_size=25)
    return work, crops, depth, shards, knn


def copy_shards(shards, dest):
    return shutil.copytree(shards, dest, copy_function=shutil.copy)  # new files, new modification times


def test_verification_runs_once_and_is_recorded(chain, tmp_path):
    _, _, _, shards, _ = chain
    copy = copy_shards(shards, tmp_path / "shards")  # copied files: new mtimes, so the record no longer matches
    assert verify_once(copy) is True and (copy / "verified.json").is_file()
    assert verify_once(copy) is False  # recorded: only stats are compared
    record = json.loads((copy / "verified.json").read_text())
    assert set(record["shards"]) == {s.name for s in copy.glob("shard-*.tar")}


def test_flipped_byte_in_depth_is_caught_when_a_run_opens_the_shards(chain, tmp_path):
    """Attack: a flipped byte in a shard's depth.npy went unnoticed (the sha256 was never checked)."""
    work, crops, depth, shards, knn = chain
    copy = copy_shards(shards, tmp_path / "shards")
    verify_once(copy)
    index = json.loads((copy / "index.json").read_text())
    key, (shard_idx, fields) = next(iter(index["keys"].items()))
    offset, size = fields["depth.npy"]
    path = copy / index["shards"][shard_idx]["name"]
    data = bytearray(path.read_bytes())
    data[offset + size - 1] ^= 0x01  # last byte of the float16 payload: still decodes
    path.write_bytes(bytes(data))
    assert ShardRandomAccess(copy).get(key)["depth"] is not None  # reading alone would not notice
    with pytest.raises(ShardError, match=f"{path.name} does not match its checksum"):
        TrainingCrops(copy, load_knn(knn), seed=0, num_neighbors=7)
    with pytest.raises(ShardError, match="checksum"):  # the shards stage reusing this folder checks it too
        shards_stage(crops, depth, copy, shard_size=16, depth_source="sensor")


def test_offset_pointing_at_another_crop_is_caught(chain, tmp_path):
    """Attack: an index.json offset pointing at another crop trained on the wrong depth with rc 0."""
    _, _, _, shards, knn = chain
    copy = copy_shards(shards, tmp_path / "shards")
    index = json.loads((copy / "index.json").read_text())
    (key_a, (shard_a, fields_a)), (key_b, (shard_b, fields_b)) = list(index["keys"].items())[:2]
    assert shard_a == shard_b and fields_a["depth.npy"][1] == fields_b["depth.npy"][1]
    fields_a["depth.npy"] = list(fields_b["depth.npy"])
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardError, match=f"{key_a}.depth.npy.*points at {key_b}.depth.npy"):
        ShardRandomAccess(copy).get(key_a)
    with pytest.raises(ShardError, match=f"points at {key_b}.depth.npy, not at {key_a}.depth.npy"):
        verify_shards(copy)
    with pytest.raises(ShardError, match="points at"):
        TrainingCrops(copy, load_knn(knn), seed=0, num_neighbors=7)


def test_knn_indices_out_of_range_are_refused_on_load(chain, tmp_path):
    """Attack: a kNN table with out-of-range indices raised IndexError deep in training."""
    _, _, _, _, knn = chain
    with np.load(knn) as data:
        arrays = {k: data[k] for k in data.files}
    n = len(arrays["keys"])
    arrays["indices"] = arrays["indices"].copy()
    arrays["indices"][3, 2] = n + 5
    bad = tmp_path / "knn.npz"
    np.savez(bad, **arrays)
    with pytest.raises(ValueError, match=rf"{bad}.*outside \[0, {n}\).*row 3 .*rank 2: {n + 5}"):
        load_knn(bad)
    arrays["indices"] = arrays["indices"][:-1]
    np.savez(bad, **arrays)
    with pytest.raises(ValueError, match=rf"indices must be \({n}, k\)"):
        load_knn(bad)
    assert len(load_knn(knn).keys) == n  # the real table passes


def nyu_copy(shared_data, tmp_path):
    return shutil.copytree(shared_data / "nyuv2-mini", tmp_path / "nyuv2-mini", ignore=shutil.ignore_patterns("extra*"))


def test_manifest_with_no_images_names_the_file(shared_data, tmp_path):
    """Attack: a manifest with 0 images failed with 'need at least one array to concatenate'."""
    root = nyu_copy(shared_data, tmp_path)
    manifest = root / "manifest.csv"
    manifest.write_text(manifest.read_text().splitlines()[0] + "\n")
    with pytest.raises(DatasetError, match=f"{manifest}: no NYUv2 image of split 'test'"):
        NYUv2(root, "test")


def test_zero_and_eight_bit_depth_pngs_name_the_file(shared_data, tmp_path):
    """Attack: an all-zero depth map and an 8-bit depth PNG were accepted."""
    root = nyu_copy(shared_data, tmp_path)
    zero, eight = root / "depth" / "0001.png", root / "depth" / "0002.png"
    Image.fromarray(np.zeros((480, 640), np.uint16)).save(zero)
    with Image.open(eight) as im:
        mm = np.array(im)
    Image.fromarray((mm // 40).astype(np.uint8)).save(eight)  # an 8-bit export of the same frame
    ds = NYUv2(root, "test", require_depth=True)
    with pytest.raises(DatasetError, match=f"{zero}: depth map has no reading"):
        ds[0]
    with pytest.raises(DatasetError, match=f"{eight}: 8-bit depth PNG"):
        ds[1]
    assert ds[2].depth.min() > 0


def test_a_constant_depth_png_names_the_file(shared_data, tmp_path):
    """Attack: a depth map whose every reading is the same value was accepted as sensor depth."""
    root = nyu_copy(shared_data, tmp_path)
    flat = root / "depth" / "0001.png"
    constant = np.full((480, 640), 2500, np.uint16)
    constant[:10] = 0  # holes do not make it a measurement
    Image.fromarray(constant).save(flat)
    with pytest.raises(DatasetError, match=f"{flat}: depth map is constant \\(every reading is 2500, 2.5 m\\)"):
        NYUv2(root, "test", require_depth=True)[0]


def test_nan_depth_names_the_file(chain, tmp_path):
    """Attack: NaN depth gave an error that did not name the file."""
    _, crops, depth, _, _ = chain
    bad_depth = shutil.copytree(depth, tmp_path / "depth")
    key = json.loads((crops / "index.json").read_text())["keys"][4]
    victim = bad_depth / f"{key}.npy"
    values = np.load(victim)
    values[5, 7] = np.nan
    np.save(victim, values)
    with pytest.raises(DatasetError, match=f"{victim}: depth map must be .*finite.*1 non-finite"):
        shards_stage(crops, bad_depth, tmp_path / "shards", depth_source="sensor")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".shards", "shards"))]  # no partial left
    bad_crops = shutil.copytree(crops, tmp_path / "crops")
    sensor = bad_crops / f"{key}.sensor.npy"
    metres = np.load(sensor)
    metres[0, 0] = np.inf
    np.save(sensor, metres)
    with pytest.raises(DatasetError, match=f"{sensor}: 1 pixel"):
        depth_stage(bad_crops, tmp_path / "depth-2", source="sensor", progress=False)


def test_sensor_holes_of_a_real_frame_are_filled_before_cropping(shared_data, tmp_path):
    """Attack: 0 mm holes were kept (and smeared by the bilinear resize) although the docs say they are filled.

    The sample's maps are in-painted (no zeros), so holes are cut into real frame 0001 where a
    Kinect loses them: the left border band (no IR projector overlap) and beyond 4 m."""
    root = nyu_copy(shared_data, tmp_path)
    path = root / "depth" / "0001.png"
    with Image.open(path) as im:
        mm = np.array(im)
    holes = (mm > 3400) | (np.arange(640)[None, :] < 20)
    assert 1000 < holes.sum() < mm.size // 2
    raw = np.where(holes, 0, mm).astype(np.uint16)
    Image.fromarray(raw).save(path)
    sample = NYUv2(root, "test", require_depth=True)[0]
    depth = sample.depth
    assert depth.dtype == np.float32 and depth.min() > 0 and sample.meta["depth_holes_filled"] == int(holes.sum())
    np.testing.assert_array_equal(depth[~holes], (raw[~holes] / 1000.0).astype(np.float32))
    vy, vx = np.nonzero(~holes)
    rng = np.random.default_rng(0)
    hy, hx = np.nonzero(holes)
    for i in rng.choice(len(hy), size=60, replace=False):  # brute force: the value of a nearest reading
        d2 = (vy - hy[i]) ** 2 + (vx - hx[i]) ** 2
        nearest = d2 == d2.min()
        assert depth[hy[i], hx[i]] in set((raw[vy[nearest], vx[nearest]] / 1000.0).astype(np.float32).tolist())
    crops = prepare_stage(NYUv2(root, "test", require_depth=True), tmp_path / "crops", five_crop=True, size=64,
                          progress=False)
    for crop in iter_crops(crops):
        assert crop.depth.min() > 0.5  # no zero smeared in by the resize; the frame's nearest reading is > 1.7 m
        if crop.key.endswith("0001_tl"):
            assert crop.meta["depth_holes_filled"] == int(holes.sum())
    out = depth_stage(crops, tmp_path / "depth", source="sensor", progress=False)
    key = next(k for k in json.loads((crops / "index.json").read_text())["keys"] if k.endswith("0001_tl"))
    expected, _ = normalize_depth(np.load(crops / f"{key}.sensor.npy"))
    np.testing.assert_array_equal(np.load(out / f"{key}.npy"), expected)
