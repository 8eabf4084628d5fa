"""Tests for repro.evaluate.metrics (STEGO/DepthG Hungarian-matched Acc and mIoU)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from repro.evaluate.metrics import (
    ConfusionMatrix,
    SegmentationMetrics,
    compute_metrics,
    hungarian_assignment,
)


def _all_maps(num_pred: int, num_cls: int):
    """Yield every injective row->class map as a length-P list (-1 = unmatched row)."""
    if num_pred >= num_cls:
        # choose an ordered set of K distinct rows: rows[k] is matched to class k
        for rows in itertools.permutations(range(num_pred), num_cls):
            mapping = [-1] * num_pred
            for k, r in enumerate(rows):
                mapping[r] = k
            yield mapping
    else:
        for cols in itertools.permutations(range(num_cls), num_pred):
            yield list(cols)


def _brute_force(m: np.ndarray):
    """Return (best matched count, list of optimal maps)."""
    best, maps = -1, []
    for mapping in _all_maps(*m.shape):
        score = sum(int(m[r, c]) for r, c in enumerate(mapping) if c >= 0)
        if score > best:
            best, maps = score, [mapping]
        elif score == best:
            maps.append(mapping)
    return best, maps


def _brute_miou(m: np.ndarray, mapping: list[int]) -> tuple[float, list[float]]:
    """mIoU (%) under a given map, computed class by class with explicit loops."""
    num_pred, num_cls = m.shape
    ious = []
    for k in range(num_cls):
        rows = [r for r in range(num_pred) if mapping[r] == k]
        tp = sum(int(m[r, k]) for r in rows)
        fp = sum(int(m[r, j]) for r in rows for j in range(num_cls) if j != k)
        fn = sum(int(m[r, k]) for r in range(num_pred) if r not in rows)
        denom = tp + fp + fn
        ious.append(100.0 * tp / denom if denom else math.nan)
    valid = [v for v in ious if not math.isnan(v)]
    return sum(valid) / len(valid), ious


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("num_cls", [2, 3, 4, 5])
@pytest.mark.parametrize("extra", [0, 1, 2])
def test_hungarian_matches_brute_force(seed: int, num_cls: int, extra: int) -> None:
    rng = np.random.default_rng(1000 * seed + 10 * num_cls + extra)
    num_pred = num_cls + extra
    m = rng.integers(0, 200, size=(num_pred, num_cls))
    if seed % 2:  # sparse, tie-prone matrices too
        m = m * (rng.random(m.shape) < 0.4)
        m[0, 0] += 1  # keep it non-empty
    best, maps = _brute_force(m)
    result = compute_metrics(torch.from_numpy(m))
    assert result.num_pixels == int(m.sum())
    assert result.accuracy == pytest.approx(100.0 * best / m.sum(), abs=1e-9)
    assignment = hungarian_assignment(m).tolist()
    assert assignment in maps
    assert sum(a == -1 for a in assignment) == max(0, num_pred - num_cls)
    if len(maps) == 1:
        miou, ious = _brute_miou(m, maps[0])
        assert result.assignment == maps[0]
        assert result.miou == pytest.approx(miou, abs=1e-9)
        np.testing.assert_allclose(result.per_class_iou, ious, atol=1e-9)


def test_unique_optimum_cases_were_exercised() -> None:
    """The mIoU branch above must actually run: dense random matrices rarely tie."""
    rng = np.random.default_rng(7)
    m = rng.integers(0, 200, size=(5, 4))
    best, maps = _brute_force(m)
    assert len(maps) == 1
    miou, _ = _brute_miou(m, maps[0])
    assert compute_metrics(m).miou == pytest.approx(miou, abs=1e-9)


def _hand_example() -> tuple[torch.Tensor, torch.Tensor]:
    target = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 255, -1])
    pred = torch.tensor([0, 0, 1, 1, 1, 2, 0, 2, 1, 2])
    return pred, target


def test_hand_computed_example_identity() -> None:
    pred, target = _hand_example()
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    assert cm.matrix.tolist() == [[2, 0, 1], [1, 2, 0], [0, 0, 2]]
    res = compute_metrics(cm, matching="identity")
    assert res.num_pixels == 8
    assert res.accuracy == pytest.approx(75.0)
    # class 0: tp 2, fp 1, fn 1; class 1: tp 2, fp 1, fn 0; class 2: tp 2, fp 0, fn 1
    assert res.per_class_iou == pytest.approx([50.0, 200.0 / 3, 200.0 / 3])
    assert res.miou == pytest.approx((50.0 + 400.0 / 3) / 3)
    assert res.confusion == [[2, 0, 1], [1, 2, 0], [0, 0, 2]]


def test_hand_computed_example_hungarian_with_permuted_ids_and_extra_cluster() -> None:
    pred, target = _hand_example()
    permuted = torch.tensor([2, 0, 1])[pred]  # cluster ids are arbitrary
    cm = ConfusionMatrix(3, num_predictions=4)
    cm.update(permuted, target)
    cm.update(torch.tensor([3]), torch.tensor([0]))  # one pixel in an extra cluster
    res = compute_metrics(cm)
    assert res.assignment == [1, 2, 0, -1]
    assert res.num_pixels == 9
    assert res.accuracy == pytest.approx(600.0 / 9)
    # the extra-cluster pixel is a false negative of class 0, no class's false positive
    assert res.per_class_iou == pytest.approx([40.0, 200.0 / 3, 200.0 / 3])
    assert res.confusion == [[2, 0, 1], [1, 2, 0], [0, 0, 2]]
    d = res.to_dict()
    assert isinstance(res, SegmentationMetrics) and d["miou"] == res.miou
    assert set(d) == {"accuracy", "miou", "per_class_iou", "assignment", "confusion", "num_pixels"}


def test_ignore_labels_do_not_change_matrix() -> None:
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 3]))
    before = cm.matrix.clone()
    cm.update(torch.tensor([0, 1, 2, 3]), torch.tensor([-1, 255, 4, 100]))
    assert torch.equal(cm.matrix, before)
    # uint8 targets with 255 = ignore
    cm.update(torch.tensor([3, 1], dtype=torch.uint8), torch.tensor([255, 2], dtype=torch.uint8))
    assert int(cm.matrix.sum()) == 4 and int(cm.matrix[1, 2]) == 1


def test_bad_inputs_raise() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([0, 3]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([-1, 0]), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="float"):
        cm.update(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))
    with pytest.raises(TypeError):
        cm.update(torch.tensor([0, 1]), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    assert int(cm.matrix.sum()) == 0  # failed updates leave no trace
    with pytest.raises(ValueError):
        ConfusionMatrix(0)
    with pytest.raises(ValueError, match="merge"):
        ConfusionMatrix(3).merge(ConfusionMatrix(4))
    with pytest.raises(TypeError):
        ConfusionMatrix(3).merge(torch.zeros(3, 3, dtype=torch.long))


def test_accumulation_equals_single_update_and_naive_count() -> None:
    gen = torch.Generator().manual_seed(0)
    num_cls, num_pred = 5, 7
    preds = [torch.randint(0, num_pred, (2, 9, 11), generator=gen) for _ in range(4)]
    targets = [torch.randint(-1, num_cls + 2, (2, 9, 11), generator=gen) for _ in range(4)]
    acc = ConfusionMatrix(num_cls, num_pred)
    for p, t in zip(preds, targets):
        acc.update(p, t)
    once = ConfusionMatrix(num_cls, num_pred)
    once.update(torch.cat(preds), torch.cat(targets))
    assert torch.equal(acc.matrix, once.matrix)
    naive = np.zeros((num_pred, num_cls), dtype=np.int64)
    for p, t in zip(torch.cat(preds).flatten().tolist(), torch.cat(targets).flatten().tolist()):
        if 0 <= t < num_cls:
            naive[p, t] += 1
    assert acc.matrix.dtype == torch.int64
    np.testing.assert_array_equal(acc.matrix.numpy(), naive)
    # merge / += of two halves equals the whole
    a, b = ConfusionMatrix(num_cls, num_pred), ConfusionMatrix(num_cls, num_pred)
    a.update(torch.cat(preds[:2]), torch.cat(targets[:2]))
    b.update(torch.cat(preds[2:]), torch.cat(targets[2:]))
    a += b
    assert torch.equal(a.matrix, once.matrix)
    a.reset()
    assert int(a.matrix.sum()) == 0


def test_identity_matching_on_diagonal_heavy_matrix() -> None:
    m = torch.tensor([[50, 3, 2], [4, 40, 1], [0, 6, 30]])
    res = compute_metrics(m, matching="identity")
    assert res.assignment == [0, 1, 2]
    assert res.accuracy == pytest.approx(100.0 * 120 / 136)
    assert res.per_class_iou[0] == pytest.approx(100.0 * 50 / (50 + 5 + 4))
    # a permuted matrix: Hungarian recovers the permutation, identity does not
    perm = m[[2, 0, 1]]
    assert compute_metrics(perm).accuracy == pytest.approx(res.accuracy)
    assert compute_metrics(perm, matching="identity").accuracy < 20.0


def test_identity_requires_square_and_other_errors() -> None:
    with pytest.raises(ValueError, match="square"):
        compute_metrics(torch.ones(4, 3, dtype=torch.long), matching="identity")
    with pytest.raises(ValueError, match="unknown matching"):
        compute_metrics(torch.ones(3, 3, dtype=torch.long), matching="greedy")
    with pytest.raises(ValueError, match="no pixels"):
        compute_metrics(ConfusionMatrix(3))
    with pytest.raises(ValueError, match="negative"):
        compute_metrics(torch.tensor([[1, -1], [0, 2]]))


def test_absent_class_is_nan_and_excluded_from_miou() -> None:
    m = torch.tensor([[5, 1, 0, 0], [0, 4, 1, 0], [1, 0, 6, 0], [0, 0, 0, 0]])
    for matching in ("identity", "hungarian"):
        res = compute_metrics(m, matching=matching)
        assert math.isnan(res.per_class_iou[3])
        present = res.per_class_iou[:3]
        assert not any(math.isnan(v) for v in present)
        assert res.miou == pytest.approx(sum(present) / 3)
        assert res.per_class_iou[0] == pytest.approx(100.0 * 5 / 7)
