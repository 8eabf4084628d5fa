"""Learnability: the losses, head and probes together learn segmentations from synthetic features.

Synthetic "backbone features" stand in for DINO: each image is a 3x3 block layout of K
classes, each class has an embedding (unit vector) and every cell gets Gaussian noise.
Depth is constant per class. The whole real code path is used: SegmentationHead ->
stego_depthg_loss (self/knn/random pairs, random sampling) -> ClusterProbe on the detached
code -> ConfusionMatrix + Hungarian matching.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from repro.evaluate import ConfusionMatrix, compute_metrics
from repro.method.losses import LossWeights, stego_depthg_loss
from repro.models import ClusterProbe, SegmentationHead
from repro.method.sampling import random_grid_coords


@dataclass
class World:
    embeddings: torch.Tensor  # (K, C)
    depth_of_class: torch.Tensor  # (K,)
    sigma: float

    def batch(self, g: torch.Generator, size: int, side: int = 8):
        k = self.embeddings.shape[0]
        labels = torch.randint(0, k, (size, 3, 3), generator=g)
        labels = F.interpolate(labels[:, None].float(), size=(side, side), mode="nearest")[:, 0].long()
        noise = self.sigma * torch.randn(size, self.embeddings.shape[1], side, side, generator=g)
        feats = self.embeddings[labels].permute(0, 3, 1, 2) + noise
        depth = (self.depth_of_class[labels][:, None] + 0.02 * torch.randn(size, 1, side, side, generator=g)).clamp(0, 1)
        return feats, labels, depth


def train_and_evaluate(world: World, weights: LossWeights, *, use_depth: bool, seed: int, steps: int = 300):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    k, c = world.embeddings.shape
    head, probe = SegmentationHead(c, 16), ClusterProbe(16, k)
    opt_head = torch.optim.Adam(head.parameters(), lr=5e-3)
    opt_probe = torch.optim.Adam(probe.parameters(), lr=5e-2)
    for _ in range(steps):
        feats, _, depth = world.batch(g, 8)
        feats_knn, _, _ = world.batch(g, 8)
        target, code = head(feats)
        target_knn, code_knn = head(feats_knn)
        out = stego_depthg_loss(
            target, code, target_knn, code_knn, weights,
            coords=random_grid_coords(8, 8, generator=g), coords_knn=random_grid_coords(8, 8, generator=g),
            depth=depth if use_depth else None, generator=g,
        )
        probe_loss, _ = probe(code.detach())
        opt_head.zero_grad()
        opt_probe.zero_grad()
        (out.total + probe_loss).backward()
        opt_head.step()
        opt_probe.step()
        assert torch.isfinite(out.total)
    head.eval()
    confusion = ConfusionMatrix(k)
    g_eval = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for _ in range(4):
            feats, labels, _ = world.batch(g_eval, 32)
            confusion.update(probe.predict(head(feats)[1]), labels)
    return compute_metrics(confusion)


def chance_miou(k: int, world: World) -> float:
    """mIoU of uniformly random predictions on the same evaluation data."""
    g = torch.Generator().manual_seed(1234)
    confusion = ConfusionMatrix(k)
    for _ in range(4):
        _, labels, _ = world.batch(g, 32)
        confusion.update(torch.randint(0, k, labels.shape, generator=g), labels)
    return compute_metrics(confusion).miou


def test_stego_loss_learns_clusters_far_above_chance():
    g = torch.Generator().manual_seed(0)
    world = World(F.normalize(torch.randn(5, 32, generator=g), dim=1), torch.full((5,), 0.5), sigma=0.3)
    weights = LossWeights(lambda_self=1.0, lambda_knn=0.5, lambda_random=1.0, b_self=0.2, b_knn=0.2, b_random=0.4)
    metrics = train_and_evaluate(world, weights, use_depth=False, seed=0)
    chance = chance_miou(5, world)
    print(f"cluster-probe mIoU {metrics.miou:.1f} (acc {metrics.accuracy:.1f}) vs chance mIoU {chance:.1f}")
    assert metrics.miou > 3 * chance and metrics.miou > 60


@pytest.mark.parametrize("seed", [0, 1])
def test_depth_guidance_separates_classes_that_differ_only_in_depth(seed):
    """Classes 0 and 1 have nearly the same features (cos ~0.96) but depths 0.05 and 0.9.

    DepthG eq. 6 with b_DepthG = 0.3 pushes near/far code pairs apart (D - b < 0) and pulls
    far/far pairs together (D - b > 0); the features alone barely tell the two apart.
    """
    g = torch.Generator().manual_seed(seed)
    embeddings = F.normalize(torch.randn(4, 32, generator=g), dim=1)
    embeddings[1] = embeddings[0] + 0.3 * F.normalize(torch.randn(32, generator=g), dim=0)
    world = World(embeddings, torch.tensor([0.05, 0.9, 0.5, 0.5]), sigma=0.3)
    base = dict(lambda_self=1.0, lambda_knn=0.5, lambda_random=1.0, b_self=0.2, b_knn=0.2, b_random=0.4)
    without = train_and_evaluate(world, LossWeights(**base), use_depth=False, seed=seed)
    with_depth = train_and_evaluate(world, LossWeights(**base, lambda_depthg=1.0, b_depthg=0.3), use_depth=True, seed=seed)
    pair = lambda m: (m.per_class_iou[0] + m.per_class_iou[1]) / 2  # noqa: E731
    print(
        f"seed {seed}: classes 0/1 mean IoU {pair(without):.1f} -> {pair(with_depth):.1f}; "
        f"mIoU {without.miou:.1f} -> {with_depth.miou:.1f}"
    )
    assert pair(with_depth) > pair(without) + 5
    assert with_depth.miou > without.miou + 2
