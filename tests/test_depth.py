"""Depth sources: normalisation, ZoeDepth/MiDaS through transformers, sensor depth, placebo planes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from repro.depth import (
    ESTIMATORS,
    SensorDepth,
    estimate_normalized,
    get_estimator,
    image_plane,
    normalize_depth,
    perspective_plane,
    read_depth_png,
)
from repro.depth.hf import save_random_model
from repro.utils.errors import MissingFileError

SIZE = (160, 120)  # (W, H): the real 640x480 NYUv2 frames downscaled 4x to keep the CPU forward fast


@pytest.fixture(scope="module")
def rgb(shared_data):
    """Two real NYUv2 RGB frames, (120, 160, 3) uint8."""
    out = []
    for name in ("0001", "0002"):
        with Image.open(shared_data / "nyuv2-mini" / "rgb" / f"{name}.png") as im:
            out.append(np.array(im.convert("RGB").resize(SIZE, Image.BILINEAR)))
    return out


@pytest.fixture(scope="module")
def zoe_dir(tmp_path_factory):
    return save_random_model("zoedepth", tmp_path_factory.mktemp("zoedepth-tiny"))


@pytest.fixture(scope="module")
def midas_dir(tmp_path_factory):
    return save_random_model("midas", tmp_path_factory.mktemp("midas-tiny"))


# ---------------------------------------------------------------- normalize_depth


def test_normalize_depth_is_exact_min_max_and_keeps_the_range():
    rng = np.random.default_rng(0)
    depth = (rng.random((37, 53)) * 7.5 + 0.8).astype(np.float32)
    norm, (lo, hi) = normalize_depth(depth)
    assert norm.dtype == np.float32 and norm.shape == depth.shape
    assert norm.min() == 0.0 and norm.max() == 1.0
    assert (lo, hi) == (float(depth.min()), float(depth.max()))
    np.testing.assert_allclose(norm * (hi - lo) + lo, depth, rtol=1e-6, atol=1e-6)
    # order preserved
    flat = depth.ravel().argsort(kind="stable")
    assert np.all(np.diff(norm.ravel()[flat]) >= 0)


def test_normalize_depth_batched_tensor_is_per_map():
    t = torch.stack([torch.linspace(1, 2, 12).reshape(3, 4), torch.linspace(-5, 5, 12).reshape(3, 4)])
    norm, (lo, hi) = normalize_depth(t)
    assert isinstance(norm, torch.Tensor) and norm.dtype == torch.float32 and norm.shape == (2, 3, 4)
    assert torch.equal(lo, torch.tensor([1.0, -5.0], dtype=torch.float64))
    assert torch.equal(hi, torch.tensor([2.0, 5.0], dtype=torch.float64))
    for m in norm:
        assert m.min() == 0 and m.max() == 1


def test_constant_map_normalises_to_zeros_and_keeps_its_range():
    norm, rng = normalize_depth(np.full((4, 5), 3.25, dtype=np.float32))
    assert np.array_equal(norm, np.zeros((4, 5), np.float32)) and rng == (3.25, 3.25)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_depth_raises(bad):
    depth = np.ones((4, 4), np.float32)
    depth[1, 2] = bad
    with pytest.raises(ValueError, match="non-finite"):
        normalize_depth(depth)
    with pytest.raises(ValueError):
        normalize_depth(np.ones(5))  # not (..., H, W)


# ---------------------------------------------------------------- ZoeDepth


def test_zoedepth_random_model_predicts_metric_depth_at_input_size(zoe_dir, rgb):
    est = get_estimator("zoedepth", zoe_dir, device="cpu")
    assert est.kind == "metric" and est.device == torch.device("cpu")
    raw = est.predict(rgb)
    assert raw.shape == (2, 120, 160) and raw.dtype == torch.float32
    assert torch.isfinite(raw).all() and (raw > 0).all()
    assert (raw.flatten(1).std(1) > 0).all()  # depends on the image content
    assert not torch.allclose(raw[0], raw[1])
    assert torch.equal(est.to_depth(raw), raw)  # metres stay metres
    as_tensor = est.predict(torch.from_numpy(np.stack(rgb)))
    torch.testing.assert_close(as_tensor, raw)

    maps, ranges = estimate_normalized(est, rgb, batch_size=2, progress=False)
    for m, (lo, hi), r in zip(maps, ranges, raw):
        assert m.shape == (120, 160) and m.dtype == np.float32
        assert m.min() == 0.0 and m.max() == 1.0
        assert lo == pytest.approx(float(r.min()), rel=1e-5) and hi == pytest.approx(float(r.max()), rel=1e-5)


def _zoedepth_infer(est, img: np.ndarray) -> torch.Tensor:
    """ZoeDepth's ``DepthModel.infer(x)`` (pad_input=True, with_flip_aug=True) re-computed step by step.

    isl-org/ZoeDepth ``zoedepth/models/depth_model.py``: ``x = ToTensor(img)``; per pass reflect-pad by
    ``int(sqrt(h / 2) * 3)`` / ``int(sqrt(w / 2) * 3)``, run the model (its own resize + normalisation,
    here the processor without padding or rescaling), upsample bicubic to the padded size, cut the
    padding; the flipped pass is flipped back; the two are averaged.
    """
    import torch.nn.functional as F

    x = torch.from_numpy(img).permute(2, 0, 1)[None].float().div(255)  # torchvision ToTensor
    ph, pw = int(np.sqrt(x.shape[2] / 2) * 3), int(np.sqrt(x.shape[3] / 2) * 3)

    def one(t):
        padded = F.pad(t, [pw, pw, ph, ph], mode="reflect")
        inputs = est.processor(images=padded, do_rescale=False, do_pad=False, return_tensors="pt",
                               input_data_format="channels_first")
        with torch.inference_mode():
            out = est.model(pixel_values=inputs["pixel_values"]).predicted_depth[:, None]
        out = F.interpolate(out, size=padded.shape[-2:], mode="bicubic", align_corners=False)
        return out[:, :, ph:-ph, pw:-pw]

    return ((one(x) + torch.flip(one(torch.flip(x, dims=[3])), dims=[3])) / 2)[0, 0]


def test_zoedepth_tta_is_zoedepths_infer(zoe_dir, rgb):
    """``tta=True`` = ZoeDepth ``infer``'s reflect padding + flip averaging, re-computed from its definition."""
    tta = get_estimator("zoedepth", zoe_dir, device="cpu", tta=True)
    both = tta.predict(rgb)
    assert both.shape == (2, 120, 160)
    for img, ours in zip(rgb, both):
        ref = _zoedepth_infer(tta, img)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)  # ToTensor x/255 vs rescale x*(1/255)
    plain = get_estimator("zoedepth", zoe_dir, device="cpu").predict(rgb)
    assert (plain - both).abs().max() > 1e-3  # padding and flipping change the map


