"""The evaluation protocol of STEGO/DepthG (README: Training, evaluation and one table entry) over validation samples.

For each 320 x 320 validation image: frozen features, head code (optionally averaged with
the horizontally flipped pass), code upsampled bilinearly to the label size; the cluster
probe's soft assignment (``softmax(2 cos)``, STEGO's alpha before the CRF) and the linear
probe's logits; optional DenseCRF refinement; argmax. One confusion matrix per probe is
accumulated over all validation pixels; the cluster probe is scored after Hungarian
matching, the linear probe with the identity mapping.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repro.data.transforms import images_to_tensor
from repro.evaluate.crf import CRF_IMAGES, CRFParams, CRFPoolError, crf_images, dense_crf, pool_broken_message
from repro.evaluate.metrics import ConfusionMatrix, SegmentationMetrics, compute_metrics
from repro.models.bundle import TrainedParts
from repro.models.probes import ClusterProbe, LinearProbe

__all__ = ["EvalResult", "upsampled_code", "probe_log_probs", "predict_logits", "evaluate_models",
           "evaluate_segmentation"]

CLUSTER_ALPHA = 2.0


@dataclass
class EvalResult:
    """Metrics of both probes, their confusion matrices and (optionally) the predictions."""

    cluster: SegmentationMetrics
    linear: SegmentationMetrics
    cluster_matrix: ConfusionMatrix
    linear_matrix: ConfusionMatrix
    predictions: dict[str, list[np.ndarray]] = field(default_factory=dict)


def upsampled_code(head: nn.Module, features: Tensor, flipped: Tensor | None, size: tuple[int, int]) -> Tensor:
    """The head's code ``(B, D, H, W)`` at label size (bilinear), flip-averaged when ``flipped`` is given.

    Args:
        head: segmentation head returning ``(target, code)``.
        features: ``backbone(images)`` ``(B, C, h, w)``.
        flipped: ``backbone(images.flip(-1))`` ``(B, C, h, w)``, or ``None`` for no flip averaging
            (the flipped image's code is flipped back, then the two codes are averaged: docs/fidelity.md R12).
        size: label size ``(H, W)``.
    """
    code = head(features)[1]
    if flipped is not None:
        code = 0.5 * (code + head(flipped)[1].flip(-1))
    return F.interpolate(code, size=size, mode="bilinear", align_corners=False)


def probe_log_probs(cluster_probe: ClusterProbe, linear_probe: LinearProbe, code: Tensor) -> tuple[Tensor, Tensor]:
    """``(log_softmax(2 cos), log_softmax(logits))``, each ``(B, K, H, W)``: the CRF's unaries and the argmax
    predictions, as the released ``eval_segmentation.py`` computes them from the upsampled ``code``."""
    return (torch.log_softmax(cluster_probe.similarities(code) * CLUSTER_ALPHA, dim=1),
            torch.log_softmax(linear_probe(code), dim=1))


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
    plain = features if (features is not None and not flip) else backbone(images)
    code = upsampled_code(head, plain, backbone(images.flip(-1)) if flip else None, size)
    if log_probs:
        return probe_log_probs(cluster_probe, linear_probe, code)
    _, cluster_probs = cluster_probe(code, alpha=CLUSTER_ALPHA)
    return cluster_probs, linear_probe(code)


def _crf_argmax(job: tuple[np.ndarray, np.ndarray, CRFParams]) -> np.ndarray:
    """Pool worker: DenseCRF of one image and probe, reduced to its argmax ``(H, W)`` int16 (small to send back)."""
    image, log_probs, params = job
    return dense_crf(image, log_probs, params).argmax(0).astype(np.int16)


class _CRFRunner:
    """DenseCRF of many images: in this process, or in a persistent pool that works while the caller computes.

    Jobs are submitted as soon as a batch's log-probabilities exist and collected in order later, so
    the pool refines batch ``t`` while the network computes batch ``t + 1``. Both paths run the same
    function on the same inputs, so their results are identical.
    """

    def __init__(self, processes: int) -> None:
        self.pool = None
        if processes < 0:
            processes = len(os.sched_getaffinity(0))
        self.processes = processes
        if processes > 0:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            from repro.evaluate.crf import init_worker

            self.pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=init_worker)

    def submit(self, images: np.ndarray, log_probs: Tensor, params: CRFParams) -> list:
        jobs = [(np.ascontiguousarray(img), np.ascontiguousarray(lp), params)
                for img, lp in zip(images, log_probs.detach().to("cpu", torch.float32).numpy())]
        if self.pool is None:
            return [_crf_argmax(job) for job in jobs]
        try:
            return [self.pool.submit(_crf_argmax, job) for job in jobs]
        except BrokenProcessPool:
            raise CRFPoolError(pool_broken_message(self.processes)) from None

    def collect(self, handles: list) -> Tensor:
        try:
            out = [h if isinstance(h, np.ndarray) else h.result() for h in handles]
        except BrokenProcessPool:
            raise CRFPoolError(pool_broken_message(self.processes)) from None
        return torch.from_numpy(np.stack(out).astype(np.int64))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def evaluate_models(
    samples: Iterable[dict],
    backbone: nn.Module,
    models: dict[str, TrainedParts],
    *,
    batch_size: int = 16,
    crf: bool = False,
    crf_params: CRFParams = CRFParams(),
    crf_processes: int = 0,
    flip: bool = False,
    device: str | torch.device = "cpu",
    keep_first: int = 0,
    crf_image: str = "rgb",
) -> dict[str, EvalResult]:
    """Score several checkpoints' probes over every validation pixel in ONE pass (README: Training, evaluation and one table entry).

    The frozen features of each image (and of its flip) are computed once and shared by every model
    (e.g. the final and the best-on-val checkpoint); the CRF of batch ``t`` runs in the process pool
    while the networks compute batch ``t + 1``. The metrics are identical to scoring each model on
    its own, serially.

    Args:
        samples: dicts with ``image`` ``(H, W, 3)`` uint8 and ``label`` ``(H, W)`` int64
            (-1 = ignore), all of one size (the 320 px validation crops); optionally
            ``features``, the precomputed ``(C, h, w)`` backbone output of the image.
        backbone: the frozen backbone.
        models: label -> the checkpoint's :class:`~repro.models.bundle.TrainedParts` (put in eval mode here).
        batch_size: images per forward pass.
        crf: refine both probes' predictions with DenseCRF (STEGO A.10 parameters).
        crf_params: CRF parameters.
        crf_processes: worker processes for the CRF (0 = in-process, -1 = every CPU this process may use).
        flip: horizontal-flip averaging of the code.
        device: where the networks run.
        keep_first: also return the predictions (``"cluster"``, ``"linear"``: ``(H, W)`` int64
            arrays) and labels of the first ``keep_first`` images (figures).
        crf_image: the image the CRF's appearance kernel sees: ``"rgb"`` (the uint8 crop) or
            ``"bgr_truncated"`` (as the released code builds it: un-normalised, x255 truncated,
            BGR; docs/fidelity.md, R12; :func:`repro.evaluate.crf.released_crf_image`). The CRF's
            unaries are the log-softmax of ``2 cos`` (cluster) and of the logits (linear), as in
            the released ``eval_segmentation.py``.

    Returns:
        label -> :class:`EvalResult` with accuracy and mIoU x100 for both probes.

    Raises:
        ValueError: if a sample has no label, an unknown ``crf_image``, or from the metrics (no
            labelled pixel).
        CRFPoolError: a CRF worker process died (killed, out of memory); nothing is returned.
    """
    if crf_image not in CRF_IMAGES:
        raise ValueError(f"crf_image must be one of {CRF_IMAGES}, got {crf_image!r}")
    matrices = {name: (ConfusionMatrix(m.linear_probe.num_classes, m.cluster_probe.num_clusters),
                       ConfusionMatrix(m.linear_probe.num_classes)) for name, m in models.items()}
    kept: dict[str, dict[str, list[np.ndarray]]] = {name: {"cluster": [], "linear": [], "label": []} for name in models}
    for m in models.values():
        for module in m.modules().values():
            module.eval()
    runner = _CRFRunner(crf_processes if crf else 0)
    pending: list[tuple[Tensor, dict[str, tuple[list, list]]]] = []

    def account(label: Tensor, predictions: dict[str, tuple]) -> None:
        seen = len(kept[next(iter(kept))]["label"]) if kept else 0
        take = max(0, min(keep_first - seen, label.shape[0]))
        for name, (cluster, linear) in predictions.items():
            cluster = runner.collect(cluster) if isinstance(cluster, list) else cluster
            linear = runner.collect(linear) if isinstance(linear, list) else linear
            matrices[name][0].update(cluster, label)
            matrices[name][1].update(linear, label)
            if take:
                kept[name]["cluster"].extend(p.numpy() for p in cluster[:take])
                kept[name]["linear"].extend(p.numpy() for p in linear[:take])
                kept[name]["label"].extend(lab.numpy() for lab in label[:take])

    @torch.no_grad()
    def run(batch: list[dict]) -> None:
        labels = []
        for s in batch:
            if s.get("label") is None:
                raise ValueError(f"sample {s.get('key')!r} has no label; evaluation needs labels")
            labels.append(torch.as_tensor(s["label"], dtype=torch.long))
        label = torch.stack(labels)
        images = images_to_tensor([s["image"] for s in batch], device)
        cached = [s.get("features") for s in batch]
        features = torch.stack(cached).to(device) if all(c is not None for c in cached) else backbone(images)
        flipped = backbone(images.flip(-1)) if flip else None
        raw = crf_images(np.stack([s["image"] for s in batch]), images, crf_image) if crf else None  # moved per image
        predictions = {}
        for name, m in models.items():
            code = upsampled_code(m.head, features, flipped, tuple(label.shape[-2:]))
            cluster_log, linear_log = probe_log_probs(m.cluster_probe, m.linear_probe, code)
            if crf:  # dense_crf applies a softmax to what it is given: log-probabilities, as the released code
                predictions[name] = (runner.submit(raw, cluster_log, crf_params), runner.submit(raw, linear_log, crf_params))
            else:
                predictions[name] = (cluster_log.argmax(1).cpu(), linear_log.argmax(1).cpu())
        pending.append((label, predictions))
        while len(pending) > 2:  # bounded: the pool works on at most ~2 batches while this one is computed
            account(*pending.pop(0))

    try:
        batch: list[dict] = []
        for sample in samples:
            batch.append(sample)
            if len(batch) == batch_size:
                run(batch)
                batch = []
        if batch:
            run(batch)
        while pending:
            account(*pending.pop(0))
    finally:
        runner.close()
    return {name: EvalResult(cluster=compute_metrics(cm_c, matching="hungarian"),
                             linear=compute_metrics(cm_l, matching="identity"), cluster_matrix=cm_c,
                             linear_matrix=cm_l, predictions=kept[name] if keep_first else {})
            for name, (cm_c, cm_l) in matrices.items()}


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
    """Score one checkpoint's probes over every validation pixel (README: Training, evaluation and one table entry).

    :func:`evaluate_models` with one model; ``keep_predictions`` keeps every image's predictions.
    The other arguments, the result and the errors are those of :func:`evaluate_models`.
    """
    samples = list(samples)
    return evaluate_models(samples, backbone, {"model": TrainedParts(head, cluster_probe, linear_probe)},
                           batch_size=batch_size, crf=crf, crf_params=crf_params, crf_processes=crf_processes,
                           flip=flip, device=device, keep_first=len(samples) if keep_predictions else 0,
                           crf_image=crf_image)["model"]
