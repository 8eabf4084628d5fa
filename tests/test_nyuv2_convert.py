"""`repro data convert nyuv2`: official-format inputs built from the real nyuv2-mini frames convert back
to exactly the sample's PNGs.

The .mat files are written with h5py the way MATLAB v7.3 stores ``nyu_depth_v2_labeled.mat``: HDF5 with
a 512-byte MATLAB header, the official variable names, and MATLAB's column-major axes (h5py sees
``images`` as (N, 3, W, H) and ``depths``/``rawDepths``/``labels`` as (N, W, H)). ``splits.mat`` and the
nyuv2-meta-data mapping files are MATLAB v5 files in the published variable names and shapes.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from repro.cli.main import main
from repro.data import NYUv2, verify_dataset
from repro.data.datasets.nyuv2 import NYU13_CLASS_NAMES
from repro.data.datasets.nyuv2_convert import convert_nyuv2, depth_m_to_mm
from repro.utils.errors import DatasetError, MissingFileError

SAMPLE = [1, 2, 9, 14, 15, 16, 17, 18, 21, 28]  # nyuv2-mini: the first ten official test images
TRAIN = {3: 1, 4: 2, 5: 9}  # train frames (official train indices 3, 4, 5) mirror sample frames 1, 2, 9
MATLAB_HEADER = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Tue Jun  5 12:00:00 2012 HDF5 schema 1.00 ."


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def frames(shared_data) -> dict[int, dict[str, np.ndarray]]:
    """index -> rgb (H, W, 3) uint8, mm (H, W) uint16, raw_mm (with sensor holes), label13 (H, W) uint8."""
    root = shared_data / "nyuv2-mini"
    out = {i: {"rgb": _read(root / "rgb" / f"{i:04d}.png"), "mm": _read(root / "depth" / f"{i:04d}.png"),
               "label13": _read(root / "label13" / f"{i:04d}.png")} for i in SAMPLE}
    for i, src in TRAIN.items():
        out[i] = {k: np.ascontiguousarray(v[:, ::-1]) for k, v in out[src].items()}
    for f in out.values():  # raw depth: zero ("no reading") beyond 6 m and on unlabelled pixels
        f["raw_mm"] = np.where((f["mm"] > 6000) | (f["label13"] == 0), 0, f["mm"]).astype(np.uint16)
    return out


def _mapping(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A class mapping in nyuv2-meta-data's format: mapClass (894 -> 40), labels13 (40 -> 13) and the lut."""
    rng = np.random.default_rng(seed)
    labels13 = np.r_[np.arange(1, 14), rng.integers(1, 14, 27)].astype(np.uint8)
    map_class = rng.permutation(np.r_[np.arange(1, 41), rng.integers(1, 41, 854)]).astype(np.uint8)
    lut = np.r_[0, labels13[map_class.astype(int) - 1]]
    return map_class, labels13, lut


