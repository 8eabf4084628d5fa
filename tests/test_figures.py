"""Tests for repro.evaluate.figures on real NYUv2 frames (image | ground truth | prediction | depth)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from repro.data.datasets.nyuv2 import NYU13_CLASS_NAMES
from repro.evaluate.figures import (
    class_palette,
    colorize_labels,
    confusion_fractions,
    save_confusion_figure,
    save_qualitative_figure,
)
from repro.evaluate.metrics import ConfusionMatrix, compute_metrics

NAMES = ("0001", "0002")
K = len(NYU13_CLASS_NAMES)


@pytest.fixture(scope="module")
def nyu(shared_data: Path) -> dict[str, list[np.ndarray]]:
    """Two real frames: RGB (480, 640, 3) uint8, labels 0 -> -1 and 1..13 -> 0..12, depth in [0, 1]."""
    root = shared_data / "nyuv2-mini"
    images, labels, depths = [], [], []
    for name in NAMES:
        images.append(np.array(Image.open(root / "rgb" / f"{name}.png").convert("RGB"), dtype=np.uint8))
        raw = np.array(Image.open(root / "label13" / f"{name}.png"), dtype=np.int64)
        labels.append(raw - 1)  # 0 (unlabelled) -> -1 ignore
        depth = np.array(Image.open(root / "depth" / f"{name}.png"), dtype=np.float64)
        depths.append(depth / depth.max())
    for img, lab in zip(images, labels):
        assert img.shape[:2] == lab.shape and lab.min() >= -1 and lab.max() < K
    # A prediction that differs from the ground truth: classes shifted by 3, one block unmatched.
    preds = []
    for lab in labels:
        pred = np.where(lab >= 0, (lab + 3) % K, 0)
        pred[:40, :80] = -1
        preds.append(pred)
    return {"images": images, "labels": labels, "preds": preds, "depths": depths}


def _read_rgb(path: Path) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB"))


def _find_block(canvas: np.ndarray, block: np.ndarray) -> list[tuple[int, int]]:
    """Top-left corners where ``block`` (h, w, 3) occurs exactly in ``canvas`` (H, W, 3)."""
    h, w = block.shape[:2]
    anchor = h // 2  # a middle row: borders are often uniform and match in many places
    needle = block[anchor].tobytes()
    hits = []
    for y in range(canvas.shape[0] - h + 1):
        row = canvas[y + anchor].tobytes()
        start = row.find(needle)
        while start != -1:
            x = start // 3
            if start % 3 == 0 and x + w <= canvas.shape[1] and np.array_equal(canvas[y:y + h, x:x + w], block):
                hits.append((y, x))
            start = row.find(needle, start + 1)
    return hits


def test_palette_is_fixed_distinct_and_never_black() -> None:
    for k in (1, 13, 27, 60, 100):
        pal = class_palette(k)
        assert pal.shape == (k, 3) and pal.dtype == np.uint8
        assert len({tuple(c) for c in pal}) == k
        assert not (pal == 0).all(axis=1).any()
    np.testing.assert_array_equal(class_palette(27)[:13], class_palette(13))
    with pytest.raises(ValueError):
        class_palette(0)


def test_qualitative_figure_on_nyuv2(nyu, tmp_path: Path) -> None:
    out = tmp_path / "figs" / "nested" / "qualitative.png"
    path = save_qualitative_figure(out, nyu["images"], nyu["labels"], nyu["preds"], nyu["depths"],
                                   list(NYU13_CLASS_NAMES), title="NYUv2 test, 2 frames")
    assert path == out and out.is_file()
    assert out.stat().st_size > 100_000  # four 640x480 panels per row, two rows
    assert [p.name for p in out.parent.iterdir()] == ["qualitative.png"]  # no temporary file left
    canvas = _read_rgb(out)
    height, width = canvas.shape[:2]
    assert 2 * 480 < height < 2 * 480 + 200 and 4 * 640 < width < 4 * 640 + 400

    palette = class_palette(K)
    positions = []
    for img, lab, pred in zip(nyu["images"], nyu["labels"], nyu["preds"]):
        # The prediction panel holds exactly the palette colours of the predicted classes
        # (black where unmatched), pixel for pixel, and only there.
        expected = colorize_labels(pred, palette)
        hits = _find_block(canvas, expected)
        assert len(hits) == 1, f"prediction panel found {len(hits)} times"
        y, x = hits[0]
        panel = canvas[y:y + 480, x:x + 640].astype(np.int64)
        packed = np.unique((panel[..., 0] << 16) | (panel[..., 1] << 8) | panel[..., 2])
        colours = {(int(v) >> 16, (int(v) >> 8) & 255, int(v) & 255) for v in packed}
        want = {tuple(int(v) for v in palette[c]) for c in np.unique(pred[pred >= 0])} | {(0, 0, 0)}
        assert colours == want
        gt_hits = _find_block(canvas, colorize_labels(lab, palette))
        img_hits = _find_block(canvas, img)
        assert len(gt_hits) == 1 and len(img_hits) == 1
        # column order: image | ground truth | prediction, on one row
        assert img_hits[0][0] == gt_hits[0][0] == y and img_hits[0][1] < gt_hits[0][1] < x
        positions.append((y, x))
    assert positions[0][0] < positions[1][0] and positions[0][1] == positions[1][1]


def test_qualitative_figure_without_depth_is_narrower(nyu, tmp_path: Path) -> None:
    with_depth = save_qualitative_figure(tmp_path / "a.png", nyu["images"][:1], nyu["labels"][:1],
                                         nyu["preds"][:1], nyu["depths"][:1], list(NYU13_CLASS_NAMES))
    without = save_qualitative_figure(tmp_path / "b.png", nyu["images"][:1], nyu["labels"][:1],
                                      nyu["preds"][:1], None, list(NYU13_CLASS_NAMES))
    wa, wb = _read_rgb(with_depth).shape[1], _read_rgb(without).shape[1]
    assert 600 < wa - wb < 700  # one 640-px panel (plus its gap) less


def test_qualitative_figure_downscales_wide_images(nyu, tmp_path: Path) -> None:
    out = save_qualitative_figure(tmp_path / "small.png", nyu["images"], nyu["labels"], nyu["preds"], None,
                                  list(NYU13_CLASS_NAMES), max_panel_width=320)
    canvas = _read_rgb(out)
    # every second pixel of the prediction, still exact palette colours
    expected = colorize_labels(nyu["preds"][0][::2, ::2], class_palette(K))
    assert len(_find_block(canvas, expected)) == 1


def test_qualitative_figure_rejects_bad_input(nyu, tmp_path: Path) -> None:
    names = list(NYU13_CLASS_NAMES)
    with pytest.raises(ValueError, match="same length"):
        save_qualitative_figure(tmp_path / "x.png", nyu["images"], nyu["labels"][:1], nyu["preds"], None, names)
    with pytest.raises(ValueError, match="predictions\\[0\\]"):
        bad = [nyu["preds"][0] + K, nyu["preds"][1]]
        save_qualitative_figure(tmp_path / "x.png", nyu["images"], nyu["labels"], bad, None, names)
    with pytest.raises(ValueError, match="labels\\[1\\] has shape"):
        labels = [nyu["labels"][0], nyu["labels"][1][:100]]
        save_qualitative_figure(tmp_path / "x.png", nyu["images"], labels, nyu["preds"], None, names)
    with pytest.raises(ValueError, match="uint8"):
        save_qualitative_figure(tmp_path / "x.png", [nyu["images"][0] / 255.0], nyu["labels"][:1],
                                nyu["preds"][:1], None, names)
    assert not (tmp_path / "x.png").exists()


def test_confusion_figure_from_real_metrics(nyu, tmp_path: Path) -> None:
    cm = ConfusionMatrix(K)
    import torch

    for lab, pred in zip(nyu["labels"], nyu["preds"]):
        cm.update(torch.from_numpy(np.where(pred >= 0, pred, 0)), torch.from_numpy(lab))
    metrics = compute_metrics(cm)  # Hungarian undoes the shift of the classes
    mapped = np.asarray(metrics.confusion)  # (K, K), rows = mapped predictions, columns = ground truth
    assert mapped.shape == (K, K)

    fractions = confusion_fractions(mapped)
    present = mapped.sum(axis=0) > 0
    np.testing.assert_allclose(fractions[present].sum(axis=1), 1.0)
    assert np.isnan(fractions[~present]).all()
    # row k of the figure is ground-truth class k: its diagonal is the recall of class k
    recall = np.diag(mapped)[present] / mapped.sum(axis=0)[present]
    np.testing.assert_allclose(np.diag(fractions)[present], recall)

    out = save_confusion_figure(tmp_path / "c" / "confusion.png", mapped, list(NYU13_CLASS_NAMES),
                                title="NYUv2: cluster probe")
    assert out.is_file() and out.stat().st_size > 20_000
    h, w = _read_rgb(out).shape[:2]
    assert 400 < h < 1500 and 400 < w < 1500
    assert [p.name for p in out.parent.iterdir()] == ["confusion.png"]


def test_confusion_figure_orientation_and_errors(tmp_path: Path) -> None:
    counts = np.array([[5, 0], [5, 10]])  # rows = predictions, columns = ground truth
    np.testing.assert_allclose(confusion_fractions(counts), [[0.5, 0.5], [0.0, 1.0]])
    extra = np.array([[5, 0], [5, 10], [0, 3]])  # a third (extra) prediction row
    assert save_confusion_figure(tmp_path / "extra.png", extra, ["a", "b"]).is_file()
    with pytest.raises(ValueError, match="class names"):
        save_confusion_figure(tmp_path / "bad.png", counts, ["a", "b", "c"])
    with pytest.raises(ValueError, match="non-negative"):
        save_confusion_figure(tmp_path / "bad.png", -counts, ["a", "b"])
    assert not (tmp_path / "bad.png").exists()