def test_zoedepth_matches_transformers_post_processing(zoe_dir, rgb):
    """Same maps as transformers' ``post_process_depth_estimation``: plain (no padding) and with flip TTA."""
    est = get_estimator("zoedepth", zoe_dir, device="cpu")
    inputs = est.processor(images=rgb, do_pad=False, return_tensors="pt")
    with torch.inference_mode():
        out = est.model(**inputs)
    ref = est.processor.post_process_depth_estimation(out, source_sizes=[(120, 160)] * 2, do_remove_padding=False)
    torch.testing.assert_close(est.predict(rgb), torch.stack([r["predicted_depth"] for r in ref]))

    tta = get_estimator("zoedepth", zoe_dir, device="cpu", tta=True)
    padded = tta.processor(images=rgb, return_tensors="pt")
    mirrored = tta.processor(images=[np.ascontiguousarray(i[:, ::-1]) for i in rgb], return_tensors="pt")
    with torch.inference_mode():
        out, out_flip = tta.model(**padded), tta.model(**mirrored)
    ref = tta.processor.post_process_depth_estimation(out, source_sizes=[(120, 160)] * 2, outputs_flipped=out_flip)
    # transformers averages before upsampling, ZoeDepth after: equal up to float rounding
    torch.testing.assert_close(tta.predict(rgb), torch.stack([r["predicted_depth"] for r in ref]), rtol=1e-5, atol=1e-6)


