"""Every dataset adapter reads the datasets as they are published (tests/published_datasets.py fakes),
`repro data verify` tells a subset from a broken copy, and the COCO-Stuff 182->27 table that ships with
repro is the benchmark's (STEGO's hard-coded table, PiCIE's file)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from PIL import Image
from scipy.io import loadmat

import published_datasets as pub

from repro.cli.main import main
from repro.data import IGNORE, Cityscapes27, CocoStuff27, NYUv2, Potsdam3, get_dataset, verify_dataset
from repro.data.datasets.cocostuff import (
    COCO27_CLASS_NAMES, COCO_FINE_TO_COARSE27, check_mapping_file, load_fine_to_coarse
)
from repro.data.datasets.nyuv2_convert import convert_nyuv2
from repro.utils.errors import DatasetError, MissingFileError

# STEGO src/data.py (mhamilton723/STEGO @eb4d6b5), class Coco, self.fine_to_coarse: the fine ids of
# every coarse index (recorded from the dict, regrouped by coarse index). PiCIE's
# fine_to_coarse_dict.pickle (janghyuncho/PiCIE) holds the same fine_index_to_coarse_index.
STEGO_COARSE_TO_FINE = {
    0: range(71, 77), 1: range(77, 83), 2: range(51, 61), 3: range(61, 71), 4: range(83, 91), 5: range(43, 51),
    6: range(25, 33), 7: range(15, 25), 8: range(9, 15), 9: (0,), 10: range(33, 43), 11: range(1, 9),
    12: (101, 102), 13: (100, 113, 114, 115, 116, 117), 14: (120, 121, 152, 169),
    15: (97, 106, 107, 109, 111, 122, 129, 132, 155, 160, 164), 16: (99, 131, 138, 142),
    17: (91, 92, 103, 104, 108, 130, 136, 140, 151, 166, 167), 18: range(170, 177), 19: (179, 180),
    20: (94, 95, 127, 150, 157, 165), 21: (110, 124, 125, 135, 139, 143, 144, 146, 148, 153, 158),
    22: (93, 96, 118, 123, 128, 133, 141, 162, 168), 23: (105, 156), 24: (126, 134, 149, 159, 161, 181),
    25: (98, 112, 137, 145, 163), 26: (119, 147, 154, 177, 178),
}


def _read(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def _stego_fine_to_coarse() -> dict[int, int]:
    return {f: c for c, fines in STEGO_COARSE_TO_FINE.items() for f in fines}


# ---------------------------------------------------------------- the 182 -> 27 table


def test_shipped_table_is_stegos_hard_coded_table():
    stego = _stego_fine_to_coarse()
    assert sorted(stego) == list(range(182))
    assert {i: c for i, c in enumerate(COCO_FINE_TO_COARSE27)} == stego
    assert pub.published_fine_to_coarse() == stego  # the fakes store the published table


def test_shipped_table_is_picies_file(shared_data):
    path = shared_data / "cocostuff-curated" / "fine_to_coarse_dict.json"  # PiCIE's dict, exported to JSON
    data = json.loads(path.read_text())
    assert {int(k): v for k, v in data["fine_index_to_coarse_index"].items()} == dict(enumerate(COCO_FINE_TO_COARSE27))
    lut, names = load_fine_to_coarse(path)
    assert names == COCO27_CLASS_NAMES
    np.testing.assert_array_equal(lut[:182], COCO_FINE_TO_COARSE27)
    check_mapping_file(path)  # no error


# ---------------------------------------------------------------- COCO-Stuff-27


def _expected_coco_label(png) -> np.ndarray:
    fine = _read(png).astype(np.int64)
    table = _stego_fine_to_coarse()
    return np.vectorize(lambda v: table.get(v, -1))(fine)


def test_stego_cocostuff_copy_reads_verifies_and_prepares(tmp_path, capsys):
    root = pub.write_cocostuff_stego(tmp_path / "cocostuff", n_train=4, n_val=3)
    assert not (root / "fine_to_coarse_dict.json").exists()
    assert not (root / "annotations/stuffthingmaps_trainval2017").exists()
    for split, folder, n in (("train", "train2017", 4), ("val", "val2017", 3)):
        ds = CocoStuff27(root, split)
        ids = (root / "curated" / folder / "Coco164kFull_Stuff_Coarse_7.txt").read_text().split()
        assert len(ds) == n and ds.keys() == [f"cocostuff27_{split}_{i}" for i in sorted(ids)]
        s = ds[0]
        first = sorted(ids)[0]
        np.testing.assert_array_equal(s.label, _expected_coco_label(root / "annotations" / folder / f"{first}.png"))
        assert s.image.shape == (64, 80, 3) and (s.label == IGNORE).any()
    report = verify_dataset("cocostuff27", root)
    assert report.ok, report.lines
    assert "ok   val: subset: 3 of 2,175 images, layout OK" in report.lines
    assert "ok   train: subset: 4 of 49,629 images, layout OK" in report.lines
    assert any(line.startswith("info fine_to_coarse_dict.json/.pickle not present") for line in report.lines)
    assert any(line.startswith("info train: curated/train2017/Coco164kFull_Stuff_Coarse.txt (4 ids) is the list "
                               "STEGO's code trains") for line in report.lines)
    assert main(["data", "verify", "cocostuff27", "--root", str(root)]) == 0
    assert "cocostuff27: subset: 7 of 51,804 images, layout OK" in capsys.readouterr().out
    out = tmp_path / "crops"
    assert main(["prepare", "cocostuff27", "--root", str(root), "--split", "val", "--out", str(out),
                 "--size", "32", "--no-five-crop", "--quiet"]) == 0
    assert len(json.loads((out / "index.json").read_text())["keys"]) == 3


def test_broken_copy_is_an_error_not_a_subset(tmp_path, capsys):
    root = pub.write_cocostuff_stego(tmp_path / "cocostuff", n_train=2, n_val=3)
    victim = (root / "curated/val2017/Coco164kFull_Stuff_Coarse_7.txt").read_text().split()[1]
    (root / "annotations/val2017" / f"{victim}.png").unlink()
    report = verify_dataset("cocostuff27", root)
    assert not report.ok and "val" not in report.subsets and "train" in report.subsets
    assert f"FAIL val: expected 2,175 val image+label pairs, found 2; first missing: {victim} " \
           f"(annotations/val2017/{victim}.png)" in report.lines
    assert main(["data", "verify", "cocostuff27", "--root", str(root)]) == 1
    assert "cocostuff27: FAILED" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["pickle", "json"])
def test_picie_layout_reads_and_verifies(tmp_path, shared_data, fmt):
    real = json.loads((shared_data / "cocostuff-curated" / "fine_to_coarse_dict.json").read_text())
    root = pub.write_cocostuff_picie(tmp_path / "coco", n_train=2, n_val=2, mapping=real, formats=(fmt,))
    ds = get_dataset("cocostuff27", root, "val")
    assert ds.mapping_file == root / f"fine_to_coarse_dict.{fmt}"
    item_id = sorted((root / "curated/val2017/Coco164kFull_Stuff_Coarse_7.txt").read_text().split())[0]
    np.testing.assert_array_equal(ds[0].label, _expected_coco_label(root / "annotations/val2017" / f"{item_id}.png"))
    report = verify_dataset("cocostuff27", root)
    assert report.ok and f"ok   fine_to_coarse_dict.{fmt}: agrees with the shipped 182->27 table" in report.lines
    assert main(["prepare", "cocostuff27", "--root", str(root), "--split", "train", "--out", str(tmp_path / "crops"),
                 "--size", "32", "--quiet"]) == 0
    assert len(json.loads((tmp_path / "crops" / "index.json").read_text())["keys"]) == 2 * 5  # five-crops


def test_picie_pickle_as_published_without_names(tmp_path):
    root = pub.write_cocostuff_picie(tmp_path / "coco", n_train=1, n_val=1)  # only fine_index_to_coarse_index
    assert pickle.loads((root / "fine_to_coarse_dict.pickle").read_bytes()).keys() == {"fine_index_to_coarse_index"}
    assert verify_dataset("cocostuff27", root).ok


def test_mapping_file_that_disagrees_is_a_clear_error(tmp_path, capsys):
    table = pub.published_fine_to_coarse()
    table[156] = 22  # sky-other -> plant-stuff
    root = pub.write_cocostuff_picie(tmp_path / "coco", n_train=1, n_val=1,
                                     mapping={"fine_index_to_coarse_index": table}, formats=("json",))
    with pytest.raises(DatasetError, match=r"fine_to_coarse_dict.json: .*differs .* at 1 fine ids: "
                                           r"156: 22 \(benchmark 23\)"):
        CocoStuff27(root, "val")
    report = verify_dataset("cocostuff27", root)
    assert not report.ok and any(line.startswith("FAIL") and "156: 22" in line for line in report.lines)
    assert main(["data", "verify", "cocostuff27", "--root", str(root)]) == 1
    capsys.readouterr()
    assert main(["prepare", "cocostuff27", "--root", str(root), "--split", "val", "--out", str(tmp_path / "crops"),
                 "--size", "32", "--no-five-crop", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("repro: error: ") and "fine_to_coarse_dict.json" in err[0]
    assert not (tmp_path / "crops").exists()


def test_mapping_pickle_with_code_is_refused(tmp_path):
    code = pickle.dumps({"fine_index_to_coarse_index": {0: np.int64(9)}})  # references numpy: not plain data
    (tmp_path / "fine_to_coarse_dict.pickle").write_bytes(code)
    with pytest.raises(DatasetError, match="refusing to load numpy"):
        check_mapping_file(tmp_path / "fine_to_coarse_dict.pickle")


# ---------------------------------------------------------------- Cityscapes


def test_recorded_cityscapes_labels_are_torchvisions():
    from torchvision.datasets import Cityscapes

    assert pub.CITYSCAPES_LABELS == tuple((c.name, c.id, c.color) for c in Cityscapes.classes if c.id >= 0)
    assert [c.id for c in Cityscapes.classes if c.has_instances] == list(range(24, 34))


def test_official_cityscapes_tree_reads_and_verifies(tmp_path):
    from torchvision.datasets import Cityscapes

    root = pub.write_cityscapes(tmp_path / "cityscapes", per_city=2)
    # the fake is what torchvision (STEGO's reader) expects, every target type included
    tv = Cityscapes(str(root), split="val", mode="fine", target_type=["instance", "semantic", "color", "polygon"])
    assert len(tv) == 4 and tv[0][1][3]["imgWidth"] == 128
    assert len(Cityscapes(str(root), split="test", mode="fine", target_type="semantic")) == 2
    for split in ("train", "val"):
        ds = Cityscapes27(root, split)
        assert len(ds) == 4
        for i in range(len(ds)):
            s = ds[i]
            lid = _read(root / s.meta["label"]).astype(np.int64)
            np.testing.assert_array_equal(s.label, np.where((lid >= 7) & (lid <= 33), lid - 7, -1))
            assert s.image.shape == (64, 128, 3)
    with pytest.raises(ValueError, match="split"):
        Cityscapes27(root, "test")
    report = verify_dataset("cityscapes27", root)
    assert report.ok and report.subsets == {"train": (4, 2975), "val": (4, 500)}
    assert "ok   val: subset: 4 of 500 images, layout OK" in report.lines


def test_cityscapes_missing_label_is_broken(tmp_path):
    root = pub.write_cityscapes(tmp_path / "cityscapes", per_city=1)
    (root / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png").unlink()
    report = verify_dataset("cityscapes27", root, splits=["val"])
    assert not report.ok and not report.subsets
    assert any("first missing: gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png" in ln for ln in report.lines)


# ---------------------------------------------------------------- Potsdam


def _merged(gt: np.ndarray) -> np.ndarray:
    # STEGO src/data.py Potsdam.fine_to_coarse: {0, 4} -> 0 roads and cars, {1, 5} -> 1, {2, 3} -> 2
    return np.select([np.isin(gt, (0, 4)), np.isin(gt, (1, 5)), np.isin(gt, (2, 3))], [0, 1, 2], -1)


def test_iic_potsdam_reads_labelled_and_unlabelled_tiles(tmp_path):
    root = pub.write_potsdam(tmp_path / "potsdam", n_labelled_train=3, n_labelled_test=2, n_unlabelled=2)
    train = Potsdam3(root, "train")
    assert len(train) == 3 and len(Potsdam3(root, "val")) == 2
    for i in range(len(train)):
        s = train[i]
        tile = s.meta["id"]
        np.testing.assert_array_equal(s.image, loadmat(root / "imgs" / f"{tile}.mat")["img"][:, :, :3])
        np.testing.assert_array_equal(s.label, _merged(loadmat(root / "gt" / f"{tile}.mat")["gt"]))
    unlabelled = set((root / "unlabelled_train.txt").read_text().split())
    everything = Potsdam3(root, "all")
    assert len(everything) == 7
    for i in range(len(everything)):
        s = everything[i]
        if s.meta["id"] in unlabelled:  # STEGO: to_pil_image(torch.ones) = 255 -> fine_to_coarse[255] = -1
            assert s.label.shape == (200, 200) and (s.label == IGNORE).all() and s.meta["unlabelled"]
        else:
            np.testing.assert_array_equal(s.label, _merged(loadmat(root / "gt" / f"{s.meta['id']}.mat")["gt"]))
    report = verify_dataset("potsdam3", root)
    assert report.ok, report.lines
    assert "ok   labelled_test: subset: 2 of 855 images, layout OK" in report.lines
    assert "ok   unlabelled_train: subset: 2 of 3,150 images, layout OK" in report.lines


def test_prepare_potsdam_all_with_unlabelled_tiles(tmp_path):
    root = pub.write_potsdam(tmp_path / "potsdam", n_labelled_train=2, n_labelled_test=1, n_unlabelled=2)
    out = tmp_path / "crops"
    assert main(["prepare", "potsdam3", "--root", str(root), "--split", "all", "--out", str(out),
                 "--size", "32", "--no-five-crop", "--quiet"]) == 0
    keys = json.loads((out / "index.json").read_text())["keys"]
    assert len(keys) == 5
    for tile in (root / "unlabelled_train.txt").read_text().split():
        assert (np.load(out / f"potsdam3_all_{tile}.label.npy") == IGNORE).all()


def test_potsdam_missing_gt_in_a_labelled_split_stays_an_error(tmp_path):
    root = pub.write_potsdam(tmp_path / "potsdam", n_labelled_train=2, n_labelled_test=1, n_unlabelled=1)
    tile = (root / "labelled_train.txt").read_text().split()[0]
    (root / "gt" / f"{tile}.mat").unlink()
    ds = Potsdam3(root, "train")
    with pytest.raises(MissingFileError, match=f"gt/{tile}.mat"):
        [ds[i] for i in range(len(ds))]
    report = verify_dataset("potsdam3", root, splits=["train"])
    assert not report.ok and not report.subsets


# ---------------------------------------------------------------- NYUv2


@pytest.mark.parametrize("labels13", ["class_mapping", "label_archives"])
def test_official_nyuv2_files_convert_read_and_verify(tmp_path, labels13, capsys):
    src = pub.write_nyuv2(tmp_path / "nyu", train=(2, 3, 6), test=(1, 4, 5), n_frames=8)
    meta = src / "nyuv2-meta-data"
    sources = ([meta / "classMapping40.mat", meta / "class13Mapping.mat"] if labels13 == "class_mapping" else
               [meta / "train_labels_13/nyuv2_train_class13.tgz", meta / "test_labels_13/nyuv2_test_class13.tgz"])
    out = tmp_path / "converted"
    convert_nyuv2(src / "nyu_depth_v2_labeled.mat", src / "splits.mat", sources, out, progress=False)
    content = pub.nyuv2_content(n_frames=8)
    for split, indices in (("train", (2, 3, 6)), ("test", (1, 4, 5))):
        ds = NYUv2(out, split)
        assert ds.keys() == [f"nyuv2_{split}_{i:04d}" for i in indices]
        for j, i in enumerate(indices):
            s = ds[j]
            np.testing.assert_array_equal(s.image, content["rgb"][i - 1])
            np.testing.assert_array_equal(s.label, content["label13"][i - 1].astype(np.int64) - 1)
            np.testing.assert_allclose(s.depth, np.rint(content["depth"][i - 1].astype(np.float64) * 1000) / 1000,
                                       atol=1e-6)
    report = verify_dataset("nyuv2", out)
    assert report.ok and report.subsets == {"train": (3, 795), "test": (3, 654)}
    assert main(["data", "verify", "nyuv2", "--root", str(out)]) == 0
    assert "nyuv2: subset: 6 of 1,449 images, layout OK" in capsys.readouterr().out


def test_an_empty_split_is_missing_not_a_subset(tmp_path):
    root = pub.write_potsdam(tmp_path / "potsdam", n_labelled_train=2, n_labelled_test=1, n_unlabelled=1)
    (root / "labelled_test.txt").write_text("")
    report = verify_dataset("potsdam3", root, splits=["val"])
    assert not report.ok and not report.subsets
    assert "FAIL labelled_test: expected 855 ids with image+gt, found 0" in report.lines


def test_fakes_are_deterministic(tmp_path):
    for write in (pub.write_cocostuff_stego, pub.write_cityscapes, pub.write_potsdam):
        a, b = write(tmp_path / f"{write.__name__}-a"), write(tmp_path / f"{write.__name__}-b")
        files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and files
        for rel in files:
            if rel.suffix == ".mat":  # the MATLAB v5 header holds the creation date
                ma, mb = loadmat(a / rel), loadmat(b / rel)
                key = "img" if rel.parts[0] == "imgs" else "gt"
                np.testing.assert_array_equal(ma[key], mb[key])
            else:
                assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_write_all_gives_a_data_root_that_verifies(tmp_path):
    written = pub.write_all(tmp_path / "data", n_train=3, n_val=2)
    for name in ("cocostuff27", "cityscapes27", "potsdam3"):
        report = verify_dataset(name, written[name])
        assert report.ok and report.subsets, (name, report.lines)
    out = tmp_path / "data" / "nyuv2"
    meta = written["nyuv2-published"] / "nyuv2-meta-data"
    assert main(["data", "convert", "nyuv2", "--mat", str(written["nyuv2-published"] / "nyu_depth_v2_labeled.mat"),
                 "--splits", str(written["nyuv2-published"] / "splits.mat"), "--labels13",
                 str(meta / "classMapping40.mat"), str(meta / "class13Mapping.mat"), "--out", str(out), "--quiet"]) == 0
    assert verify_dataset("nyuv2", out).subsets == {"train": (3, 795), "test": (2, 654)}
