"""The evaluation protocol of STEGO/DepthG (SPEC section 4) over validation samples.

For each 320 x 320 validation image: frozen features, head code (optionally averaged with
the horizontally flipped pass), code upsampled bilinearly to the label size; the cluster
probe's soft assignment (``softmax(2 cos)``, STEGO's alpha before the CRF) and the linear
probe's logits; optional DenseCRF refinement; argmax. One confusion matrix per probe is
accumulated over all validation pixels; the cluster probe is scored after Hungarian
matching, the linear probe with the identity mapping.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repro.data.transforms import images_to_tensor
from repro.evaluate.crf import CRF_IMAGES, CRFParams, crf_images, dense_crf_batch
from repro.evaluate.metrics import ConfusionMatrix, SegmentationMetrics, compute_metrics
from repro.models.probes import ClusterProbe, LinearProbe

__all__ = ["EvalResult", "predict_logits", "evaluate_segmentation"]

CLUSTER_ALPHA = 2.0


@dataclass
class EvalResult:
    """Metrics of both probes, their confusion matrices and (optionally) the predictions."""

    cluster: SegmentationMetrics
    linear: SegmentationMetrics
    cluster_matrix: ConfusionMatrix
    linear_matrix: ConfusionMatrix
    predictions: dict[str, list[np.ndarray]] = field(default_factory=dict)


@torch.no_grad()
def predict_logits(
    backbone: nn.Module,
    head: nn.Module,
    cluster_probe: ClusterProbe,
    linear_probe: LinearProbe,
    images: Tensor,
    size: tuple[int, int],
    *,
    flip: bool = False,
    features: Tensor | None = None,
    log_probs: bool = False,
) -> tuple[Tensor, Tensor]:
    """Cluster probabilities and linear logits at label resolution.

    Args:
        backbone: frozen feature extractor, ``(B, 3, H, W) -> (B, C, h, w)``.
        head: segmentation head returning ``(target, code)``.
        cluster_probe: trained cluster probe.
        linear_probe: trained linear probe.
        images: ``(B, 3, H, W)`` ImageNet-normalised images.
        size: label size ``(H, W)`` to upsample the code to (bilinear).
        flip: average the code with the code of the flipped image (flipped back).
        features: precomputed ``backbone(images)`` ``(B, C, h, w)`` (the backbone is frozen,
            so validation features are computed once per run); ignored when ``flip``.
        log_probs: return log-probabilities instead: ``log_softmax(2 cos)`` and
            ``log_softmax(logits)``, as the released ``eval_segmentation.py`` computes them.

    Returns:
        ``(cluster_probs (B, K, H, W), linear_logits (B, K, H, W))``, or with ``log_probs``
        ``(cluster_log_probs, linear_log_probs)``.
    """
    head.eval()
    code = head(features if (features is not None and not flip) else backbone(images))[1]
    if flip:
        code = 0.5 * (code + head(backbone(images.flip(-1)))[1].flip(-1))
    code = F.interpolate(code, size=size, mode="bilinear", align_corners=False)
    if log_probs:
        return (torch.log_softmax(cluster_probe.similarities(code) * CLUSTER_ALPHA, dim=1),
                torch.log_softmax(linear_probe(code), dim=1))
    _, cluster_probs = cluster_probe(code, alpha=CLUSTER_ALPHA)
    return cluster_probs, linear_probe(code)


def evaluate_segmentation(
    samples: Iterable[dict],
    backbone: nn.Module,
    head: nn.Module,
    cluster_probe: ClusterProbe,
    linear_probe: LinearProbe,
    *,
    batch_size: int = 16,
    crf: bool = False,
    crf_params: CRFParams = CRFParams(),
    crf_processes: int = 0,
    flip: bool = False,
    device: str | torch.device = "cpu",
    keep_predictions: bool = False,
    crf_image: str = "rgb",
) -> EvalResult:
    """Score both probes over every validation pixel (SPEC section 4).

    Args:
        samples: dicts with ``image`` ``(H, W, 3)`` uint8 and ``label`` ``(H, W)`` int64
            (-1 = ignore), all of one size (the 320 px validation crops); optionally
            ``features``, the precomputed ``(C, h, w)`` backbone output of the image.
        backbone, head, cluster_probe, linear_probe: the trained model parts.
        batch_size: images per forward pass.
        crf: refine both probes' predictions with DenseCRF (STEGO A.10 parameters).
        crf_params: CRF parameters.
        crf_processes: worker processes for the CRF (0 = in-process).
        flip: horizontal-flip averaging of the code.
        device: where the networks run.
        keep_predictions: also return the per-image predictions (``"cluster"`` and
            ``"linear"``: lists of ``(H, W)`` int64 arrays) and labels.
        crf_image: the image the CRF's appearance kernel sees: ``"rgb"`` (the uint8 crop) or
            ``"bgr_truncated"`` (as the released code builds it: un-normalised, x255 truncated,
            BGR; SPEC section 7, R12; :func:`repro.evaluate.crf.released_crf_image`). The CRF's
            unaries are the log-softmax of ``2 cos`` (cluster) and of the logits (linear), as in
            the released ``eval_segmentation.py``.

    Returns:
        :class:`EvalResult` with accuracy and mIoU x100 for both probes.

    Raises:
        ValueError: if a sample has no label, an unknown ``crf_image``, or from the metrics (no
            labelled pixel).
    """
    if crf_image not in CRF_IMAGES:
        raise ValueError(f"crf_image must be one of {CRF_IMAGES}, got {crf_image!r}")
    k = linear_probe.num_classes
    cluster_cm = ConfusionMatrix(k, cluster_probe.num_clusters)
    linear_cm = ConfusionMatrix(k)
    kept: dict[str, list[np.ndarray]] = {"cluster": [], "linear": [], "label": []}

    def run(batch: list[dict]) -> None:
        labels = []
        for s in batch:
            if s.get("label") is None:
                raise ValueError(f"sample {s.get('key')!r} has no label; evaluation needs labels")
            labels.append(torch.as_tensor(s["label"], dtype=torch.long))
        label = torch.stack(labels)
        images = images_to_tensor([s["image"] for s in batch], device)
        cached = [s.get("features") for s in batch]
        features = torch.stack(cached).to(device) if all(c is not None for c in cached) else None
        cluster_log, linear_log = predict_logits(backbone, head, cluster_probe, linear_probe, images,
                                                 tuple(label.shape[-2:]), flip=flip, features=features, log_probs=True)
        if crf:
            raw = crf_images(np.stack([s["image"] for s in batch]), images.cpu(), crf_image)
            # dense_crf applies a softmax to what it is given: log-probabilities, as the released code passes.
            cluster = dense_crf_batch(raw, cluster_log.cpu(), crf_params, crf_processes)
            linear = dense_crf_batch(raw, linear_log.cpu(), crf_params, crf_processes)
            cluster_pred, linear_pred = torch.from_numpy(cluster.argmax(1)), torch.from_numpy(linear.argmax(1))
        else:
            cluster_pred, linear_pred = cluster_log.argmax(1).cpu(), linear_log.argmax(1).cpu()
        cluster_cm.update(cluster_pred, label)
        linear_cm.update(linear_pred, label)
        if keep_predictions:
            kept["cluster"].extend(p.numpy() for p in cluster_pred)
            kept["linear"].extend(p.numpy() for p in linear_pred)
            kept["label"].extend(lab.numpy() for lab in label)

    batch: list[dict] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            run(batch)
            batch = []
    if batch:
        run(batch)
    return EvalResult(
        cluster=compute_metrics(cluster_cm, matching="hungarian"),
        linear=compute_metrics(linear_cm, matching="identity"),
        cluster_matrix=cluster_cm,
        linear_matrix=linear_cm,
        predictions=kept if keep_predictions else {},
    )
