"""Unsupervised semantic segmentation metrics (STEGO / DepthG evaluation protocol).

Both STEGO (Hamilton et al., ICLR 2022, Sec. 4 "Evaluation") and DepthG (Sick et al.,
CVPR 2024, Sec. 4) report pixel accuracy and mean IoU. For the *unsupervised* (cluster)
head, predicted cluster ids are first mapped to ground-truth classes with the Hungarian
algorithm, maximising the number of correctly matched pixels; for the *linear probe*
head the prediction index already is the class index ("identity" matching).

The confusion matrix convention used throughout this module is
``matrix[prediction, target]``: rows are predicted clusters/classes, columns are
ground-truth classes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = [
    "ConfusionMatrix",
    "SegmentationMetrics",
    "compute_metrics",
    "hungarian_assignment",
]

_MATCHINGS = ("hungarian", "identity")


def _check_integer_tensor(name: str, x: torch.Tensor) -> None:
    if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
        raise TypeError(f"{name} must be an integer tensor of class indices, got dtype {x.dtype}")


class ConfusionMatrix:
    """Accumulating confusion matrix between predicted clusters and ground-truth classes.

    Source: evaluation protocol of STEGO (Hamilton et al., ICLR 2022, Sec. 4) and
    DepthG (Sick et al., CVPR 2024, Sec. 4); the matrix is later reduced by
    :func:`compute_metrics`.

    Attributes:
        num_classes: Number ``K`` of ground-truth classes.
        num_predictions: Number ``P`` of predicted clusters (``P > K`` means extra
            clusters, as in STEGO's over-clustering experiments).
        matrix: ``torch.int64`` tensor of shape ``(P, K)`` on the CPU; ``matrix[p, k]``
            counts pixels predicted as ``p`` whose ground truth is ``k``.
    """

    def __init__(self, num_classes: int, num_predictions: int | None = None) -> None:
        """Create an all-zero matrix.

        Args:
            num_classes: Number ``K`` of ground-truth classes, ``K >= 1``.
            num_predictions: Number ``P`` of predicted ids; defaults to ``K``.

        Raises:
            ValueError: If ``K < 1`` or ``P < 1``.
        """
        if num_predictions is None:
            num_predictions = num_classes
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if int(num_predictions) < 1:
            raise ValueError(f"num_predictions must be >= 1, got {num_predictions}")
        self.num_classes = int(num_classes)
        self.num_predictions = int(num_predictions)
        self.matrix = torch.zeros(self.num_predictions, self.num_classes, dtype=torch.int64)

    def reset(self) -> None:
        """Set every count back to zero."""
        self.matrix.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add the pixels of one batch.

        Args:
            pred: Integer tensor of predicted ids in ``[0, P)``, any shape (e.g.
                ``(B, H, W)``), any device.
            target: Integer tensor of ground-truth ids with the same shape as ``pred``.
                Pixels whose target lies outside ``[0, K)`` (e.g. ``-1`` or ``255``) are
                ignored, whatever their prediction.

        Raises:
            TypeError: If either input is not an integer tensor (float, bool, complex).
            ValueError: If the shapes differ, or a prediction at a non-ignored pixel is
                outside ``[0, P)``.
        """
        pred = torch.as_tensor(pred)
        target = torch.as_tensor(target)
        _check_integer_tensor("pred", pred)
        _check_integer_tensor("target", target)
        if pred.shape != target.shape:
            raise ValueError(
                f"pred and target must have the same shape, got pred {tuple(pred.shape)} "
                f"and target {tuple(target.shape)}"
            )
        pred = pred.reshape(-1).to(torch.int64)
        target = target.to(pred.device).reshape(-1).to(torch.int64)
        valid = (target >= 0) & (target < self.num_classes)
        pred = pred[valid]
        target = target[valid]
        if pred.numel() == 0:
            return
        lo, hi = int(pred.min()), int(pred.max())
        if lo < 0 or hi >= self.num_predictions:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"prediction {bad} is outside [0, {self.num_predictions}) "
                f"(num_predictions={self.num_predictions})"
            )
        counts = torch.bincount(
            pred * self.num_classes + target,
            minlength=self.num_predictions * self.num_classes,
        )
        self.matrix += counts.reshape(self.num_predictions, self.num_classes).cpu()

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add the counts of ``other`` into this matrix in place (e.g. after all-gather).

        Args:
            other: A matrix with the same ``(P, K)``.

        Returns:
            ``self``, for chaining.

        Raises:
            TypeError: If ``other`` is not a :class:`ConfusionMatrix`.
            ValueError: If the shapes differ.
        """
        if not isinstance(other, ConfusionMatrix):
            raise TypeError(f"can only merge a ConfusionMatrix, got {type(other).__name__}")
        if other.matrix.shape != self.matrix.shape:
            raise ValueError(
                f"cannot merge confusion matrices of shapes {tuple(self.matrix.shape)} "
                f"and {tuple(other.matrix.shape)}"
            )
        self.matrix += other.matrix.to(self.matrix.device)
        return self

    def __iadd__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        return self.merge(other)

    def __repr__(self) -> str:
        return (
            f"ConfusionMatrix(num_classes={self.num_classes}, "
            f"num_predictions={self.num_predictions}, pixels={int(self.matrix.sum())})"
        )


def _as_matrix(matrix: ConfusionMatrix | torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(matrix, ConfusionMatrix):
        matrix = matrix.matrix
    if isinstance(matrix, torch.Tensor):
        matrix = matrix.detach().cpu().numpy()
    m = np.asarray(matrix)
    if m.ndim != 2 or m.shape[0] < 1 or m.shape[1] < 1:
        raise ValueError(f"confusion matrix must be 2-D (P, K) and non-empty, got shape {m.shape}")
    if not np.issubdtype(m.dtype, np.integer):
        if not np.all(np.isfinite(m)) or np.any(m != np.round(m)):
            raise ValueError("confusion matrix must hold integer counts")
    m = m.astype(np.int64)
    if (m < 0).any():
        raise ValueError(f"confusion matrix has negative counts (min {int(m.min())})")
    return m


def hungarian_assignment(matrix: ConfusionMatrix | torch.Tensor | np.ndarray) -> torch.Tensor:
    """Map each predicted cluster to a ground-truth class, maximising matched pixels.

    Source: STEGO (Hamilton et al., ICLR 2022, Sec. 4) / DepthG (Sick et al., CVPR
    2024, Sec. 4): cluster ids are aligned to classes with the Hungarian algorithm
    (``scipy.optimize.linear_sum_assignment(..., maximize=True)``).

    Args:
        matrix: Confusion counts of shape ``(P, K)`` (rows = predictions,
            columns = ground truth), or a :class:`ConfusionMatrix`.

    Returns:
        ``torch.int64`` tensor of shape ``(P,)``: the class of each prediction row, or
        ``-1`` for rows left unmatched when ``P > K``.

    Raises:
        ValueError: If the matrix is not 2-D, or holds negative/non-integer counts.
    """
    m = _as_matrix(matrix)
    rows, cols = linear_sum_assignment(m, maximize=True)
    assignment = torch.full((m.shape[0],), -1, dtype=torch.int64)
    assignment[torch.as_tensor(rows, dtype=torch.int64)] = torch.as_tensor(cols, dtype=torch.int64)
    return assignment


@dataclass
class SegmentationMetrics:
    """Pixel accuracy and IoU scores after matching predictions to classes.

    Source: STEGO (Hamilton et al., ICLR 2022, Sec. 4) / DepthG (Sick et al., CVPR 2024,
    Tables 1-3), which report "Acc." and "mIoU" in percent.

    Attributes:
        accuracy: Pixel accuracy in percent (0..100).
        miou: Mean IoU in percent over classes with ``tp + fp + fn > 0``.
        per_class_iou: ``K`` IoUs in percent; ``NaN`` for a class with ``tp+fp+fn == 0``.
        assignment: Length-``P`` list; class of each prediction id, ``-1`` if unmatched.
        confusion: ``(K, K)`` nested list of int, counts after mapping predictions to
            classes (rows = mapped prediction, columns = ground truth); pixels of
            unmatched clusters are not included.
        num_pixels: Number of counted (non-ignored) pixels.
    """

    accuracy: float
    miou: float
    per_class_iou: list[float] = field(default_factory=list)
    assignment: list[int] = field(default_factory=list)
    confusion: list[list[int]] = field(default_factory=list)
    num_pixels: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Return the metrics as a plain (JSON-friendly, NaN aside) dictionary."""
        return asdict(self)


