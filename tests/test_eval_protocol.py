"""Evaluation protocol on real NYUv2 validation crops (320 px): metrics equal a by-hand computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from repro.data import get_dataset
from repro.data.crops import make_crops
from repro.evaluate.protocol import evaluate_segmentation
from repro.models import ClusterProbe, DinoBackbone, LinearProbe, SegmentationHead
from repro.models.backbone import init_random_checkpoint


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    torch.manual_seed(0)
    ckpt = init_random_checkpoint("vit_small_patch8", tmp_path_factory.mktemp("w") / "dino.pth")
    return DinoBackbone("vit_small_patch8", ckpt), SegmentationHead(384, 16), ClusterProbe(16, 13), LinearProbe(16, 13)


@pytest.fixture(scope="module")
def val_samples(shared_data):
    nyu = get_dataset("nyuv2", shared_data / "nyuv2-mini", "test")
    crops = [make_crops(nyu[i], five_crop=False, size=320)[0] for i in range(3)]
    return [{"key": c.key, "image": c.image, "label": c.label} for c in crops]


def test_metrics_equal_a_by_hand_computation_from_saved_predictions(parts, val_samples):
    result = evaluate_segmentation(val_samples, *parts, batch_size=2, keep_predictions=True)
    preds_c, preds_l = np.stack(result.predictions["cluster"]), np.stack(result.predictions["linear"])
    labels = np.stack(result.predictions["label"])
    assert preds_c.shape == labels.shape == (3, 320, 320)
    valid = labels >= 0
    # linear probe, identity mapping: plain pixel accuracy over labelled pixels
    assert result.linear.accuracy == pytest.approx(100 * (preds_l[valid] == labels[valid]).mean())
    # cluster probe: confusion matrix by hand (rows = cluster, cols = class), then the assignment
    hand = np.zeros((13, 13), dtype=np.int64)
    np.add.at(hand, (preds_c[valid], labels[valid]), 1)
    assert np.array_equal(hand, result.cluster_matrix.matrix.numpy())
    mapped = np.array(result.cluster.assignment)[preds_c]
    assert result.cluster.accuracy == pytest.approx(100 * (mapped[valid] == labels[valid]).mean())
    ious = []
    for k in range(13):
        tp = np.sum((mapped == k) & (labels == k) & valid)
        union = np.sum(((mapped == k) | (labels == k)) & valid)
        if union:
            ious.append(tp / union)
    assert result.cluster.miou == pytest.approx(100 * np.mean(ious))


def test_crf_and_flip_paths_run(parts, val_samples):
    plain = evaluate_segmentation(val_samples[:2], *parts, batch_size=2, keep_predictions=True)
    refined = evaluate_segmentation(val_samples[:2], *parts, batch_size=2, crf=True, flip=True, keep_predictions=True)
    for res in (plain, refined):
        assert 0 <= res.cluster.accuracy <= 100 and 0 <= res.linear.miou <= 100
    assert refined.predictions["cluster"][0].shape == (320, 320)
    assert not np.array_equal(plain.predictions["linear"][0], refined.predictions["linear"][0])


def test_unlabelled_sample_is_an_error(parts, val_samples):
    with pytest.raises(ValueError, match="no label"):
        evaluate_segmentation([{**val_samples[0], "label": None}], *parts)


def test_one_pass_over_two_checkpoints_with_the_crf_pool_equals_each_scored_alone(parts, val_samples):
    """Final and best-on-val in one pass, CRF in a 2-process pool overlapped with the networks (issue 12)."""
    from repro.evaluate.protocol import evaluate_models
    from repro.models.bundle import TrainedParts

    backbone, head, cluster, linear = parts
    torch.manual_seed(1)
    other = TrainedParts(SegmentationHead(384, 16), ClusterProbe(16, 13), LinearProbe(16, 13))
    models = {"final": TrainedParts(head, cluster, linear), "best_on_val": other}
    common = dict(batch_size=2, crf=True, flip=True, crf_image="bgr_truncated")
    pooled = evaluate_models(val_samples, backbone, models, crf_processes=2, keep_first=1, **common)
    for name, model in models.items():
        alone = evaluate_segmentation(val_samples, backbone, model.head, model.cluster_probe, model.linear_probe,
                                      crf_processes=0, **common)
        assert torch.equal(pooled[name].cluster_matrix.matrix, alone.cluster_matrix.matrix), name
        assert torch.equal(pooled[name].linear_matrix.matrix, alone.linear_matrix.matrix), name
        assert len(pooled[name].predictions["cluster"]) == 1
    assert not torch.equal(pooled["final"].cluster_matrix.matrix, pooled["best_on_val"].cluster_matrix.matrix)
