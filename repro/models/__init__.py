"""Models: the frozen DINO backbone F, the segmentation head S, probes and the 3D-LHP head P."""

from repro.models.backbone import ARCHS, DinoBackbone, DinoArch, init_random_checkpoint, load_dino_state_dict
from repro.models.heads import ProjectionHead, SegmentationHead
from repro.models.probes import ClusterProbe, LinearProbe

__all__ = [
    "ARCHS",
    "ClusterProbe",
    "DinoArch",
    "DinoBackbone",
    "LinearProbe",
    "ProjectionHead",
    "SegmentationHead",
    "init_random_checkpoint",
    "load_dino_state_dict",
]
