"""Local hidden positives: 3D-LHP (DepthG sec. 3.6) and attention LHP (Seong et al. 2023; DepthG Table 6).

A propagation matrix ``W`` of shape ``(B, P, P)`` over the ``P = H * W`` feature cells says how
much of each cell ``q``'s code is mixed into cell ``p``: ``s'[p] = sum_q W[p, q] s[q]``
(:func:`lhp_mix`). The mixed code goes through the projection head P
(:class:`repro.models.ProjectionHead`) and ``L_STEGO+DepthG`` is computed again on P's output.

3D-LHP (paper reading, default): each cell propagates to itself and its ``k`` nearest cells in
the back-projected point cloud (:func:`repro.method.sampling.depth_to_points`); the weight of a
neighbour falls with its relative distance, ``1 - r`` with ``r`` the distance min-max
normalised over the anchor's row, and each row is normalised to sum to 1.

Released reading (docs/fidelity.md, leonsick/depthg): cells within the 1% quantile of the
normalised distance get weight ``1 - r`` (others 0) and the row is divided by ``P`` (a mean over
all cells), so the mixed code is small; the projection head is in no optimiser there (the
trainer handles that part).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["lhp_weights_3d", "lhp_weights_attention", "lhp_mix", "LHP_VARIANTS"]

LHP_VARIANTS = ("paper", "released")


def _relative_distance(points: Tensor) -> Tensor:
    dist = torch.cdist(points, points)  # (B, P, P)
    lo = dist.amin(dim=2, keepdim=True)
    hi = dist.amax(dim=2, keepdim=True)
    return (dist - lo) / (hi - lo).clamp_min(1e-12)


def lhp_weights_3d(points: Tensor, *, k: int = 8, variant: str = "paper", quantile: float = 0.01) -> Tensor:
    """3D-LHP propagation weights from a per-cell point cloud (DepthG sec. 3.6).

    Args:
        points: ``(B, P, 3)`` back-projected feature cells (row-major), any length unit.
        k: paper reading: neighbours per cell besides itself (8, as the 3x3 window of LHP).
        variant: ``"paper"`` or ``"released"`` (see module docstring).
        quantile: released reading: the distance quantile kept (0.01).

    Returns:
        ``(B, P, P)`` non-negative weights; rows sum to 1 (paper) or to at most 1 (released).

    Raises:
        ValueError: on an unknown variant, a bad shape, or ``k`` not in ``[0, P)``.
    """
    if points.ndim != 3 or points.shape[-1] != 3:
        raise ValueError(f"points must be (B, P, 3), got {tuple(points.shape)}")
    n_points = points.shape[1]
    rel = _relative_distance(points.float())
    if variant == "paper":
        if not 0 <= k < n_points:
            raise ValueError(f"k must be in [0, {n_points}), got {k}")
        # k + 1 nearest including the cell itself (its distance is the row minimum, 0).
        near = rel.topk(k + 1, dim=2, largest=False).indices
        weights = torch.zeros_like(rel).scatter_(2, near, (1.0 - rel).gather(2, near).clamp_min(1e-6))
        return weights / weights.sum(dim=2, keepdim=True)
    if variant == "released":
        threshold = torch.quantile(rel, quantile, dim=2, keepdim=True)
        return torch.where(rel > threshold, torch.zeros_like(rel), 1.0 - rel) / n_points
    raise ValueError(f"variant must be one of {LHP_VARIANTS}, got {variant!r}")


def lhp_weights_attention(attention: Tensor, height: int, width: int) -> Tensor:
    """Attention LHP weights (Hidden Positives' local propagation; DepthG Table 6 comparison).

    Each cell propagates to the cells of its 3x3 window (itself included) whose attention,
    min-max normalised over the window, is at least the window's mean; rows sum to 1.

    Args:
        attention: ``(B, P, P)`` patch-to-patch attention of the backbone's last block
            (heads averaged, CLS token removed), rows = queries.
        height: feature grid height H (``P = H * W``).
        width: feature grid width W.

    Returns:
        ``(B, P, P)`` weights, zero outside each cell's 3x3 window.

    Raises:
        ValueError: if the attention shape does not match ``H * W``.
    """
    n_points = height * width
    if attention.ndim != 3 or attention.shape[1:] != (n_points, n_points):
        raise ValueError(f"attention must be (B, {n_points}, {n_points}), got {tuple(attention.shape)}")
    rows = torch.arange(n_points, device=attention.device) // width
    cols = torch.arange(n_points, device=attention.device) % width
    window = ((rows[:, None] - rows[None, :]).abs() <= 1) & ((cols[:, None] - cols[None, :]).abs() <= 1)
    att = attention.float()
    lo = att.masked_fill(~window, float("inf")).amin(dim=2, keepdim=True)
    hi = att.masked_fill(~window, float("-inf")).amax(dim=2, keepdim=True)
    norm = ((att - lo) / (hi - lo).clamp_min(1e-12)).masked_fill(~window, 0.0)
    window_mean = norm.sum(dim=2, keepdim=True) / window.sum(dim=1).view(1, -1, 1)
    weights = torch.where(window & (norm >= window_mean), norm.clamp_min(1e-6), torch.zeros_like(norm))
    return weights / weights.sum(dim=2, keepdim=True)


def lhp_mix(code: Tensor, weights: Tensor) -> Tensor:
    """Mix codes over cells: ``s'[p] = sum_q W[p, q] s[q]`` (DepthG sec. 3.6).

    Args:
        code: ``(B, Q, H, W)`` segmentation-head output.
        weights: ``(B, H*W, H*W)`` propagation weights.

    Returns:
        ``(B, Q, H, W)`` mixed code.

    Raises:
        ValueError: if the shapes disagree.
    """
    b, q, h, w = code.shape
    if weights.shape != (b, h * w, h * w):
        raise ValueError(f"weights must be {(b, h * w, h * w)} for code {tuple(code.shape)}, got {tuple(weights.shape)}")
    mixed = torch.einsum("bpq,bcq->bcp", weights.to(code.dtype), code.reshape(b, q, h * w))
    return mixed.reshape(b, q, h, w)
