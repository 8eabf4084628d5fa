"""Trainable heads: STEGO's segmentation head S and the 3D-LHP projection head P."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SegmentationHead", "ProjectionHead", "channel_dropout"]


def channel_dropout(x: Tensor, p: float, generator: torch.Generator | None) -> Tensor:
    """Channel dropout (``nn.Dropout2d`` in training mode) drawn from an explicit generator.

    Each ``(b, c)`` channel is zeroed with probability ``p`` and the kept ones are scaled by
    ``1 / (1 - p)``, as :func:`torch.nn.functional.dropout2d`. The keep mask ``(B, C, 1, 1)`` is drawn
    on the generator's device (a CPU generator for a CUDA ``x`` costs one small copy), so a run that
    checkpoints the generator resumes with the same masks whatever else used the global RNG meanwhile.

    Args:
        x: ``(B, C, H, W)``.
        p: drop probability in ``[0, 1)``.
        generator: the stream to draw from; ``None`` uses :func:`torch.nn.functional.dropout2d` (global RNG).

    Returns:
        ``(B, C, H, W)``.
    """
    if p == 0.0:
        return x
    if generator is None:
        return F.dropout2d(x, p, training=True)
    keep = torch.rand(x.shape[0], x.shape[1], 1, 1, generator=generator, device=generator.device) >= p
    return x * (keep.to(device=x.device, dtype=x.dtype) / (1.0 - p))


class SegmentationHead(nn.Module):
    """Segmentation head S: a linear map plus a two-layer ReLU MLP, summed (STEGO A.10).

    ``s = W1 drop(f) + W3 ReLU(W2 drop(f))`` with 1x1 convolutions and channel dropout
    (``Dropout2d``) drawn separately for each path. In training mode the correlation target
    is a third, independent dropout draw of ``f`` when ``dropout_target`` is set, as in the
    released STEGO/DepthG code ("apply a small amount (p = 0.1) of channel-wise dropout before
    using them throughout the architecture", STEGO A.10).

    Args:
        feature_dim: C, backbone channels (384 for ViT-S/8, 768 for ViT-B/8).
        code_dim: Q, code channels (70 COCO ViT-S / Potsdam, 90 COCO ViT-B, 100 Cityscapes).
        dropout: channel dropout probability (0.1).
        dropout_target: return dropped-out features as the correlation target in training.

    Attributes:
        generator: the random stream of the dropout masks (the trainer sets and checkpoints it);
            ``None`` draws from the global RNG like ``nn.Dropout2d``.
    """

    def __init__(self, feature_dim: int, code_dim: int, dropout: float = 0.1, dropout_target: bool = True) -> None:
        super().__init__()
        self.linear = nn.Conv2d(feature_dim, code_dim, 1)
        self.mlp = nn.Sequential(nn.Conv2d(feature_dim, feature_dim, 1), nn.ReLU(), nn.Conv2d(feature_dim, code_dim, 1))
        self.p = dropout
        self.dropout_target = dropout_target
        self.generator: torch.Generator | None = None

    def dropout(self, f: Tensor) -> Tensor:
        """One independent channel-dropout draw of ``f`` in training mode; identity in eval mode."""
        return channel_dropout(f, self.p, self.generator) if self.training else f

    def forward(self, f: Tensor) -> tuple[Tensor, Tensor]:
        """Map features to codes.

        Args:
            f: ``(B, C, H, W)`` backbone features.

        Returns:
            ``(target, s)``: the ``(B, C, H, W)`` features to correlate against (dropped out in
            training if ``dropout_target``, else ``f``) and the ``(B, Q, H, W)`` code.
        """
        s = self.linear(self.dropout(f)) + self.mlp(self.dropout(f))
        target = self.dropout(f) if (self.training and self.dropout_target) else f
        return target, s


class ProjectionHead(nn.Module):
    """3D-LHP projection head P: 1x1 conv, ReLU, 1x1 conv, Q -> Q (DepthG sec. 3.6).

    Args:
        code_dim: Q.
    """

    def __init__(self, code_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(code_dim, code_dim, 1), nn.ReLU(), nn.Conv2d(code_dim, code_dim, 1))

    def forward(self, s: Tensor) -> Tensor:
        """Project (mixed) codes ``(B, Q, H, W)`` to ``(B, Q, H, W)``."""
        return self.net(s)
