"""Evaluate a run's trained parts on the 320 px validation crops and write ``metrics.json``.

Two checkpoints are reported, always labelled: ``final`` (the end of training, the headline
number) and ``best_on_val`` (the parts with the best unsupervised mIoU seen on the validation
set during training, the papers' selection; that set is also the test set, README: Training, evaluation and one table entry).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from repro.data.crops import iter_crops
from repro.data.transforms import images_to_tensor
from repro.evaluate.crf import CRFParams
from repro.evaluate.protocol import EvalResult, evaluate_models
from repro.models.bundle import TrainedParts
from repro.utils.files import atomic_path

__all__ = ["ValidationSet", "evaluate_many", "evaluate_parts", "result_summary", "write_json", "save_eval_figures"]


def write_json(path: str | Path, data: dict) -> Path:
    """Write JSON atomically (temporary file, then rename); NumPy/torch scalars are converted."""
    def default(obj):
        if isinstance(obj, (np.generic, torch.Tensor)):
            return obj.item() if obj.ndim == 0 else obj.tolist()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        raise TypeError(f"cannot serialise {type(obj).__name__}")

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=default, allow_nan=True))
    return Path(path)


class ValidationSet:
    """The validation crops in memory, with their frozen-backbone features computed once.

    Args:
        crops: a finished 320 px crops folder (``repro prepare --size 320 --no-five-crop``).
        depth: optional depth folder of those crops (only for the figures).
        budget_gb: memory for cached features; images beyond it are recomputed per evaluation.

    Raises:
        FileNotFoundError: if the crops folder is incomplete. ValueError: if a crop has no label.
    """

    def __init__(self, crops: str | Path, depth: str | Path | None = None, budget_gb: float = 4.0) -> None:
        self.samples = []
        for crop in iter_crops(crops):
            if crop.label is None:
                raise ValueError(f"validation crop {crop.key!r} in {crops} has no label")
            self.samples.append({"key": crop.key, "image": crop.image, "label": crop.label})
        self.depth = Path(depth) if depth is not None else None
        self.budget = int(budget_gb * 2**30)
        self._features_ready = False

    def __len__(self) -> int:
        return len(self.samples)

    @torch.no_grad()
    def cache_features(self, backbone, device, batch_size: int = 16) -> None:
        """Compute and keep ``backbone`` features for as many crops as the budget allows."""
        if self._features_ready:
            return
        used = 0
        for start in range(0, len(self.samples), batch_size):
            batch = self.samples[start : start + batch_size]
            feats = backbone(images_to_tensor([s["image"] for s in batch], device)).float()
            for s, f in zip(batch, feats):
                size = f.numel() * f.element_size()
                if used + size > self.budget:
                    self._features_ready = True
                    return
                s["features"] = f.clone()
                used += size
        self._features_ready = True

    def depth_of(self, key: str) -> np.ndarray | None:
        """The [0, 1] depth map of a crop, if a depth folder was given and holds one.

        Guidance that is not a depth map (MDE features, class ids: :mod:`repro.method.guidance`) gives None,
        so the figures leave their depth column out.
        """
        path = self.depth / f"{key}.npy" if self.depth is not None else None
        if path is None or not path.is_file():
            return None
        depth = np.load(path)
        return depth if depth.ndim == 2 and np.issubdtype(depth.dtype, np.floating) else None


def evaluate_many(models: dict[str, TrainedParts], backbone, val: ValidationSet, *, crf: bool, flip: bool = False,
                  crf_processes: int = 0, batch_size: int = 16, device="cpu", keep_first: int = 0,
                  crf_image: str = "rgb") -> dict[str, EvalResult]:
    """Score several checkpoints over the validation crops in one pass (README: Training, evaluation and one table entry).

    Args:
        models: label -> trained parts (e.g. ``{"final": ..., "best_on_val": ...}``).
        backbone: the frozen backbone.
        val: validation crops (features cached on first use).
        crf, flip, batch_size, crf_image: see :func:`repro.evaluate.protocol.evaluate_models`.
        crf_processes: DenseCRF worker processes; 0 = in-process, -1 = every CPU this process may use.
        device: where the networks run.
        keep_first: keep the predictions of the first ``keep_first`` crops (figures).

    Returns:
        label -> :class:`~repro.evaluate.protocol.EvalResult`.
    """
    val.cache_features(backbone, device, batch_size)
    return evaluate_models(val.samples, backbone, models, batch_size=batch_size, crf=crf, crf_params=CRFParams(),
                           crf_processes=crf_processes, flip=flip, device=device, keep_first=keep_first,
                           crf_image=crf_image)


def evaluate_parts(parts: TrainedParts, backbone, val: ValidationSet, *, crf: bool, flip: bool = False,
                   crf_processes: int = 0, batch_size: int = 16, device="cpu", keep_predictions: bool = False,
                   crf_image: str = "rgb") -> EvalResult:
    """Score one checkpoint's probes over the validation crops: :func:`evaluate_many` with one model.

    ``keep_predictions`` keeps every crop's predictions.
    """
    return evaluate_many({"model": parts}, backbone, val, crf=crf, flip=flip, crf_processes=crf_processes,
                         batch_size=batch_size, device=device, keep_first=len(val) if keep_predictions else 0,
                         crf_image=crf_image)["model"]


def result_summary(result: EvalResult) -> dict[str, float]:
    """The four headline numbers (x100): ``unsup_acc``, ``unsup_miou``, ``linear_acc``, ``linear_miou``."""
    return {"unsup_acc": result.cluster.accuracy, "unsup_miou": result.cluster.miou,
            "linear_acc": result.linear.accuracy, "linear_miou": result.linear.miou}


def save_eval_figures(out_dir: str | Path, result: EvalResult, val: ValidationSet, class_names: Sequence[str],
                      title: str) -> list[Path]:
    """The qualitative figure (image | ground truth | cluster prediction | depth) and the confusion PNG.

    Args:
        out_dir: folder for ``qualitative.png`` and ``confusion.png``.
        result: the full evaluation (its Hungarian assignment maps clusters to classes) with the
            predictions of the first few crops kept (``keep_first``).
        val: the validation crops (for images and depth).
        class_names: names in label order (:func:`repro.data.datasets.registry.class_names_for`).
        title: figure title.
    """
    from repro.evaluate.figures import save_confusion_figure, save_qualitative_figure

    names = list(class_names)
    assignment = np.asarray(result.cluster.assignment)
    preds = [np.where(assignment[p] >= 0, assignment[p], -1) for p in result.predictions["cluster"]]
    n = len(preds)
    depths = [val.depth_of(s["key"]) for s in val.samples[:n]]
    out_dir = Path(out_dir)
    return [
        save_qualitative_figure(out_dir / "qualitative.png", [s["image"] for s in val.samples[:n]],
                                result.predictions["label"], preds,
                                depths if all(d is not None for d in depths) else None, names, title=title),
        save_confusion_figure(out_dir / "confusion.png", np.asarray(result.cluster.confusion), names,
                              title=f"{title}: cluster probe (Hungarian-matched)"),
    ]


def format_metrics(metrics: dict) -> str:
    """A plain-text table of a ``metrics.json``: final and best-on-val, cluster and linear probe."""
    protocol = metrics.get("protocol", {})
    lines = [f"{metrics.get('entry', '')} ({metrics.get('fidelity', 'paper')} fidelity) seed {metrics.get('seed', '')}: "
             f"{metrics.get('num_images', '?')} val images, CRF {'on' if protocol.get('crf') else 'off'}, "
             f"flip {'on' if protocol.get('flip') else 'off'}",
             f"{'checkpoint':<26}{'unsup Acc':>10}{'unsup mIoU':>12}{'linear Acc':>12}{'linear mIoU':>13}"]
    for label, name in (("final", "final"), ("best_on_val", "best on val (val = test)")):
        if label in metrics:
            s = metrics[label]["summary"]
            lines.append(f"{name:<26}{s['unsup_acc']:>10.1f}{s['unsup_miou']:>12.1f}{s['linear_acc']:>12.1f}"
                         f"{s['linear_miou']:>13.1f}")
    return "\n".join(lines)
