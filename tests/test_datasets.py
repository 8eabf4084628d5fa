"""Dataset adapters on the real sample data (../shared/data), plus malformed inputs in tmp_path."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from scipy.io import savemat

from repro.data import (
    DATASETS, IGNORE, Cityscapes27, CocoStuff27, NYUv2, Potsdam3, cityscapes_label_ids_to_27, coco_fine_to_coarse,
    get_dataset, load_manifest, potsdam_merge_6_to_3, verify_dataset
)
from repro.data.datasets.base import Sample, validate_sample
from repro.data.datasets.cocostuff import COCO27_CLASS_NAMES, read_id_list
from repro.utils.errors import DatasetError, MissingFileError

KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
CS_FRAME = "frankfurt/frankfurt_000000_000294"
# Official Cityscapes labelId -> trainId (cityscapesscripts labels.py) for the 19 evaluated classes.
LABEL_ID_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                        25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# ---------------------------------------------------------------- Cityscapes


@pytest.fixture(scope="module")
def cityscapes(shared_data):
    ds = Cityscapes27(shared_data / "cityscapes-sample", "val")
    raw = np.asarray(Image.open(shared_data / "cityscapes-sample/gtFine/val" / f"{CS_FRAME}_gtFine_labelIds.png"))
    train_ids = np.asarray(
        Image.open(shared_data / "cityscapes-sample/gtFine/val" / f"{CS_FRAME}_gtFine_labelTrainIds.png"))
    return ds, ds[0], raw.astype(np.int64), train_ids.astype(np.int64)


def test_cityscapes_frame_labels_match_raw_label_ids(cityscapes):
    ds, sample, raw, _ = cityscapes
    assert len(ds) == 1 and ds.keys() == ["cityscapes27_val_frankfurt_000000_000294"]
    assert sample.image.shape == (128, 256, 3) and sample.image.dtype == np.uint8 and sample.depth is None
    assert sample.label.dtype == np.int64 and sample.label.shape == (128, 256)
    assert set(np.unique(sample.label)) <= {IGNORE} | set(range(27))
    assert np.all(sample.label[raw == 7] == 0)  # road
    assert np.all(sample.label[raw == 26] == 19) and ds.class_names[19] == "car"
    assert np.all(sample.label[raw < 7] == IGNORE)  # ego vehicle, rectification border, out of roi, static
    assert (raw < 7).sum() > 3000  # the frame does contain void pixels (bonnet and border)
    np.testing.assert_array_equal(sample.label, np.where((raw >= 7) & (raw <= 33), raw - 7, IGNORE))
    present = {ds.class_names[c] for c in np.unique(sample.label) if c >= 0}
    assert present == {"road", "sidewalk", "building", "fence", "pole", "traffic sign", "vegetation", "sky",
                       "person", "car"}
    assert sample.meta["label"] == f"gtFine/val/{CS_FRAME}_gtFine_labelIds.png"


def test_cityscapes_27_classes_agree_with_the_provided_train_ids(cityscapes):
    """Independent evidence: labelTrainIds (19 classes) must name the same class as our 27-class label.

    The downscaled sample's labelIds and labelTrainIds maps were resampled separately, so a few
    pixels on class boundaries differ; everywhere else the two must agree exactly.
    """
    ds, sample, raw, train_ids = cityscapes
    train_to_27 = np.full(256, -100, dtype=np.int64)
    for label_id, train_id in LABEL_ID_TO_TRAIN_ID.items():
        train_to_27[train_id] = label_id - 7
        assert ds.class_names[label_id - 7] in {"road", "sidewalk", "building", "wall", "fence", "pole",
                                                "traffic light", "traffic sign", "vegetation", "terrain", "sky",
                                                "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                                                "bicycle"}
    both = (train_ids != 255) & np.isin(raw, list(LABEL_ID_TO_TRAIN_ID))
    assert both.sum() > 25000
    agree = sample.label == train_to_27[train_ids]
    assert agree[both].mean() > 0.995
    assert np.all(sample.label[train_ids == 13][agree[train_ids == 13]] == 19)  # trainId 13 car <-> our 19 car
    # every disagreement sits within 2 px of a class boundary of the labelIds map
    edge = ndimage.maximum_filter(raw, size=5) != ndimage.minimum_filter(raw, size=5)
    assert not np.any(both & ~agree & ~edge)
    # per class, the majority trainId is the official one
    for c in np.unique(sample.label[both]):
        votes = np.bincount(train_ids[both & (sample.label == c)], minlength=256)
        assert train_to_27[votes.argmax()] == c, ds.class_names[c]


def test_cityscapes_label_id_mapping_function():
    ids = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = cityscapes_label_ids_to_27(ids)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out.ravel()[7:34], np.arange(27))
    assert np.all(out.ravel()[:7] == IGNORE) and np.all(out.ravel()[34:] == IGNORE)


# ---------------------------------------------------------------- Potsdam


def test_potsdam_crop_merges_six_classes_to_three(shared_data):
    ds = Potsdam3(shared_data / "potsdam-sample", "val", layout="mmseg")
    assert ds.keys() == ["potsdam3_val_2_10_0_0_512_512"]
    sample = ds[0]
    raw = np.asarray(Image.open(shared_data / "potsdam-sample/ann_dir/2_10_0_0_512_512.png"))
    assert sample.image.shape == (512, 512, 3) and sample.label.shape == (512, 512)
    assert set(np.unique(raw)) == {0, 1, 2, 3, 4, 5}  # this crop holds all six ISPRS classes, no ignore
    expected = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2}
    for six, three in expected.items():
        assert np.all(sample.label[raw == six] == three)
    counts = np.bincount(sample.label.ravel(), minlength=3)
    assert counts.tolist() == [np.isin(raw, [0, 4]).sum(), np.isin(raw, [1, 5]).sum(), np.isin(raw, [2, 3]).sum()]
    assert np.all(counts > 0) and counts.argmax() == 1  # mostly buildings/clutter
    assert get_dataset("potsdam3", shared_data / "potsdam-sample", "val").layout == "mmseg"  # auto-detected


def test_potsdam_merge_function_ignore_and_bad_values():
    raw = np.array([[0, 1, 2, 3], [4, 5, 255, 0]], dtype=np.uint8)
    for source in ("mmseg", "iic"):
        np.testing.assert_array_equal(potsdam_merge_6_to_3(raw, source), [[0, 1, 2, 2], [0, 1, IGNORE, 0]])
    with pytest.raises(ValueError, match="7"):
        potsdam_merge_6_to_3(np.array([[7]]))


def test_potsdam_iic_mat_layout(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(6, 5, 4), dtype=np.uint8)
    gt = np.array([[0, 1, 2, 3, 4, 5]] * 5, dtype=np.int32).T  # (6, 5)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "gt").mkdir()
    savemat(tmp_path / "imgs" / "17.mat", {"img": img})
    savemat(tmp_path / "gt" / "17.mat", {"gt": gt})
    savemat(tmp_path / "imgs" / "3.mat", {"img": img})  # unlabelled: no gt file
    (tmp_path / "labelled_test.txt").write_text("17\n")
    (tmp_path / "unlabelled_train.txt").write_text("3\n")
    ds = Potsdam3(tmp_path, "val")  # "val" -> labelled_test.txt, layout auto -> iic
    assert ds.layout == "iic" and ds.keys() == ["potsdam3_val_17"]
    s = ds[0]
    np.testing.assert_array_equal(s.image, img[:, :, :3])
    np.testing.assert_array_equal(s.label, np.array([[0, 1, 2, 2, 0, 1]] * 5).T)
    unlabelled = Potsdam3(tmp_path, "unlabelled_train", layout="iic")[0]  # STEGO: 255 -> -1 everywhere
    assert unlabelled.label.shape == (6, 5) and (unlabelled.label == IGNORE).all() and unlabelled.meta["unlabelled"]
    with pytest.raises(MissingFileError, match="labelled_train.txt"):
        Potsdam3(tmp_path, "train", layout="iic")


# ---------------------------------------------------------------- NYUv2


@pytest.fixture(scope="module")
def nyu(shared_data):
    return NYUv2(shared_data / "nyuv2-mini", "test")


def test_nyuv2_mini_depth_in_metres_and_labels(nyu, shared_data):
    assert len(nyu) == 10
    assert [s[-4:] for s in nyu.keys()] == ["0001", "0002", "0009", "0014", "0015", "0016", "0017", "0018", "0021",
                                           "0028"]
    root = shared_data / "nyuv2-mini"
    for i in range(len(nyu)):
        s = nyu[i]
        stem = s.key[-4:]
        raw_mm = np.asarray(Image.open(root / "depth" / f"{stem}.png"))
        raw_lab = np.asarray(Image.open(root / "label13" / f"{stem}.png")).astype(np.int64)
        assert raw_mm.dtype == np.uint16 and s.depth.dtype == np.float32
        np.testing.assert_array_equal(s.depth, raw_mm.astype(np.float32) / 1000.0)
        assert 0.5 <= s.depth.min() and s.depth.max() <= 10.5
        assert s.image.shape == (480, 640, 3) and s.label.shape == (480, 640) and s.label.dtype == np.int64
        assert s.label.min() >= -1 and s.label.max() <= 12
        assert np.all(s.label[raw_lab == 0] == IGNORE) and (raw_lab == 0).any()
        np.testing.assert_array_equal(s.label[raw_lab > 0], raw_lab[raw_lab > 0] - 1)
        assert s.meta["index_1based"] == int(stem) and s.meta["depth"] == f"depth/{stem}.png"
    assert nyu.class_names[11] == "wall" and nyu.num_classes == 13


def test_nyuv2_manifest_without_split_column_is_a_test_subset(shared_data):
    with pytest.raises(DatasetError, match="manifest.csv"):
        NYUv2(shared_data / "nyuv2-mini", "train")


def test_nyuv2_extra_rgb_only_has_no_depth(shared_data):
    extra = NYUv2(shared_data / "nyuv2-mini" / "extra_rgb_only", "test")
    assert len(extra) == 8 and extra.keys()[0] == "nyuv2_test_0046"
    for i in (0, 7):
        s = extra[i]
        assert s.depth is None and s.label.shape == (480, 640) and s.meta["depth"] is None
    strict = NYUv2(shared_data / "nyuv2-mini" / "extra_rgb_only", "test", require_depth=True)
    with pytest.raises(MissingFileError) as err:
        strict[0]
    assert err.value.path.name == "0046.png" and err.value.path.parent.name == "depth"
    assert "0046.png" in str(err.value)


def test_nyuv2_depthg_layout_reads_back_like_the_png_layout(nyu, shared_data, tmp_path):
    # DepthG's folders ({split}_rgb, {split}_seg13, {split}_depth; depth PNG = metres * 1e4 as uint16)
    # holding the sample frames. uint16 holds at most 6.5535 m in 1e-4 m, so the frames whose sensor
    # depth goes beyond that get no depth file (DepthG's own writer wraps them around).
    mini = shared_data / "nyuv2-mini"
    fits = []
    for stem in (k[-4:] for k in nyu.keys()):
        for sub, folder in (("rgb", "test_rgb"), ("label13", "test_seg13")):
            (tmp_path / folder).mkdir(exist_ok=True)
            shutil.copy(mini / sub / f"{stem}.png", tmp_path / folder / f"{stem}.png")
        mm = np.asarray(Image.open(mini / "depth" / f"{stem}.png")).astype(np.int64)
        if mm.max() * 10 <= np.iinfo(np.uint16).max:
            fits.append(stem)
            _png(tmp_path / "test_depth" / f"{stem}.png", (mm * 10).astype(np.uint16))
    assert fits == ["0001", "0002", "0014", "0021", "0028"]
    _png(tmp_path / "train_rgb/0003.png", np.zeros((4, 5, 3), np.uint8))
    _png(tmp_path / "train_seg13/0003.png", np.full((4, 5), 13, np.uint8))
    _png(tmp_path / "train_depth/0003.png", np.arange(65515, 65535, dtype=np.uint16).reshape(4, 5))  # not constant
    ds = NYUv2(tmp_path, "test")
    assert ds.layout == "depthg" and ds.keys() == nyu.keys()
    for a, b in zip(nyu, ds):
        np.testing.assert_array_equal(b.image, a.image)
        np.testing.assert_array_equal(b.label, a.label)
        assert b.meta["layout"] == "depthg" and b.meta["image"] == f"test_rgb/{a.key[-4:]}.png"
        if a.key[-4:] in fits:
            assert b.depth.dtype == np.float32 and np.array_equal(b.depth, a.depth)  # bit-identical metres
        else:
            assert b.depth is None
    train = NYUv2(tmp_path, "train")[0]
    assert train.key == "nyuv2_train_0003" and train.label.max() == 12
    deep = np.arange(65515, 65535, dtype=np.uint16).reshape(4, 5)  # up to 6.5534 m in units of 0.1 mm
    np.testing.assert_array_equal(train.depth, (deep.astype(np.float64) / 10000).astype(np.float32))
    report = verify_dataset("nyuv2", tmp_path)
    assert report.ok and "ok   test: subset: 10 of 654 images, layout OK" in report.lines
    assert "info test: 5 images without a sensor depth file (depth=None)" in report.lines
    with pytest.raises(MissingFileError, match="split"):  # the PNG layout cannot read DepthG's folders
        NYUv2(tmp_path, "test", layout="png")


# ---------------------------------------------------------------- COCO-Stuff-27


def test_coco_curated_lists_counts_and_checksums(shared_data):
    manifest = load_manifest("cocostuff27")
    curated = shared_data / "cocostuff-curated"
    sha = {f["path"]: f["sha256"] for f in manifest["files"]}
    for split, count in (("train", 49_629), ("val", 2_175)):
        rel = manifest["splits"][split]["id_list"]
        ids = read_id_list(curated / rel)
        assert len(ids) == len(set(ids)) == count == manifest["splits"][split]["count"]
        assert all(len(i) == 12 and i.isdigit() for i in ids)
        assert hashlib.sha256((curated / rel).read_bytes()).hexdigest() == sha[rel]
    json_path = curated / "fine_to_coarse_dict.json"
    assert hashlib.sha256(json_path.read_bytes()).hexdigest() == sha["fine_to_coarse_dict.json"]
    report = verify_dataset("cocostuff27", curated, splits=["val"])
    assert sum("sha256 matches" in line for line in report.lines) == 2  # the json and the checked val list
    assert any("expected 2,175 ids in the curated list, found 2,175" in line for line in report.lines)


def test_coco_fine_to_coarse_known_ids(shared_data):
    data = json.loads((shared_data / "cocostuff-curated" / "fine_to_coarse_dict.json").read_text())
    # fine id (0-based label-map value) -> fine name, from the COCO-Stuff label list
    known = {0: "person", 2: "car", 71: "tv", 123: "grass", 156: "sky-other", 181: "wood"}
    fine = np.array([list(known) + [255, 200]], dtype=np.uint8)
    for mapping in (data["fine_index_to_coarse_index"], data):
        out = coco_fine_to_coarse(fine, mapping)
        assert out.dtype == np.int64 and out[0, -2] == IGNORE and out[0, -1] == IGNORE
        for j, (fid, name) in enumerate(known.items()):
            assert out[0, j] == data["fine_index_to_coarse_index"][str(fid)]
            assert COCO27_CLASS_NAMES[out[0, j]] == data["fine_name_to_coarse_name"][name]
    assert out[0, :6].tolist() == [9, 11, 0, 22, 23, 24]  # person, vehicle, electronic, plant, sky, solid


@pytest.fixture()
def fake_coco(tmp_path, shared_data):
    ids = ["000000000139", "000000000785"]
    rng = np.random.default_rng(1)
    for n, i in enumerate(ids):
        shape = (12, 10) if n else (12, 10, 3)  # the second image is a grayscale JPEG
        _png(tmp_path / "images/val2017" / f"{i}.jpg", rng.integers(0, 256, size=shape, dtype=np.uint8))
        _png(tmp_path / "annotations/stuffthingmaps_trainval2017/val2017" / f"{i}.png",
             np.full((12, 10), 0 if n else 156, dtype=np.uint8))
    (tmp_path / "curated/val2017").mkdir(parents=True)
    (tmp_path / "curated/val2017/Coco164kFull_Stuff_Coarse_7.txt").write_text("\n".join(ids) + "\n")
    shutil.copy(shared_data / "cocostuff-curated" / "fine_to_coarse_dict.json", tmp_path)
    return tmp_path, ids


def test_coco_fake_root_loads(fake_coco):
    root, ids = fake_coco
    ds = get_dataset("cocostuff27", root, "val")
    assert ds.keys() == [f"cocostuff27_val_{i}" for i in ids]
    a, b = ds[0], ds[1]
    assert a.image.shape == b.image.shape == (12, 10, 3) and b.image.dtype == np.uint8
    assert np.all(a.label == 23) and np.all(b.label == 9)  # sky-stuff, person-things
    assert a.meta["image"] == f"images/val2017/{ids[0]}.jpg"


def test_coco_verify_reports_first_missing(fake_coco):
    root, ids = fake_coco
    (root / "images/val2017" / f"{ids[1]}.jpg").unlink()
    report = verify_dataset("cocostuff27", root, splits=["val"])
    assert not report.ok
    missing = [line for line in report.lines if "first missing" in line]
    assert missing and f"found 1; first missing: {ids[1]}" in missing[0]
    assert not report.subsets  # a listed file missing: a broken copy, never a subset
    assert any("a subset list" in line and line.startswith("info") for line in report.lines)  # 2 of 2,175 ids


# ---------------------------------------------------------------- bad input, registry, manifests


def test_image_label_size_mismatch_names_the_files(tmp_path):
    stem = "aachen/aachen_000000_000019"
    _png(tmp_path / "leftImg8bit/train" / f"{stem}_leftImg8bit.png", np.zeros((8, 16, 3), np.uint8))
    _png(tmp_path / "gtFine/train" / f"{stem}_gtFine_labelIds.png", np.full((8, 8), 7, np.uint8))
    with pytest.raises(DatasetError) as err:
        Cityscapes27(tmp_path, "train")[0]
    assert "aachen_000000_000019_gtFine_labelIds.png" in str(err.value)
    assert "aachen_000000_000019_leftImg8bit.png" in str(err.value) and "(8, 8)" in str(err.value)


def test_missing_cityscapes_label_raises_missing_file(tmp_path):
    _png(tmp_path / "leftImg8bit/val/x/x_1_2_leftImg8bit.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(MissingFileError, match="x_1_2_gtFine_labelIds.png"):
        Cityscapes27(tmp_path, "val")[0]


def test_nyu_label_out_of_range_names_the_file(tmp_path):
    _png(tmp_path / "rgb/0001.png", np.zeros((4, 5, 3), np.uint8))
    _png(tmp_path / "depth/0001.png", np.arange(2500, 2520, dtype=np.uint16).reshape(4, 5))  # not constant
    label = np.full((4, 5), 3, np.uint8)
    label[0, 0] = 20
    _png(tmp_path / "label13/0001.png", label)
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits/test.txt").write_text("1\n")
    ds = NYUv2(tmp_path, "test")
    with pytest.raises(DatasetError, match=r"label13[/\\]0001\.png.*20"):
        ds[0]
    with pytest.raises(MissingFileError, match="split"):  # no splits/train.txt, splits.mat or manifest.csv
        NYUv2(tmp_path, "train")


def test_shared_check_rejects_bad_labels_and_depth():
    image = np.zeros((2, 3, 3), np.uint8)
    files = {"image": "a/img.png", "label": "a/lab.png", "depth": "a/depth.png"}
    ok = Sample("k", image, np.array([[-1, 0, 12]] * 2), np.ones((2, 3), np.float32), {})
    assert validate_sample(ok, 13, files) is ok
    with pytest.raises(DatasetError, match=r"a/lab\.png.*-5, 13"):
        validate_sample(Sample("k", image, np.array([[13, -5, 0]] * 2), None, {}), 13, files)
    with pytest.raises(DatasetError, match=r"a/depth\.png.*non-finite"):
        validate_sample(Sample("k", image, None, np.full((2, 3), np.nan, np.float32), {}), 13, files)
    with pytest.raises(DatasetError, match=r"a/img\.png.*\(H, W, 3\) uint8"):
        validate_sample(Sample("k", image.astype(np.float32), None, None, {}), 13, files)


def test_potsdam_label_outside_the_six_classes_names_the_file(tmp_path):
    _png(tmp_path / "img_dir/a.png", np.zeros((3, 3, 3), np.uint8))
    _png(tmp_path / "ann_dir/a.png", np.full((3, 3), 9, np.uint8))
    with pytest.raises(DatasetError, match=r"ann_dir[/\\]a\.png.*9"):
        Potsdam3(tmp_path, "train", layout="mmseg")[0]


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_missing_root_raises_missing_file_error(tmp_path, name):
    split = {"nyuv2": "test"}.get(name, "val")
    with pytest.raises(MissingFileError) as err:
        get_dataset(name, tmp_path / "nowhere", split)
    assert err.value.path == tmp_path / "nowhere" and "fix:" in str(err.value)


def test_registry_and_manifests_agree_with_adapters():
    with pytest.raises(ValueError, match="cityscapes27.*cocostuff27.*nyuv2.*potsdam3"):
        get_dataset("pascal", ".", "val")
    for name, cls in DATASETS.items():
        m = load_manifest(name)
        assert m["name"] == name and m["num_classes"] == cls.num_classes == len(cls.class_names)
        assert tuple(m["class_names"]) == tuple(cls.class_names)
        assert m["download"] and m["license"]
    assert load_manifest("nyuv2")["splits"] == {"train": {"count": 795}, "test": {"count": 654}}
    assert load_manifest("cityscapes27")["splits"]["train"]["count"] == 2975
    with pytest.raises(MissingFileError):
        load_manifest("no-such-dataset")


def test_keys_are_safe_and_unique(shared_data, nyu):
    keys = list(nyu.keys()) + Cityscapes27(shared_data / "cityscapes-sample", "val").keys()
    keys += Potsdam3(shared_data / "potsdam-sample", "val").keys()
    assert len(set(keys)) == len(keys) and all(KEY_RE.match(k) for k in keys)