def test_batches_of_mixed_sizes_and_progress_bar(zoe_dir, rgb, capsys):
    est = get_estimator("zoedepth", zoe_dir, device="cpu")
    small = np.ascontiguousarray(rgb[1][:64, :96])
    maps, ranges = estimate_normalized(est, [rgb[0], small, rgb[1]], batch_size=8, progress=True)
    assert [m.shape for m in maps] == [(120, 160), (64, 96), (120, 160)] and len(ranges) == 3
    # each map equals its single-image prediction: batching does not mix images
    alone, _ = estimate_normalized(est, [small], progress=False)
    np.testing.assert_allclose(maps[1], alone[0], atol=1e-5)
    assert "img/s" in capsys.readouterr().err


# ---------------------------------------------------------------- MiDaS


def test_midas_predicts_relative_inverse_depth_and_to_depth_reverses_order(midas_dir, rgb):
    est = get_estimator("midas", midas_dir, device="cpu")
    assert est.kind == "relative_inverse"
    raw = est.predict(rgb)
    assert raw.shape == (2, 120, 160) and raw.dtype == torch.float32 and torch.isfinite(raw).all()
    assert (raw.flatten(1).std(1) > 0).all()
    depth = est.to_depth(raw)
    for r, d in zip(raw, depth):
        r, d = r.flatten(), d.flatten()
        above = r > 1e-3 * r.max()  # below the floor the depth is clamped to a constant
        order = torch.argsort(r[above])
        assert (torch.diff(d[above][order]) <= 0).all()  # larger disparity -> smaller depth
        assert d.argmin() == r.argmax() and torch.isfinite(d).all()
    maps, ranges = estimate_normalized(est, rgb, progress=False)
    for m, (lo, hi), d in zip(maps, ranges, depth):
        assert m.min() == 0.0 and m.max() == 1.0
        assert (lo, hi) == pytest.approx((float(d.min()), float(d.max())), rel=1e-5)


def test_relative_inverse_floor_keeps_zero_disparity_finite(midas_dir):
    est = get_estimator("midas", midas_dir, device="cpu")
    raw = torch.tensor([[[0.0, 1.0], [2.0, 4.0]]])
    depth = est.to_depth(raw, eps=0.1)
    torch.testing.assert_close(depth, torch.tensor([[[2.5, 1.0], [0.5, 0.25]]]))
    assert torch.isfinite(est.to_depth(torch.zeros(1, 3, 3))).all()


# ---------------------------------------------------------------- missing weights


@pytest.mark.parametrize("name,repo", [("zoedepth", "Intel/zoedepth-nyu"), ("midas", "Intel/dpt-hybrid-midas")])
def test_missing_weights_name_the_folder_and_the_download(tmp_path, name, repo):
    missing = tmp_path / f"{name}-weights"
    with pytest.raises(MissingFileError) as err:
        get_estimator(name, missing, device="cpu")
    msg = str(err.value)
    assert str(missing) in msg and "download" in msg and repo in msg


def test_incomplete_weights_folder_names_the_missing_file(zoe_dir, tmp_path, monkeypatch):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_bytes((zoe_dir / "config.json").read_bytes())
    with pytest.raises(MissingFileError, match="preprocessor_config.json"):
        get_estimator("zoedepth", partial, device="cpu")
    monkeypatch.chdir(tmp_path)  # weights=None -> ./weights/zoedepth-nyu (ZoeD_N), absent here
    monkeypatch.delenv("REPRO_WEIGHTS", raising=False)
    with pytest.raises(MissingFileError, match=r"weights/zoedepth-nyu\b") as err:
        get_estimator("zoedepth", None, device="cpu")
    assert "kitti" not in str(err.value) and "huggingface-cli download Intel/zoedepth-nyu " in str(err.value)


def test_unknown_estimator_lists_the_names():
    with pytest.raises(ValueError) as err:
        get_estimator("depth_anything", None)
    assert all(n in str(err.value) for n in ESTIMATORS)


# ---------------------------------------------------------------- sensor depth


