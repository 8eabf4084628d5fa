"""Evaluation probes trained on the detached code: cluster probe and linear probe (STEGO A.10)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ClusterProbe", "LinearProbe", "IGNORE_INDEX"]

IGNORE_INDEX = -1
"""Label value of unlabelled pixels throughout repro."""


class ClusterProbe(nn.Module):
    """Spherical minibatch k-means over codes (STEGO sec. 3.3 and A.10).

    K centroids; assignment by cosine similarity; loss
    ``-mean_{b,h,w} sum_k onehot(argmax_k cos)_k * cos_k``, i.e. minus the mean cosine
    similarity of each code to its nearest centroid. Gradients reach the centroids only when
    the caller passes a detached code (the probe never trains the head).

    Args:
        code_dim: Q.
        num_clusters: K (number of classes plus extra clusters; the papers use 0 extra).
    """

    def __init__(self, code_dim: int, num_clusters: int) -> None:
        super().__init__()
        self.num_clusters = num_clusters
        self.clusters = nn.Parameter(torch.randn(num_clusters, code_dim))

    def similarities(self, code: Tensor) -> Tensor:
        """Cosine similarity of every code vector to every centroid.

        Args:
            code: ``(B, Q, H, W)``.

        Returns:
            ``(B, K, H, W)`` in [-1, 1].
        """
        return torch.einsum("bqhw,kq->bkhw", F.normalize(code, dim=1), F.normalize(self.clusters, dim=1))

    def forward(self, code: Tensor, alpha: float | None = None) -> tuple[Tensor, Tensor]:
        """k-means loss and cluster probabilities.

        Args:
            code: ``(B, Q, H, W)`` code (detach it when training the probe).
            alpha: ``None`` gives hard one-hot assignments (training); a float gives
                ``softmax(alpha * cos)`` soft assignments (STEGO uses 2 before the CRF).

        Returns:
            ``(loss, probs)``: scalar loss and ``(B, K, H, W)`` assignment probabilities.
        """
        sims = self.similarities(code)
        if alpha is None:
            probs = F.one_hot(sims.argmax(1), self.num_clusters).permute(0, 3, 1, 2).to(sims.dtype)
        else:
            probs = torch.softmax(sims * alpha, dim=1)
        loss = -(probs * sims).sum(1).mean()
        return loss, probs

    @torch.no_grad()
    def predict(self, code: Tensor) -> Tensor:
        """Hard cluster index per pixel: ``(B, Q, H, W)`` -> ``(B, H, W)`` long."""
        return self.similarities(code).argmax(1)


class LinearProbe(nn.Module):
    """Linear probe: 1x1 conv Q -> K trained with cross-entropy on labels (STEGO sec. 4).

    This is an evaluation protocol; it is trained on the detached code and never feeds
    the head.

    Args:
        code_dim: Q.
        num_classes: K.
    """

    def __init__(self, code_dim: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv = nn.Conv2d(code_dim, num_classes, 1)

    def forward(self, code: Tensor) -> Tensor:
        """Logits ``(B, K, H, W)`` from a code ``(B, Q, H, W)``."""
        return self.conv(code)

    def loss(self, code: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy of the logits, upsampled bilinearly to the label size.

        Args:
            code: ``(B, Q, h, w)`` detached code.
            labels: ``(B, H, W)`` long in ``[0, K)`` or ``IGNORE_INDEX`` (-1).

        Returns:
            Scalar loss (0 when every pixel is ignored).

        Raises:
            ValueError: if a label is outside ``[0, K)`` and not ``IGNORE_INDEX``.
        """
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= self.num_classes))
        if bool(bad.any()):
            raise ValueError(
                f"labels must be in [0, {self.num_classes}) or {IGNORE_INDEX}; found {labels[bad].unique().tolist()[:5]}"
            )
        logits = F.interpolate(self(code), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        if not bool((labels != IGNORE_INDEX).any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
