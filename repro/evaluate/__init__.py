"""Evaluation utilities: STEGO/DepthG segmentation metrics and dense-CRF refinement."""

from __future__ import annotations

from repro.evaluate.crf import CRFParams, dense_crf, dense_crf_batch, denormalize_image
from repro.evaluate.metrics import (
    ConfusionMatrix,
    SegmentationMetrics,
    compute_metrics,
    hungarian_assignment,
)

__all__ = [
    "CRFParams",
    "ConfusionMatrix",
    "SegmentationMetrics",
    "compute_metrics",
    "dense_crf",
    "dense_crf_batch",
    "denormalize_image",
    "hungarian_assignment",
]
