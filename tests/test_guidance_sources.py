"""KBR / files depth, MDE-feature and segmentation-map guidance (DepthG Table 5, supplement B.1 / Table 3).

Each formula against a direct re-computation (R18-R22 of repro.config.fidelity), the per-image depth
files' checks, the plan costs, and the five registered entries end to end on fake data in the
published layouts (COCO-Stuff, Potsdam mmseg), each at a tiny scale.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from repro.depth.files import check_depth_files, read_depth_file
from repro.method.guidance import fed_guidance, guidance_kind, one_hot_classes, pool_guidance
from repro.method.losses import depth_correlation_tensor, depth_feature_correlation_loss
from repro.method.sampling import depth_to_points, farthest_point_sampling, fps_grid_coords, guidance_points
from repro.utils.errors import DatasetError, MissingFileError
from sample_helpers import random_dino

# ---------------------------------------------------------------- correlation (R19)


def test_scalar_depth_keeps_the_product_kernel_exactly():
    g = torch.Generator().manual_seed(0)
    d_i, d_j = torch.rand(2, 1, 3, 4, generator=g), torch.rand(2, 1, 2, 5, generator=g)
    direct = d_i[:, 0, :, :, None, None] * d_j[:, 0, None, None, :, :]
    assert torch.equal(depth_correlation_tensor(d_i, d_j), direct)


def test_multichannel_correlation_is_the_cosine_of_the_guidance_vectors():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 5, 2, 3, generator=g, dtype=torch.float64), torch.randn(2, 5, 3, 2, generator=g,
                                                                                 dtype=torch.float64)
    a[1, :, 0, 0] = 0.0  # a void cell: zero vector
    got = depth_correlation_tensor(a, b)
    for n in range(2):
        for h in range(2):
            for w in range(3):
                for u in range(3):
                    for v in range(2):
                        x, y = a[n, :, h, w].numpy(), b[n, :, u, v].numpy()
                        nx = np.linalg.norm(x)
                        want = 0.0 if nx == 0 else float(x @ y / (nx * np.linalg.norm(y)))
                        assert got[n, h, w, u, v].item() == pytest.approx(want, abs=1e-12)


def test_multichannel_loss_both_kernels_against_a_direct_computation():
    g = torch.Generator().manual_seed(2)
    guide, codes = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 6, 3, 3, generator=g)
    b = 0.1

    def direct(dd):
        cd = torch.einsum("bchw,bcuv->bhwuv", F.normalize(codes, dim=1), F.normalize(codes, dim=1)).clamp(min=0)
        return (-(dd - b) * cd).mean()

    cos = torch.einsum("bchw,bcuv->bhwuv", F.normalize(guide, dim=1), F.normalize(guide, dim=1))
    got = depth_feature_correlation_loss(guide, guide, codes, codes, b)
    assert got.item() == pytest.approx(direct(cos).item(), rel=1e-6)
    # released kernel (R7): the whole map resized to the code grid, then the same cosine
    full = torch.randn(2, 4, 7, 7, generator=g)
    small = F.interpolate(full, size=(3, 3), mode="bilinear", align_corners=True)
    cos_r = torch.einsum("bchw,bcuv->bhwuv", F.normalize(small, dim=1), F.normalize(small, dim=1))
    got_r = depth_feature_correlation_loss(full, full, codes, codes, b, kernel="released")
    assert got_r.item() == pytest.approx(direct(cos_r).item(), rel=1e-6)


# ---------------------------------------------------------------- FPS (R20)


def _direct_points(guide: np.ndarray, fov: float) -> np.ndarray:
    c, h, w = guide.shape
    f = w / (2 * math.tan(math.radians(fov) / 2))
    pts = []
    for r in range(h):
        for col in range(w):
            vec = guide[:, r, col]
            norm = np.linalg.norm(vec)
            pts.append([(col + 0.5 - w / 2) / f, (r + 0.5 - h / 2) / f, *(vec / norm if norm > 0 else vec)])
    return np.array(pts)


def _direct_fps(points: np.ndarray, n: int, start: int) -> list[int]:
    picked, dist = [start], np.full(len(points), np.inf)
    for _ in range(n - 1):
        dist = np.minimum(dist, ((points - points[picked[-1]]) ** 2).sum(1))
        dist[picked] = -1
        picked.append(int(np.argmax(dist)))
    return picked


def test_guidance_points_and_fps_against_a_direct_computation():
    g = torch.Generator().manual_seed(3)
    guide = torch.rand(2, 6, 5, 4, generator=g, dtype=torch.float64)
    guide[0, :, 2, 1] = 0.0
    pts = guidance_points(guide, fov_deg=70.0)
    for n in range(2):
        np.testing.assert_allclose(pts[n].numpy(), _direct_points(guide[n].numpy(), 70.0), rtol=0, atol=1e-12)
    coords = fps_grid_coords(guide, 3, start=torch.tensor([0, 7]), fov_deg=70.0)
    for n, start in enumerate((0, 7)):
        idx = _direct_fps(_direct_points(guide[n].numpy(), 70.0), 9, start)
        rows, cols = np.array(idx) // 4, np.array(idx) % 4
        want = np.stack((2 * cols / 3 - 1, 2 * rows / 4 - 1), -1).reshape(3, 3, 2)
        np.testing.assert_allclose(coords[n].numpy(), want, atol=1e-12)


def test_scalar_depth_keeps_the_3d_back_projection():
    depth = torch.rand(2, 1, 5, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    idx = farthest_point_sampling(depth_to_points(depth), 9, start=0)
    coords = fps_grid_coords(depth, 3, start=0)
    rows, cols = idx // 6, idx % 6
    want = torch.stack((2 * cols / 5 - 1, 2 * rows / 4 - 1), -1).reshape(2, 3, 3, 2).to(torch.float64)
    assert torch.allclose(coords, want)


def test_fps_on_two_classes_visits_both_first():
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[:, :, 6:] = 1  # a narrow stripe of class 1
    fractions = pool_guidance(one_hot_classes(labels, 2), (4, 4))
    idx = farthest_point_sampling(guidance_points(fractions), 2, start=0)
    assert fractions[0, :, idx[0, 0] // 4, idx[0, 0] % 4].argmax() == 0
    assert fractions[0, 1, idx[0, 1] // 4, idx[0, 1] % 4] == 1.0  # the second pick is in the other class


# ---------------------------------------------------------------- class fractions (R21)


def test_one_hot_class_fractions_against_counting():
    rng = np.random.default_rng(5)
    labels = rng.integers(-1, 3, size=(2, 6, 8))
    got = pool_guidance(fed_guidance(torch.from_numpy(labels), "classes", num_classes=3), (3, 2))
    for n in range(2):
        for r in range(3):
            for c in range(2):
                cell = labels[n, 2 * r : 2 * r + 2, 4 * c : 4 * c + 4]
                for k in range(3):
                    assert got[n, k, r, c].item() == pytest.approx((cell == k).sum() / cell.size)
    with pytest.raises(ValueError, match=r"\[-1, 3\)"):
        one_hot_classes(torch.tensor([[[3]]]), 3)
    assert guidance_kind("semseg") == "classes" and guidance_kind("mde_features") == "features"
    assert guidance_kind("kbr") == guidance_kind("zoedepth") == "depth"


def test_3d_lhp_is_refused_for_guidance_without_depth():
    from repro.config.entries import load_entry
    from repro.method.guidance import check_guidance_config

    for name in ("supp3/mde-features-coco", "supp3/semseg-map-potsdam"):
        check_guidance_config(load_entry(name))  # the entries themselves: no LHP
        with pytest.raises(ValueError, match="lhp.propagation=attention"):
            check_guidance_config(load_entry(name, ["lhp.enabled=true"]))
        check_guidance_config(load_entry(name, ["lhp.enabled=true", "lhp.propagation=attention"]))
    check_guidance_config(load_entry("table5/kbr", ["lhp.enabled=true"]))  # a depth map: 3D-LHP works


# ---------------------------------------------------------------- MDE features (R18)


@pytest.fixture(scope="module")
def zoe_dir(tmp_path_factory):
    from repro.depth.hf import save_random_model

    return save_random_model("zoedepth", tmp_path_factory.mktemp("zoe") / "zoedepth-tiny")


def test_mde_features_are_the_input_of_the_last_metric_head_layer(zoe_dir):
    from repro.depth.hf import ZoeDepthFeatures

    est = ZoeDepthFeatures(zoe_dir, device="cpu", tta=False)
    img = np.random.default_rng(6).integers(0, 256, size=(32, 40, 3), dtype=np.uint8)
    got = est.features([img], (4, 5))
    # direct: the network's modules called by hand, the concatenation the metric head feeds its last layer
    m = est.model
    pv = est.processor(images=[img], return_tensors="pt", input_data_format="channels_last", do_pad=False)["pixel_values"]
    with torch.inference_mode():
        maps = m.backbone.forward_with_filtered_kwargs(pv).feature_maps
        hidden, _ = m.neck(maps, pv.shape[2] // m.patch_size, pv.shape[3] // m.patch_size)
        rel, rel_feats = m.relative_head(hidden)
        rel_up = F.interpolate(rel[:, None], size=rel_feats.shape[2:], mode="bilinear", align_corners=True)
        last = torch.cat([rel_feats, rel_up], dim=1)
        full = F.interpolate(last, size=(32, 40), mode="bicubic", align_corners=False)
        want = F.adaptive_avg_pool2d(full, (4, 5))
    assert got.shape == (1, m.config.num_relative_features + 1, 4, 5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # test-time augmentation: the flipped pass, flipped back, averaged (as for depth)
    tta = ZoeDepthFeatures(zoe_dir, device="cpu", tta=True)
    both = tta.predict([img])
    torch.testing.assert_close(both, (tta._pass([img], 32, 40, flip=False) + tta._pass([img], 32, 40, flip=True)) / 2)


# ---------------------------------------------------------------- depth files (R22)


class _Images:
    """A two-image stand-in for a dataset adapter (keys, images of given sizes)."""

    name, split = "fake", "val"

    def __init__(self, shapes):
        self.shapes = shapes

    def keys(self):
        return [f"fake_val_{i}" for i in range(len(self.shapes))]

    def __len__(self):
        return len(self.shapes)

    def __getitem__(self, i):
        from repro.data.datasets.base import Sample

        return Sample(key=self.keys()[i], image=np.zeros((*self.shapes[i], 3), np.uint8), label=None, depth=None,
                      meta={"id": f"img{i}"})


def test_depth_files_are_checked_per_image_and_the_error_names_the_file(tmp_path):
    ds = _Images([(6, 8), (6, 8)])
    good = np.arange(48, dtype=np.float32).reshape(6, 8)
    np.save(tmp_path / "fake_val_0.npy", good)
    np.testing.assert_array_equal(read_depth_file(tmp_path, "fake_val_0", (6, 8)), good)
    with pytest.raises(MissingFileError, match="fake_val_1.npy"):
        check_depth_files(ds, tmp_path)
    cases = {"wrong size": (np.ones((5, 8)) * good[:5], "is 5x8 but image 'fake_val_1' is 6x8"),
             "NaN": (np.where(good > 40, np.nan, good), "NaN/inf"),
             "constant": (np.full((6, 8), 3.0), "constant"),
             "RGB": (np.zeros((6, 8, 3)), "one \\(H, W\\)")}
    for what, (array, message) in cases.items():
        np.save(tmp_path / "fake_val_1.npy", array)
        with pytest.raises(DatasetError, match=message) as err:
            check_depth_files(ds, tmp_path)
        assert str(tmp_path / "fake_val_1.npy") in str(err.value), what
    with pytest.raises(MissingFileError, match="data.depth_files"):
        read_depth_file(tmp_path / "absent", "fake_val_0")


def test_kbr_disparity_folder_becomes_depth_files(tmp_path):
    from repro.depth.files import disparity_to_depth_files

    ds = _Images([(4, 5), (4, 5)])
    rng = np.random.default_rng(9)
    disp = [rng.uniform(0.0, 1.0, size=(1, 4, 5)).astype(np.float32) for _ in range(2)]
    disp[1][0, 0, 0] = 0.0  # a zero disparity (sky): the floor keeps it finite
    (tmp_path / "disp").mkdir()
    for i, d in enumerate(disp):
        np.save(tmp_path / "disp" / f"img{i}.npy", d)
    assert disparity_to_depth_files(ds, tmp_path / "disp", tmp_path / "depth") == 2
    for i, d in enumerate(disp):
        d64 = d[0].astype(np.float64)
        want = (1.0 / np.maximum(d64, 1e-3 * d64.max())).astype(np.float32)
        np.testing.assert_array_equal(read_depth_file(tmp_path / "depth", f"fake_val_{i}", (4, 5)), want)
    np.save(tmp_path / "disp" / "img1.npy", np.zeros((3, 5), np.float32))
    with pytest.raises(DatasetError, match="img1.npy"):
        disparity_to_depth_files(ds, tmp_path / "disp", tmp_path / "depth")


def test_files_crop_map_is_the_cut_resized_and_normalised_image_map(tmp_path):
    from repro.data.crops import resize_center_crop_array
    from repro.data.pipeline import depth_stage
    from repro.depth import normalize_depth

    crops = tmp_path / "crops"
    crops.mkdir()
    rng = np.random.default_rng(7)
    full = rng.uniform(1.0, 9.0, size=(12, 10)).astype(np.float32)
    files = tmp_path / "maps"
    files.mkdir()
    np.save(files / "img_a.npy", full)
    meta = {"image_key": "img_a", "crop_box": [2, 3, 6, 5], "resized_to": 8}
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(crops / "img_a_c.img.png")
    (crops / "img_a_c.json").write_text(json.dumps(meta))
    (crops / "index.json").write_text(json.dumps({"keys": ["img_a_c"], "params": {}}))
    out = depth_stage(crops, tmp_path / "depth", source="kbr", depth_files=files, progress=False)
    want = normalize_depth(resize_center_crop_array(full[2:8, 3:8], 8, "bilinear").astype(np.float32))[0]
    np.testing.assert_array_equal(np.load(out / "img_a_c.npy"), want)
    with pytest.raises(ValueError, match="data.depth_files"):
        depth_stage(crops, tmp_path / "depth2", source="files", progress=False)
    with pytest.raises(ValueError, match="depth_scope=crop"):
        depth_stage(crops, tmp_path / "depth3", source="semseg", scope="image", progress=False)


# ---------------------------------------------------------------- plan


FIVE = ("table5/kbr", "supp3/mde-features-coco", "supp3/mde-features-potsdam", "supp3/semseg-map-coco",
        "supp3/semseg-map-potsdam")


def test_plan_prices_every_guidance_source_without_a_stand_in():
    from repro.config.entries import load_entry
    from repro.cluster.plan import load_profile
    from repro.cluster.costs import PlanError, _depth_source

    profile = load_profile(None)
    for name in FIVE:
        for fidelity in ("paper", "released"):
            cfg = load_entry(name, [f"fidelity={fidelity}"])
            notes: list[str] = []
            key, _ = _depth_source(profile, cfg, cfg.data.depth_scope, notes)
            assert not any("costed as" in n for n in notes), (name, notes)
            if cfg.data.depth_source == "mde_features":  # the ZoeDepth network itself
                assert key.startswith("depth/zoedepth/"), key
            else:  # a stored map read and cut per crop
                assert key in ("depth/crop_from_image/stage", "depth/image_plane/stage"), (name, key)
    cfg = load_entry("table5/kbr")
    with pytest.raises(PlanError, match="no depth-stage cost"):
        _depth_source(profile, _with_source(cfg, "made_up"), "crop", [])


def _with_source(cfg, source):
    import dataclasses

    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, depth_source=source))


# ---------------------------------------------------------------- the five entries end to end


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def fake_roots(shared_data, tmp_path_factory):
    """COCO-Stuff (official images + stuffthingmaps, PiCIE curated lists) and Potsdam (mmseg) fakes."""
    root = tmp_path_factory.mktemp("fake")
    rng = np.random.default_rng(8)
    coco = root / "cocostuff"
    ids = {"train2017": [f"{i:012d}" for i in (1, 2, 3, 4)], "val2017": [f"{i:012d}" for i in (5, 6)]}
    fine = np.array([0, 1, 2, 23, 96, 118, 156, 167])  # thing and stuff fine ids of several coarse classes
    for folder, names in ids.items():
        for i in names:
            _write(coco / "images" / folder / f"{i}.jpg", rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8))
            lab = np.repeat(np.repeat(rng.choice(fine, size=(5, 6)), 8, 0), 8, 1).astype(np.uint8)
            lab[:4, :4] = 255  # unlabelled
            _write(coco / "annotations/stuffthingmaps_trainval2017" / folder / f"{i}.png", lab)
        (coco / "curated" / folder).mkdir(parents=True)
        (coco / "curated" / folder / "Coco164kFull_Stuff_Coarse_7.txt").write_text("\n".join(names) + "\n")
    shutil.copy(shared_data / "cocostuff-curated" / "fine_to_coarse_dict.json", coco)
    potsdam = root / "potsdam"
    for split, n in (("train", 6), ("val", 2)):
        for k in range(n):
            _write(potsdam / "img_dir" / split / f"2_10_{k}.png", rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8))
            _write(potsdam / "ann_dir" / split / f"2_10_{k}.png",
                   np.repeat(np.repeat(rng.integers(0, 6, size=(4, 4)), 8, 0), 8, 1).astype(np.uint8))
    return {"coco": coco, "potsdam": potsdam, "dino": random_dino(root)}


def _kbr_maps(coco: Path, out: Path) -> Path:
    """Per-image depth files as a KBR run elsewhere would write them (any depth, larger = farther)."""
    from repro.data import get_dataset

    for split in ("train", "val"):
        ds = get_dataset("cocostuff27", coco, split)
        for i, key in enumerate(ds.keys()):
            h, w = ds[i].image.shape[:2]
            yy, xx = np.mgrid[0:h, 0:w]
            out.mkdir(parents=True, exist_ok=True)
            np.save(out / f"{key}.npy", (1.0 + yy / h + 0.3 * np.sin(xx / 5.0)).astype(np.float32))
    return out


TINY = ["scale=smoke", "data.crop_size=32", "data.val_size=32", "sampling.feature_samples=3", "eval.crf=false"]
"""The smoke scale (repro/config/scales.yaml) on 32 px crops without CRF: seconds per entry."""


@pytest.mark.parametrize("entry,fidelity", [(e, "paper") for e in FIVE] + [("table5/kbr", "released")])
def test_entry_runs_end_to_end_on_fake_data(entry, fidelity, fake_roots, zoe_dir, tmp_path):
    from repro.config.entries import load_entry
    from repro.runs.entry import data_paths, resolve_entry, run_entry

    cfg = load_entry(entry)
    root = fake_roots["coco" if cfg.data.dataset == "cocostuff27" else "potsdam"]
    overrides = [f"fidelity={fidelity}", f"data.root={root}", f"model.checkpoint={fake_roots['dino']}", *TINY]
    if fidelity == "released":  # the run-script N schedule (R14) that the small N above no longer matches
        overrides += ["sampling.released_factor=0.9", "sampling.decrease_every=1000"]
    if cfg.data.depth_source == "kbr":
        overrides.append(f"data.depth_files={_kbr_maps(root, tmp_path / 'kbr-maps')}")
    if cfg.data.depth_source == "mde_features":
        overrides += [f"data.depth_weights={zoe_dir}", "data.depth_tta=false"]
    start = time.perf_counter()
    run_dir = run_entry(entry, work_dir=tmp_path / "work", overrides=overrides, quiet=True)
    seconds = time.perf_counter() - start
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert json.loads((run_dir / "status.json").read_text())["state"] == "done"
    assert metrics["final"]["summary"] and all(math.isfinite(v) for v in metrics["final"]["summary"].values()
                                                if isinstance(v, float))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {p.parent for p in (run_dir / "train").rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    depthg = [e.value for e in acc.Scalars("loss/depthg")]  # the guidance term ran on every step
    assert depthg and all(math.isfinite(v) and v != 0.0 for v in depthg), depthg  # released R9: fewer batches
    paths = data_paths(resolve_entry(entry, overrides=overrides), tmp_path / "work")
    stored = np.load(paths.depth / f"{json.loads((paths.crops / 'index.json').read_text())['keys'][0]}.npy")
    source = cfg.data.depth_source
    if source == "mde_features":
        assert stored.dtype == np.float16 and stored.shape == (9, 4, 4)  # tiny ZoeDepth: 8 relative features + 1
    elif source == "semseg":
        assert stored.dtype == np.int16 and stored.shape == (32, 32) and stored.min() >= -1
    elif fidelity == "released":  # R4: per image, 8-bit, cut into the crops (k / 255, not re-normalised)
        assert stored.dtype == np.float32 and stored.shape == (32, 32)
        from repro.depth.encoding import uint8_to_unit, unit_to_uint8

        np.testing.assert_array_equal(uint8_to_unit(unit_to_uint8(stored)), stored)  # raises unless exactly k / 255
    else:
        assert stored.dtype == np.float32 and stored.shape == (32, 32) and stored.min() == 0.0 and stored.max() == 1.0
    print(f"{entry} ({fidelity}): guidance {source} stored {stored.dtype} {stored.shape}; tiny end-to-end {seconds:.1f} s")


def test_a_bad_depth_file_stops_the_run_before_the_depth_stage(fake_roots, tmp_path):
    from repro.runs.entry import data_paths, resolve_entry
    from repro.runs.workdir import prepare_data

    maps = _kbr_maps(fake_roots["coco"], tmp_path / "kbr-maps")
    bad = sorted(maps.glob("cocostuff27_train_*.npy"))[1]
    np.save(bad, np.full((40, 48), 2.0, np.float32))  # all-constant
    overrides = [f"data.root={fake_roots['coco']}", f"model.checkpoint={fake_roots['dino']}", *TINY,
                 f"data.depth_files={maps}"]
    config = resolve_entry("table5/kbr", overrides=overrides)
    with pytest.raises(DatasetError, match=str(bad)):
        prepare_data(config, work_dir=tmp_path / "work", quiet=True)
    assert not data_paths(config, tmp_path / "work").depth.exists()  # refused before anything was written