def test_sensor_depth_on_real_nyuv2(shared_data):
    path = shared_data / "nyuv2-mini" / "depth" / "0001.png"
    with Image.open(path) as im:
        mm = np.array(im)
    assert mm.dtype == np.uint16
    metres = read_depth_png(path)
    np.testing.assert_allclose(metres, mm.astype(np.float64) / 1000.0, rtol=1e-6)
    est = get_estimator("sensor", None)
    assert est.kind == "metric"
    maps, ranges = estimate_normalized(est, [metres], progress=False)
    (m,), ((lo, hi),) = maps, ranges
    assert m.shape == (480, 640) and m.min() == 0.0 and m.max() == 1.0
    assert (lo, hi) == (float(metres.min()), float(metres.max()))
    assert 0.5 <= lo < hi <= 10.5


def test_sensor_holes_take_the_nearest_valid_value(shared_data):
    metres = read_depth_png(shared_data / "nyuv2-mini" / "depth" / "0001.png")[:40, :50].copy()
    holes = metres.copy()
    holes[10, 10] = 0.0
    holes[20:24, 30:33] = np.nan
    holes[0, 0] = np.inf
    filled = SensorDepth().from_sensor(holes)
    valid = np.isfinite(holes) & (holes > 0)
    assert np.array_equal(filled[valid], holes[valid]) and np.isfinite(filled).all()
    vy, vx = np.nonzero(valid)
    for y, x in zip(*np.nonzero(~valid)):
        dist = (vy - y) ** 2 + (vx - x) ** 2
        nearest = {float(holes[a, b]) for a, b in zip(vy[dist == dist.min()], vx[dist == dist.min()])}
        assert float(filled[y, x]) in nearest
    with pytest.raises(ValueError, match="invalid"):
        SensorDepth(invalid="raise").from_sensor(holes)
    with pytest.raises(ValueError, match="no valid"):
        SensorDepth().from_sensor(np.zeros((4, 4), np.float32))
    with pytest.raises(TypeError):
        SensorDepth().predict([np.zeros((4, 4, 3), np.uint8)])


# ---------------------------------------------------------------- placebo planes


def test_image_plane_is_constant_one_and_survives_estimate_normalized(rgb):
    plane = image_plane(7, 9)
    assert plane.shape == (7, 9) and plane.dtype == np.float32 and np.all(plane == 1.0)
    est = get_estimator("image_plane", None)
    raw = est.predict(rgb)
    assert raw.shape == (2, 120, 160) and torch.all(raw == 1)
    maps, ranges = estimate_normalized(est, rgb, progress=False)
    assert all(np.all(m == 1.0) for m in maps) and ranges == [(1.0, 1.0)] * 2


def test_perspective_plane_grows_towards_the_top():
    h, w = 120, 160
    p = perspective_plane(h, w)
    assert p.shape == (h, w) and p.dtype == np.float32
    assert p.min() == 0.0 and p.max() == 1.0 and np.all(p[-1] == 0.0) and np.all(p[0] == 1.0)
    assert np.all(p == p[:, :1])  # the same in every column
    col = p[:, 0].astype(np.float64)
    assert np.all(np.diff(col) <= 0)  # never decreases going up
    lower = col[int(0.6 * h) :]  # well below the horizon: strictly increasing towards the top
    assert np.all(np.diff(lower) < 0)
    # the exact formula: z = 1 / max(v - h0, (v_b - h0) / r), then min-max
    v = (np.arange(h) + 0.5) / h
    z = 1.0 / np.maximum(v - 0.5, (v[-1] - 0.5) / 10.0)
    np.testing.assert_allclose(col, (z - z.min()) / (z.max() - z.min()), atol=1e-6)
    assert perspective_plane(h, w, horizon=0.3)[int(0.4 * h), 0] < p[int(0.4 * h), 0]
    with pytest.raises(ValueError):
        perspective_plane(h, w, horizon=1.0)


def test_perspective_plane_estimator_ignores_content(rgb):
    est = get_estimator("perspective_plane", None, horizon=0.4)
    raw = est.predict([rgb[0], 255 - rgb[0]])
    assert raw.shape == (2, 120, 160)
    assert torch.equal(raw[0], raw[1])
    assert torch.equal(raw[0], torch.from_numpy(perspective_plane(120, 160, horizon=0.4)))
    maps, _ = estimate_normalized(est, rgb, progress=False)
    np.testing.assert_array_equal(maps[0], perspective_plane(120, 160, horizon=0.4))
