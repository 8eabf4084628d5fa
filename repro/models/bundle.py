"""The trained parts of one run (head, probes, projection head) built from a config, saved and loaded.

The backbone is frozen and never saved: a run's ``model.pt`` holds only what training changed,
plus the step and the architecture facts needed to rebuild it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from repro.utils.files import atomic_path
from repro.utils.errors import MissingFileError
from repro.models.heads import ProjectionHead, SegmentationHead
from repro.models.probes import ClusterProbe, LinearProbe

__all__ = ["FeatureHead", "TrainedParts", "build_parts", "save_parts", "load_parts"]


class FeatureHead(nn.Module):
    """The identity "head" of the DINO baselines: the code is the raw backbone feature map.

    ``forward(f) -> (f, f)`` for ``f`` of shape ``(B, C, H, W)``, so the probes cluster and
    classify DINO's own features (DepthG Tables 1-3, "DINO" rows).
    """

    def forward(self, f: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(f, f)``."""
        return f, f


@dataclass
class TrainedParts:
    """Everything a run trains: head S, cluster and linear probes, optional projection head P."""

    head: nn.Module
    cluster_probe: ClusterProbe
    linear_probe: LinearProbe
    projection: ProjectionHead | None = None

    def modules(self) -> dict[str, nn.Module]:
        """The parts by name (``projection`` only when present)."""
        parts = {"head": self.head, "cluster_probe": self.cluster_probe, "linear_probe": self.linear_probe}
        if self.projection is not None:
            parts["projection"] = self.projection
        return parts

    def to(self, device: torch.device | str) -> TrainedParts:
        """Move every part to ``device`` (in place) and return self."""
        for module in self.modules().values():
            module.to(device)
        return self


def build_parts(config, feature_dim: int, num_classes: int) -> TrainedParts:
    """Fresh parts for an :class:`~repro.config.ExperimentConfig`.

    Args:
        config: the experiment config (``method``, ``model.code_dim``, ``model.dropout``, ``lhp``).
        feature_dim: C of the backbone (384 ViT-S/8, 768 ViT-B/8).
        num_classes: K of the dataset; the cluster probe gets K centroids (no extra clusters).

    Returns:
        :class:`TrainedParts`; for ``method: dino`` the head is :class:`FeatureHead` and the
        probes work on C channels.
    """
    if config.method == "dino":
        head: nn.Module = FeatureHead()
        code_dim = feature_dim
    else:
        code_dim = config.model.code_dim
        head = SegmentationHead(feature_dim, code_dim, config.model.dropout, config.model.dropout_target)
    projection = ProjectionHead(code_dim) if (config.lhp.enabled and config.method != "dino") else None
    return TrainedParts(head, ClusterProbe(code_dim, num_classes), LinearProbe(code_dim, num_classes), projection)


def save_parts(path: str | Path, parts: TrainedParts, meta: dict) -> Path:
    """Write the parts' state dicts and ``meta`` (step, arch, ...) atomically with ``torch.save``."""
    payload = {"meta": dict(meta), **{name: m.state_dict() for name, m in parts.modules().items()}}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_parts(path: str | Path, config, feature_dim: int, num_classes: int) -> tuple[TrainedParts, dict]:
    """Rebuild the parts from ``config`` and load a file written by :func:`save_parts`.

    Returns:
        ``(parts, meta)``.

    Raises:
        MissingFileError: if the file does not exist (train the run first).
        RuntimeError: if the file does not match the config (state-dict key/shape mismatch).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError("trained model", path, "train the run first (`repro train` or `repro run`)")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    parts = build_parts(config, feature_dim, num_classes)
    for name, module in parts.modules().items():
        if name not in payload:
            raise RuntimeError(f"{path} has no {name!r} weights; it was trained with another config")
        module.load_state_dict(payload[name])
    return parts, payload.get("meta", {})
