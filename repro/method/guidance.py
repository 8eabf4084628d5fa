"""What DepthG's guidance mechanism is fed: a depth map, MDE feature maps, or a segmentation map.

DepthG (sec. 3.2-3.4) guides feature learning with one depth map per crop: the depth-feature
correlation ``D`` (eq. 5) and the FPS sample locations (sec. 3.4). Its supplement (B.1, Table 3)
plugs two other signals into the same mechanism: the feature maps of the penultimate layer of the
depth estimator ("MDE features") and the ground-truth segmentation maps. ``data.depth_source``
names the signal; this module says what kind it is and turns a batch of stored maps into the
``(B, C, H, W)`` tensor that :mod:`repro.method.losses` and :mod:`repro.method.sampling` take.

=====================  ==========  ================================================================
``data.depth_source``  kind        stored per crop (depth folder, shards) -> fed to the method
=====================  ==========  ================================================================
zoedepth, midas,       ``depth``   ``(S, S)`` float [0, 1] -> ``(B, 1, S, S)`` (unchanged)
sensor, planes,
kbr, files
``mde_features``       ``features`` ``(C, g, g)`` float16 feature maps, ``g = S / 8`` (R18) -> as is
``semseg``             ``classes`` ``(S, S)`` int16 class ids, -1 void -> one-hot ``(B, K, S, S)``,
                                   class fractions when pooled (R21)
=====================  ==========  ================================================================

With ``C > 1`` channels the correlation is the cosine similarity of the guidance vectors (R19,
:func:`repro.method.losses.depth_correlation_tensor`) and FPS runs over :func:`repro.method.sampling.guidance_points`
(R20). A depth map gives exactly the numbers of eq. 5 and the 3D FPS as before.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["GUIDANCE_KINDS", "guidance_kind", "one_hot_classes", "pool_guidance", "fed_guidance",
           "check_stored", "check_guidance_config", "FEATURE_STRIDE"]

#: Sources whose guidance is not a depth map; every other ``data.depth_source`` is a depth map.
GUIDANCE_KINDS = {"mde_features": "features", "semseg": "classes"}

#: MDE feature maps are stored at the crop side / 8, the DINO ViT/8 patch grid the method pools to.
FEATURE_STRIDE = 8


def guidance_kind(source: str) -> str:
    """``"depth"``, ``"features"`` (MDE features) or ``"classes"`` (segmentation map) of a ``data.depth_source``."""
    return GUIDANCE_KINDS.get(source, "depth")


def one_hot_classes(labels: Tensor, num_classes: int) -> Tensor:
    """One-hot maps of class ids; void pixels (-1) are all-zero vectors.

    Args:
        labels: ``(B, H, W)`` integer class ids in ``[-1, num_classes)`` (-1 = void / ignore).
        num_classes: ``K``.

    Returns:
        ``(B, K, H, W)`` float32 in {0, 1}.

    Raises:
        ValueError: for a non-integer or non-3-D tensor, or ids outside ``[-1, K)``.
    """
    if labels.ndim != 3 or labels.is_floating_point():
        raise ValueError(f"class maps must be (B, H, W) integer ids, got {tuple(labels.shape)} {labels.dtype}")
    labels = labels.long()
    if labels.numel() and (int(labels.min()) < -1 or int(labels.max()) >= num_classes):
        raise ValueError(f"class ids must be in [-1, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    valid = labels >= 0
    hot = F.one_hot(labels.clamp(min=0), num_classes).permute(0, 3, 1, 2).float()
    return hot * valid[:, None].float()


def pool_guidance(guidance: Tensor, size: tuple[int, int]) -> Tensor:
    """Average-pool a ``(B, C, H, W)`` guidance map to the feature grid (DepthG eq. 4 for ``C = 1``).

    For one-hot class maps the result is each cell's class fractions (void pixels count for no
    class; the cosine similarity and FPS that use it do not depend on that scale, R21). A map that
    already has the grid's size is returned unchanged (``adaptive_avg_pool2d`` is then the identity).

    Args:
        guidance: ``(B, C, H, W)`` float.
        size: ``(h, w)`` target grid.

    Returns:
        ``(B, C, h, w)``.

    Raises:
        ValueError: for a non-4-D input.
    """
    if guidance.ndim != 4:
        raise ValueError(f"guidance must be (B, C, H, W), got {tuple(guidance.shape)}")
    return F.adaptive_avg_pool2d(guidance, (int(size[0]), int(size[1])))


def fed_guidance(stored: Tensor, kind: str, *, num_classes: int | None = None) -> Tensor:
    """A batch of stored non-depth guidance as the method sees it, before pooling.

    Args:
        stored: ``"features"``: ``(B, C, g, g)`` float MDE feature maps; ``"classes"``: ``(B, H, W)``
            integer class ids (-1 void).
        kind: ``"features"`` or ``"classes"`` (:func:`guidance_kind`).
        num_classes: ``K`` for ``"classes"``.

    Returns:
        ``(B, C, g, g)`` float32 features, or ``(B, K, H, W)`` one-hot classes.

    Raises:
        ValueError: for an unknown kind or a tensor of the wrong shape.
    """
    if kind == "features":
        if stored.ndim != 4:
            raise ValueError(f"MDE feature maps must be (B, C, g, g), got {tuple(stored.shape)}")
        return stored.float()
    if kind == "classes":
        if num_classes is None:
            raise ValueError("class guidance needs num_classes")
        return one_hot_classes(stored, num_classes)
    raise ValueError(f"unknown guidance kind {kind!r}; expected 'features' or 'classes'")


def check_stored(array, kind: str, crop_side: tuple[int, int], path) -> None:
    """Check one crop's stored guidance before it goes into the shards.

    Args:
        array: the stored numpy array.
        kind: :func:`guidance_kind` of the source.
        crop_side: ``(H, W)`` of the crop image.
        path: the file, for the message.

    Raises:
        repro.data.datasets.base.DatasetError: naming the file, for a wrong shape or dtype, or non-finite features.
    """
    import numpy as np

    from repro.utils.errors import DatasetError

    h, w = crop_side
    if kind == "features":
        g = (h // FEATURE_STRIDE, w // FEATURE_STRIDE)
        if array.ndim != 3 or array.shape[1:] != g or not np.isfinite(array).all():
            raise DatasetError(f"{path}: MDE feature maps must be finite (C, {g[0]}, {g[1]}) for a {h}x{w} crop, got "
                               f"{array.shape} with {int((~np.isfinite(array)).sum())} non-finite value(s); "
                               "rerun `repro depth`")
    elif kind == "classes":
        if array.shape != (h, w) or not np.issubdtype(array.dtype, np.integer):
            raise DatasetError(f"{path}: a class-id guidance map must be integer ({h}, {w}), got {array.dtype} "
                               f"{array.shape}; rerun `repro depth`")
    else:
        raise ValueError(f"unknown guidance kind {kind!r}")



def check_guidance_config(config) -> None:
    """Refuse what a non-depth guidance signal cannot do: 3D-LHP back-projects a depth map (sec. 3.6).

    Args:
        config: an :class:`~repro.config.schema.ExperimentConfig`.

    Raises:
        ValueError: for ``mde_features`` / ``semseg`` with ``lhp.enabled`` and ``lhp.propagation: depth``
            (names the fix).
    """
    if guidance_kind(config.data.depth_source) != "depth" and config.method != "dino" \
            and config.lhp.enabled and config.lhp.propagation == "depth":
        raise ValueError(f"3D-LHP back-projects a depth map; data.depth_source={config.data.depth_source} is not one: "
                         "set lhp.propagation=attention or lhp.enabled=false")