def compute_metrics(
    matrix: ConfusionMatrix | torch.Tensor | np.ndarray, matching: str = "hungarian"
) -> SegmentationMetrics:
    """Compute accuracy, per-class IoU and mIoU from a confusion matrix.

    After mapping predictions to classes: ``tp`` = diagonal, ``fp`` = row sum - ``tp``,
    ``fn`` = column sum of the *unmapped* matrix - ``tp`` (so pixels predicted as an
    unmatched extra cluster are false negatives of their true class and false positives
    of no class); ``IoU_k = tp / (tp + fp + fn)``; mIoU averages over classes with a
    non-zero denominator (as STEGO's released code does); ``Acc = sum(tp) / N``.

    Source: STEGO (Hamilton et al., ICLR 2022, Sec. 4); DepthG (Sick et al., CVPR 2024,
    Sec. 4).

    Args:
        matrix: Counts of shape ``(P, K)``, rows = predictions, columns = ground truth,
            or a :class:`ConfusionMatrix`.
        matching: ``"hungarian"`` (unsupervised clusters) or ``"identity"`` (linear
            probe, prediction ``i`` is class ``i``; requires ``P == K``).

    Returns:
        A :class:`SegmentationMetrics` with scores in percent.

    Raises:
        ValueError: For an unknown ``matching``, ``identity`` with ``P != K``, a matrix
            that is not 2-D or has negative counts, or a matrix with no pixels.
    """
    if matching not in _MATCHINGS:
        raise ValueError(f"unknown matching {matching!r}; expected one of {_MATCHINGS}")
    m = _as_matrix(matrix)
    num_pred, num_cls = m.shape
    total = int(m.sum())
    if total == 0:
        raise ValueError(f"confusion matrix of shape {m.shape} holds no pixels")
    if matching == "identity":
        if num_pred != num_cls:
            raise ValueError(
                f"identity matching needs a square matrix (P == K), got shape {m.shape}"
            )
        assignment = np.arange(num_cls, dtype=np.int64)
    else:
        assignment = hungarian_assignment(m).numpy()

    mapped = np.zeros((num_cls, num_cls), dtype=np.int64)
    matched = assignment >= 0
    np.add.at(mapped, assignment[matched], m[matched])

    tp = np.diag(mapped).astype(np.float64)
    fp = mapped.sum(axis=1) - tp
    fn = m.sum(axis=0) - tp
    denom = tp + fp + fn
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)
    present = ~np.isnan(iou)
    miou = float(iou[present].mean()) if present.any() else math.nan
    return SegmentationMetrics(
        accuracy=100.0 * float(tp.sum()) / total,
        miou=100.0 * miou,
        per_class_iou=[float(100.0 * v) for v in iou],
        assignment=[int(a) for a in assignment],
        confusion=mapped.tolist(),
        num_pixels=total,
    )