def _to_894(label13: np.ndarray, lut: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """894-class labels that map back to ``label13``: per pixel a random class of the same 13-class."""
    out = np.zeros(label13.shape, np.uint16)
    for c in range(1, 14):
        mask = label13 == c
        out[mask] = rng.choice(np.flatnonzero(lut == c), size=int(mask.sum()))
    return out


def write_labeled_mat(path: Path, frames: dict, n: int, *, drop: tuple[str, ...] = ()) -> Path:
    """``nyu_depth_v2_labeled.mat`` as MATLAB v7.3 writes it; frames not in ``frames`` stay unallocated."""
    h, w = next(iter(frames.values()))["rgb"].shape[:2]
    lut, rng = _mapping()[2], np.random.default_rng(1)
    spec = {"images": ((n, 3, w, h), np.uint8, "uint8", lambda f: f["rgb"].transpose(2, 1, 0)),
            "depths": ((n, w, h), np.float32, "single", lambda f: (f["mm"] / 1000.0).astype(np.float32).T),
            "rawDepths": ((n, w, h), np.float32, "single", lambda f: (f["raw_mm"] / 1000.0).astype(np.float32).T),
            "labels": ((n, w, h), np.uint16, "uint16", lambda f: _to_894(f["label13"], lut, rng).T)}
    with h5py.File(path, "w", userblock_size=512) as h5:
        for name, (shape, dtype, matlab_class, make) in spec.items():
            if name in drop:
                continue
            ds = h5.create_dataset(name, shape=shape, dtype=dtype, chunks=(1, *shape[1:]))
            ds.attrs["MATLAB_class"] = np.bytes_(matlab_class)
            for i, f in frames.items():
                ds[i - 1] = make(f)
    with open(path, "r+b") as fh:
        fh.write(MATLAB_HEADER.ljust(116) + bytes(8) + b"\x00\x02IM")
    return path


def write_splits(path: Path, train, test) -> Path:
    savemat(path, {"trainNdxs": np.asarray(train, np.uint16)[:, None], "testNdxs": np.asarray(test, np.uint16)[:, None]})
    return path


def write_mapping_files(folder: Path) -> list[Path]:
    map_class, labels13, _ = _mapping()
    savemat(folder / "classMapping40.mat", {"mapClass": map_class[None, :]})
    names = np.empty((1, 13), dtype=object)
    names[0, :] = list(NYU13_CLASS_NAMES)
    savemat(folder / "class13Mapping.mat", {"classMapping13": {"labels13": labels13[None, :], "classNames": names}})
    return [folder / "class13Mapping.mat", folder / "classMapping40.mat"]


def write_label_archives(folder: Path, frames: dict, shared_data: Path) -> list[Path]:
    """nyuv2_{train,test}_class13.tgz with members new_nyu_class13_NNNN.png (test: the sample's own files)."""
    test_tgz, train_tgz = folder / "nyuv2_test_class13.tgz", folder / "nyuv2_train_class13.tgz"
    with tarfile.open(test_tgz, "w:gz") as tar:
        for i in SAMPLE:
            tar.add(shared_data / "nyuv2-mini" / "label13" / f"{i:04d}.png", arcname=f"new_nyu_class13_{i:04d}.png")
    with tarfile.open(train_tgz, "w:gz") as tar:
        for i in TRAIN:
            data = _png_bytes(frames[i]["label13"])
            info = tarfile.TarInfo(f"new_nyu_class13_{i:04d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return [train_tgz, test_tgz]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, frames, shared_data) -> dict:
    """Full-size (480 x 640) official-format inputs: 30 frames, train 3, 4, 5 and test = the sample."""
    d = tmp_path_factory.mktemp("nyu-inputs")
    return {"mat": write_labeled_mat(d / "nyu_depth_v2_labeled.mat", frames, 30),
            "splits": write_splits(d / "splits.mat", list(TRAIN), SAMPLE),
            "mapping": write_mapping_files(d), "pngs": write_label_archives(d, frames, shared_data)}


def _check_output(out: Path, frames: dict, depth_key: str = "mm") -> None:
    for i, f in frames.items():
        stem = f"{i:04d}"
        rgb, depth, label = (_read(out / sub / f"{stem}.png") for sub in ("rgb", "depth", "label13"))
        assert rgb.dtype == np.uint8 and depth.dtype == np.uint16 and label.dtype == np.uint8
        np.testing.assert_array_equal(rgb, f["rgb"])
        np.testing.assert_array_equal(depth, f[depth_key])
        np.testing.assert_array_equal(label, f["label13"])


def _manifest(out: Path) -> list[dict]:
    with (out / "manifest.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_mat_with_mapping_converts_to_the_sample_pngs_exactly(inputs, frames, shared_data, tmp_path):
    out = tmp_path / "nyuv2"
    result = convert_nyuv2(inputs["mat"], inputs["splits"], inputs["mapping"], out, progress=False)
    assert (result.frames, result.written, result.skipped) == (13, 13, 0)
    _check_output(out, frames)
    rows = _manifest(out)
    assert [(int(r["nyu_labeled_index_1based"]), r["split"]) for r in rows] == sorted(
        [(i, "train") for i in TRAIN] + [(i, "test") for i in SAMPLE])
    assert {r["depth_source"] for r in rows} == {"depths (in-painted)"}
    assert {r["label13_source"] for r in rows} == {"nyuv2-meta-data mapping classMapping40.mat + class13Mapping.mat"}
    record = json.loads((out / "conversion.json").read_text())
    assert record["label13_kind"] == "mapping" and "classMapping40.mat mapClass" in record["label13_source"]
    assert record["frame_hw"] == [480, 640] and record["counts"] == {"train": 3, "test": 10}
    # the adapter reads the result exactly like the sample itself
    mini, conv = NYUv2(shared_data / "nyuv2-mini", "test"), NYUv2(out, "test")
    assert conv.keys() == mini.keys() and len(NYUv2(out, "train")) == 3
    for a, b in zip(mini, conv):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)
        assert a.depth.dtype == b.depth.dtype == np.float32 and np.array_equal(a.depth, b.depth)


def test_label_pngs_from_archives_or_folders_give_the_same_labels(inputs, frames, tmp_path):
    out = tmp_path / "from-tgz"
    convert_nyuv2(inputs["mat"], inputs["splits"], inputs["pngs"], out, progress=False)
    _check_output(out, frames)
    rows = {int(r["nyu_labeled_index_1based"]): r["label13_source"] for r in _manifest(out)}
    assert rows[9] == "nyuv2-meta-data PNG nyuv2_test_class13.tgz:new_nyu_class13_0009.png"
    assert rows[4] == "nyuv2-meta-data PNG nyuv2_train_class13.tgz:new_nyu_class13_0004.png"
    assert json.loads((out / "conversion.json").read_text())["label13_kind"] == "png"
    extracted = tmp_path / "labels13"
    for tgz in inputs["pngs"]:
        with tarfile.open(tgz) as tar:
            tar.extractall(extracted / tgz.name.split(".")[0], filter="data")
    out2 = tmp_path / "from-folder"
    convert_nyuv2(inputs["mat"], inputs["splits"], [extracted], out2, progress=False)
    _check_output(out2, frames)


def test_raw_depth_keeps_the_zeros_via_the_cli(inputs, frames, tmp_path, capsys):
    out = tmp_path / "raw"
    argv = ["data", "convert", "nyuv2", "--mat", str(inputs["mat"]), "--splits", str(inputs["splits"]),
            "--labels13", *map(str, inputs["mapping"]), "--out", str(out), "--depth", "raw", "--quiet"]
    assert main(argv) == 0
    assert "13 frames" in capsys.readouterr().out
    _check_output(out, frames, depth_key="raw_mm")
    assert (_read(out / "depth" / "0015.png") == 0).any()
    assert {r["depth_source"] for r in _manifest(out)} == {"rawDepths (raw, 0 = no reading)"}
    s = NYUv2(out, "test")[4]  # the adapter fills the raw holes with the nearest reading (repro.depth.sensor)
    raw = frames[15]["raw_mm"]
    assert s.meta["depth_holes_filled"] == int((raw == 0).sum()) > 0 and s.depth.min() > 0
    assert np.array_equal(s.depth[raw > 0], raw[raw > 0].astype(np.float32) / np.float32(1000))


def test_rerun_resumes_and_refuses_other_settings(inputs, frames, tmp_path):
    out = tmp_path / "resume"
    convert_nyuv2(inputs["mat"], inputs["splits"], inputs["mapping"], out, progress=False)
    (out / "depth/0015.png").unlink()
    (out / "label13/0002.png").unlink()
    stale = out / "rgb" / ".0021.png.k2j4.tmp"  # what a killed run leaves behind
    stale.write_bytes(b"partial")
    kept = {p: p.stat().st_mtime_ns for p in out.glob("*/*.png")}
    result = convert_nyuv2(inputs["mat"], inputs["splits"], inputs["mapping"], out, progress=False)
    assert (result.written, result.skipped) == (2, 11) and not stale.exists()
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    _check_output(out, frames)
    with pytest.raises(DatasetError, match=r"conversion\.json.*rawDepths"):
        convert_nyuv2(inputs["mat"], inputs["splits"], inputs["mapping"], out, depth="raw", progress=False)
    with pytest.raises(DatasetError, match=r"conversion\.json.*png"):
        convert_nyuv2(inputs["mat"], inputs["splits"], inputs["pngs"], out, progress=False)


def _tiny(frames: dict, n: int, hw=(6, 8)) -> dict:
    """``n`` small frames cut from the real sample frames (a different window for each index)."""
    h, w = hw
    out = {}
    for i in range(1, n + 1):
        f = frames[SAMPLE[i % len(SAMPLE)]]
        y, x = (37 * i) % (480 - h), (53 * i) % (640 - w)
        out[i] = {k: np.ascontiguousarray(v[y:y + h, x:x + w]) for k, v in f.items()}
    return out


def test_official_split_sizes_pass_verify(frames, tmp_path, capsys):
    tiny = _tiny(frames, 1449)
    mat = write_labeled_mat(tmp_path / "nyu_depth_v2_labeled.mat", tiny, 1449)
    rest = np.setdiff1d(np.arange(1, 1450), SAMPLE)
    rng = np.random.default_rng(0)
    train = np.sort(rng.choice(rest, 795, replace=False))
    splits = write_splits(tmp_path / "splits.mat", train, np.setdiff1d(np.arange(1, 1450), train))
    mapping = write_mapping_files(tmp_path)
    out = tmp_path / "nyuv2"
    assert main(["data", "convert", "nyuv2", "--mat", str(mat), "--splits", str(splits),
                 "--labels13", *map(str, mapping), "--out", str(out), "--quiet"]) == 0
    report = verify_dataset("nyuv2", out)
    assert report.ok, report.lines
    assert main(["data", "verify", "nyuv2", "--root", str(out)]) == 0
    assert "expected 795 train RGB+label images, found 795" in capsys.readouterr().out
    _check_output(out, {i: tiny[i] for i in (1, 3, 700, 1449)})


@pytest.fixture()
def tiny_inputs(frames, tmp_path) -> dict:
    tiny = _tiny(frames, 12)
    return {"frames": tiny, "splits": write_splits(tmp_path / "splits.mat", [3, 4, 5], [1, 2, 12]),
            "mapping": write_mapping_files(tmp_path), "dir": tmp_path}


def _replace(mat: Path, name: str, data: np.ndarray) -> None:
    with h5py.File(mat, "r+") as h5:
        del h5[name]
        h5.create_dataset(name, data=data)


@pytest.mark.parametrize("drop, depth, labels", [(("depths",), "inpainted", "mapping"),
                                                 (("rawDepths",), "raw", "mapping"),
                                                 (("labels",), "inpainted", "mapping"),
                                                 (("images",), "inpainted", "mapping")])
def test_missing_variable_names_it_and_the_file(tiny_inputs, drop, depth, labels):
    mat = write_labeled_mat(tiny_inputs["dir"] / "nyu_depth_v2_labeled.mat", tiny_inputs["frames"], 12, drop=drop)
    out = tiny_inputs["dir"] / "out"
    with pytest.raises(DatasetError, match=rf"nyu_depth_v2_labeled\.mat: no variable '{drop[0]}'"):
        convert_nyuv2(mat, tiny_inputs["splits"], tiny_inputs[labels], out, depth=depth, progress=False)
    assert not out.exists()  # nothing is written before every input is checked


@pytest.mark.parametrize("name, make", [
    ("images", lambda f: np.stack([f[i]["rgb"] for i in sorted(f)])),                  # numpy order (N, H, W, 3)
    ("depths", lambda f: np.stack([f[i]["mm"] / 1000.0 for i in sorted(f)])),            # (N, H, W): not transposed
    ("labels", lambda f: np.stack([f[i]["label13"].T for i in sorted(f)])[:, None]),     # 4-D
    ("images", lambda f: np.stack([f[i]["rgb"].transpose(2, 1, 0) for i in sorted(f)]).astype(np.float32)),
])
def test_wrong_shape_names_the_variable(tiny_inputs, name, make):
    mat = write_labeled_mat(tiny_inputs["dir"] / "nyu_depth_v2_labeled.mat", tiny_inputs["frames"], 12)
    _replace(mat, name, make(tiny_inputs["frames"]))
    with pytest.raises(DatasetError, match=rf"nyu_depth_v2_labeled\.mat: variable '{name}' has shape"):
        convert_nyuv2(mat, tiny_inputs["splits"], tiny_inputs["mapping"], tiny_inputs["dir"] / "out", progress=False)


@pytest.mark.parametrize("train, test, var", [([3, 4, 13], [1, 2], "trainNdxs"), ([3], [0, 1], "testNdxs")])
def test_split_index_out_of_range_names_the_variable(tiny_inputs, train, test, var):
    mat = write_labeled_mat(tiny_inputs["dir"] / "nyu_depth_v2_labeled.mat", tiny_inputs["frames"], 12)
    splits = write_splits(tiny_inputs["dir"] / "my_splits.mat", train, test)
    with pytest.raises(DatasetError, match=rf"my_splits\.mat: variable '{var}' has indices outside 1\.\.12"):
        convert_nyuv2(mat, splits, tiny_inputs["mapping"], tiny_inputs["dir"] / "out", progress=False)


def test_other_bad_inputs_say_what_and_where(tiny_inputs, shared_data):
    d = tiny_inputs["dir"]
    mat = write_labeled_mat(d / "nyu_depth_v2_labeled.mat", tiny_inputs["frames"], 12)
    out = d / "out"
    savemat(d / "old.mat", {"images": np.zeros((2, 2, 3), np.uint8)})  # MATLAB v5, not v7.3
    with pytest.raises(DatasetError, match=r"old\.mat: not a MATLAB v7\.3 \(HDF5\) file"):
        convert_nyuv2(d / "old.mat", tiny_inputs["splits"], tiny_inputs["mapping"], out, progress=False)
    savemat(d / "nosplit.mat", {"trainNdxs": np.array([[3]], np.uint16)})
    with pytest.raises(DatasetError, match=r"nosplit\.mat: no variable 'testNdxs'"):
        convert_nyuv2(mat, d / "nosplit.mat", tiny_inputs["mapping"], out, progress=False)
    with pytest.raises(DatasetError, match=r"in both 'trainNdxs' and 'testNdxs': \[3\]"):
        convert_nyuv2(mat, write_splits(d / "overlap.mat", [3, 4], [1, 3]), tiny_inputs["mapping"], out,
                      progress=False)
    with pytest.raises(DatasetError, match="needs both classMapping40.mat"):
        convert_nyuv2(mat, tiny_inputs["splits"], tiny_inputs["mapping"][:1], out, progress=False)
    with pytest.raises(MissingFileError, match="nyu_depth_v2_labeled.mat"):
        convert_nyuv2(d / "absent" / "nyu_depth_v2_labeled.mat", tiny_inputs["splits"], tiny_inputs["mapping"], out)
    labels = d / "labels13"  # PNG source lacking frame 12
    for i in (1, 2, 3, 4, 5):
        labels.mkdir(exist_ok=True)
        (labels / f"new_nyu_class13_{i:04d}.png").write_bytes(_png_bytes(tiny_inputs["frames"][i]["label13"]))
    with pytest.raises(DatasetError, match=r"missing for 1 of 6 frames.*first indices \[12\]"):
        convert_nyuv2(mat, tiny_inputs["splits"], [labels], out, progress=False)
    assert not out.exists()
    _replace(mat, "depths", np.full((12, 8, 6), np.nan, np.float32))
    with pytest.raises(DatasetError, match=r"variable 'depths', frame 1: 48 non-finite"):
        convert_nyuv2(mat, tiny_inputs["splits"], tiny_inputs["mapping"], out, progress=False)


@pytest.mark.parametrize("value, message", [(0.0, r"no depth reading \(every value is 0\)")])
def test_all_zero_depth_is_refused_naming_the_frame(tiny_inputs, value, message):
    """Attack: `repro data convert nyuv2` accepted a file whose depths are all zero."""
    d = tiny_inputs["dir"]
    mat = write_labeled_mat(d / "nyu_depth_v2_labeled.mat", tiny_inputs["frames"], 12)
    _replace(mat, "depths", np.full((12, 8, 6), value, np.float32))
    with pytest.raises(DatasetError, match=rf"nyu_depth_v2_labeled\.mat: variable 'depths', frame \d+: {message}"):
        convert_nyuv2(mat, tiny_inputs["splits"], tiny_inputs["mapping"], d / "out", progress=False)


def test_depth_m_to_mm_rounds_to_the_nearest_millimetre():
    m = np.array([[0.0, 0.0014, 0.0016, 2.5004, 65.535]], np.float64)
    np.testing.assert_array_equal(depth_m_to_mm(m, "x"), [[0, 1, 2, 2500, 65535]])
    mm = np.arange(0, 65536, dtype=np.uint16)[None]  # every uint16 value survives float32 metres
    np.testing.assert_array_equal(depth_m_to_mm((mm / 1000.0).astype(np.float32), "x"), mm)
    with pytest.raises(DatasetError, match="outside 0..65.535 m"):
        depth_m_to_mm(np.array([[65.536]]), "frame 7")
