"""Correlation losses of STEGO (Hamilton et al., ICLR 2022) and DepthG (Sick et al., CVPR 2024).

Shapes: ``f`` are backbone features ``(B, C, N, M)``, ``s`` are segmentation-head codes
``(B, Q, N, M)``, ``d`` are depth maps ``(B, 1, N, M)`` normalised to [0, 1]. ``N x M`` is
the grid of sample locations (``N x N`` sampled points, or the full feature map).

The correlation tensors have shape ``(B, N, M, N', M')``; every loss here is the mean over
those entries and the batch. The papers write a sum (STEGO eq. 4, DepthG eq. 2/6); the mean
is the released code's choice and differs from the sum only by the constant factor
``B (N M)^2``, which Adam's update is invariant to. ``reduction="sum"`` gives the written form.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from repro.method.sampling import sample_at

__all__ = [
    "LossWeights",
    "LossTerms",
    "correlation_tensor",
    "correlation_loss",
    "depth_correlation_tensor",
    "depth_feature_correlation_loss",
    "derangement",
    "super_perm",
    "NEGATIVE_DRAWS",
    "stego_depthg_loss",
]

_REDUCTIONS = ("mean", "sum")
_DEPTH_KERNELS = ("product", "released")


def _reduce(x: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _upcast(x: Tensor) -> Tensor:
    """Half-precision (autocast) and integer inputs are computed in float32; float64 stays float64."""
    return x.float() if (x.dtype in (torch.float16, torch.bfloat16) or not x.is_floating_point()) else x


def _check_pair(a: Tensor, b: Tensor, name: str) -> None:
    if a.ndim != 4 or b.ndim != 4:
        raise ValueError(f"{name}: expected 4-D (B, C, N, M) tensors, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[:2] != b.shape[:2]:
        raise ValueError(f"{name}: batch/channel mismatch {tuple(a.shape)} vs {tuple(b.shape)}")


def correlation_tensor(a: Tensor, b: Tensor) -> Tensor:
    """Cosine-similarity correspondence tensor (STEGO eq. 1, DepthG eq. 1).

    Args:
        a: ``(B, C, N, M)`` features or codes of the first image.
        b: ``(B, C, N', M')`` features or codes of the second image.

    Returns:
        ``(B, N, M, N', M')`` with entry ``[b, h, w, u, v] = cos(a[b, :, h, w], b[b, :, u, v])``.

    Raises:
        ValueError: if the inputs are not 4-D or their batch/channel sizes differ.
    """
    _check_pair(a, b, "correlation_tensor")
    return torch.einsum("bchw,bcuv->bhwuv", F.normalize(a, dim=1), F.normalize(b, dim=1))


def correlation_loss(
    f_i: Tensor,
    f_j: Tensor,
    s_i: Tensor,
    s_j: Tensor,
    b: float,
    *,
    spatial_centering: bool = True,
    keep_global_mean: bool = True,
    zero_clamp: bool = True,
    reduction: str = "mean",
) -> Tensor:
    """STEGO's feature-correlation distillation loss (STEGO eq. 2-4; DepthG eq. 2).

    ``L = - mean_{hw,uv} (F_SC[hw,uv] - b) * max(S[hw,uv], 0)`` where ``F`` is the cosine
    correlation of the frozen features (no gradient) and ``S`` that of the codes.

    Args:
        f_i: ``(B, C, N, M)`` backbone features of image i at the sample locations.
        f_j: ``(B, C, N', M')`` backbone features of image j.
        s_i: ``(B, Q, N, M)`` codes of image i at the same locations as ``f_i``.
        s_j: ``(B, Q, N', M')`` codes of image j.
        b: the bias ("negative pressure") of this pair, dimensionless.
        spatial_centering: subtract ``mean_uv F[hw, uv]`` from ``F`` (STEGO eq. 3).
        keep_global_mean: after centring add back the global mean of ``F``; this is what the
            released STEGO/DepthG code does (not written in eq. 3). Ignored without centring.
        zero_clamp: clamp ``S`` at 0 (STEGO eq. 4); ``False`` gives eq. 2 (no clamp).
        reduction: ``"mean"`` (released code) or ``"sum"`` (as written in the papers).

    Returns:
        Scalar loss tensor; gradients flow into ``s_i`` and ``s_j`` only.

    Raises:
        ValueError: on shape mismatches or an unknown reduction.
    """
    _check_pair(f_i, f_j, "correlation_loss(f)")
    _check_pair(s_i, s_j, "correlation_loss(s)")
    if f_i.shape[2:] != s_i.shape[2:] or f_j.shape[2:] != s_j.shape[2:]:
        raise ValueError(
            "correlation_loss: features and codes must share sample grids, got "
            f"f_i {tuple(f_i.shape)} s_i {tuple(s_i.shape)} f_j {tuple(f_j.shape)} s_j {tuple(s_j.shape)}"
        )
    with torch.no_grad():
        fd = correlation_tensor(_upcast(f_i), _upcast(f_j))
        if spatial_centering:
            global_mean = fd.mean()
            fd = fd - fd.mean(dim=(3, 4), keepdim=True)
            if keep_global_mean:
                fd = fd + global_mean
    cd = correlation_tensor(_upcast(s_i), _upcast(s_j))
    if zero_clamp:
        cd = cd.clamp(min=0.0)
    return _reduce(-(fd - b) * cd, reduction)


def depth_correlation_tensor(d_i: Tensor, d_j: Tensor) -> Tensor:
    """Depth (guidance) correspondence tensor (DepthG eq. 5; multi-channel: fidelity item R19).

    One channel (a depth map): ``D[hw, uv] = d_i[hw] * d_j[uv]`` (eq. 5, unchanged). Several
    channels (MDE features, one-hot class fractions of a segmentation map): ``D[hw, uv] =
    cos(d_i[:, hw], d_j[:, uv])``, the cosine similarity of the per-location guidance vectors, as
    for the feature correlation (eq. 1); a zero vector (e.g. a cell of void pixels) has ``D = 0``
    with everything. This is what the released code's ``depth_correlation(norm(d1), norm(d2))``
    (leonsick/depthg ``src/modules.py``) computes for a multi-channel map; neither the paper nor the
    released code ran the product form on vectors.

    Args:
        d_i: ``(B, C, N, M)`` guidance at the sample locations of image i (``C = 1``: depth in [0, 1]).
        d_j: ``(B, C, N', M')`` guidance at the sample locations of image j.

    Returns:
        ``(B, N, M, N', M')``; in [0, 1] for depth, in [-1, 1] for ``C > 1``.

    Raises:
        ValueError: if the inputs are not 4-D with equal batch and channel sizes.
    """
    if d_i.ndim != 4 or d_j.ndim != 4 or d_i.shape[1] < 1:
        raise ValueError(f"guidance maps must be (B, C, N, M), got {tuple(d_i.shape)} and {tuple(d_j.shape)}")
    _check_pair(d_i, d_j, "depth_correlation_tensor")
    if d_i.shape[1] > 1:
        return correlation_tensor(d_i, d_j)
    return torch.einsum("bchw,bcuv->bhwuv", d_i, d_j)


def depth_feature_correlation_loss(
    d_i: Tensor,
    d_j: Tensor,
    s_i: Tensor,
    s_j: Tensor,
    b: float,
    *,
    kernel: str = "product",
    zero_clamp: bool = True,
    reduction: str = "mean",
) -> Tensor:
    """DepthG's Depth-Feature Correlation loss (DepthG eq. 5-6).

    ``L_DepthG = - mean_{hw,uv} (D[hw,uv] - b_DepthG) * max(S[hw,uv], 0)``.

    Args:
        d_i: with ``kernel="product"``: ``(B, 1, N, M)`` depth in [0, 1] read at the SAME
            locations as ``s_i`` (or ``(B, C, N, M)`` multi-channel guidance, compared by cosine
            similarity: :func:`depth_correlation_tensor`). With ``kernel="released"``: the whole depth map
            ``(B, 1, H, W)`` of the crop (any scale), as the released code passes it.
        d_j: as ``d_i`` for image j.
        s_i: ``(B, Q, N, M)`` codes of image i at the sample locations.
        s_j: ``(B, Q, N', M')`` codes of image j.
        b: the bias ``b_DepthG`` (already scheduled, see :mod:`repro.method.schedules`).
        kernel: ``"product"`` is eq. 5. ``"released"`` reproduces docs/fidelity.md (released
            code, leonsick/depthg): the whole map is resized to the code grid (bilinear,
            ``align_corners=True``) instead of being read at the sample points, and the
            single-channel depth is L2-normalised over channels before the product, so
            ``D = sign(d_i) sign(d_j)`` (1 almost everywhere).
        zero_clamp: clamp ``S`` at 0 (DepthG eq. 6 uses it).
        reduction: ``"mean"`` or ``"sum"``.

    Returns:
        Scalar loss; gradients flow into the codes only.

    Raises:
        ValueError: on an unknown kernel/reduction or mismatched shapes.
    """
    if kernel not in _DEPTH_KERNELS:
        raise ValueError(f"kernel must be one of {_DEPTH_KERNELS}, got {kernel!r}")
    _check_pair(s_i, s_j, "depth_feature_correlation_loss(s)")
    if kernel == "released":
        d_i = F.normalize(F.interpolate(_upcast(d_i), size=s_i.shape[2:], mode="bilinear", align_corners=True), dim=1)
        d_j = F.normalize(F.interpolate(_upcast(d_j), size=s_j.shape[2:], mode="bilinear", align_corners=True), dim=1)
    elif d_i.shape[2:] != s_i.shape[2:] or d_j.shape[2:] != s_j.shape[2:]:
        raise ValueError(
            "depth must be read at the code sample locations: got depth "
            f"{tuple(d_i.shape)}/{tuple(d_j.shape)} for codes {tuple(s_i.shape)}/{tuple(s_j.shape)}"
        )
    with torch.no_grad():
        dd = depth_correlation_tensor(_upcast(d_i), _upcast(d_j))
    cd = correlation_tensor(_upcast(s_i), _upcast(s_j))
    if zero_clamp:
        cd = cd.clamp(min=0.0)
    return _reduce(-(dd - b) * cd, reduction)


def derangement(n: int, *, generator: torch.Generator | None = None, device: torch.device | None = None) -> Tensor:
    """A random permutation of ``range(n)`` without fixed points (STEGO eq. 5: x^rand).

    Built as one random cycle: shuffle the indices, then map each to its successor. Every
    image is paired with exactly one other image and appears exactly once as a partner.

    Args:
        n: batch size, at least 2.
        generator: optional torch generator for reproducibility.
        device: device of the result.

    Returns:
        ``(n,)`` long tensor ``p`` with ``p[k] != k`` for all k.

    Raises:
        ValueError: if ``n < 2`` (a single image has no negative partner).
    """
    if n < 2:
        raise ValueError(f"random negatives need a batch of at least 2 images, got {n}")
    order = torch.randperm(n, generator=generator)
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(-1)
    return perm.to(device) if device is not None else perm


def super_perm(n: int, *, generator: torch.Generator | None = None, device: torch.device | None = None) -> Tensor:
    """STEGO's draw of the random negatives (docs/fidelity.md R10): a permutation with fixed points bumped by one.

    ``p = randperm(n); p[p == arange(n)] += 1; p %= n``. No image is paired with itself, but two images
    can get the same partner (at B = 32 about 63 % of the draws are not permutations, and about one
    image of the batch is then never used as a negative). Source: mhamilton723/STEGO ``src/modules.py``
    ``super_perm``, called by ``ContrastiveCorrelationLoss.forward`` (and DepthG's copy of it).

    Args:
        n: batch size, at least 2.
        generator: optional torch generator (CPU) for reproducibility.
        device: device of the result.

    Returns:
        ``(n,)`` long tensor ``p`` with ``p[k] != k`` for all k.

    Raises:
        ValueError: if ``n < 2``.
    """
    if n < 2:
        raise ValueError(f"random negatives need a batch of at least 2 images, got {n}")
    perm = torch.randperm(n, generator=generator)
    perm[perm == torch.arange(n)] += 1
    perm = perm % n
    return perm.to(device) if device is not None else perm


NEGATIVE_DRAWS = {"derangement": derangement, "super_perm": super_perm}
"""How the random negatives of a batch are drawn: ``loss.negative_perm`` (docs/fidelity.md R10)."""
_NEGATIVE_COORDS = ("own", "knn")


@dataclass(frozen=True)
class LossWeights:
    """The lambda and b hyperparameters of STEGO eq. 5 and DepthG eq. 7 (supplement Table 2)."""

    lambda_self: float
    lambda_knn: float
    lambda_random: float
    b_self: float
    b_knn: float
    b_random: float
    lambda_depthg: float = 0.0
    b_depthg: float = 0.0


@dataclass
class LossTerms:
    """The total loss and every weighted term's unweighted value, for logging."""

    total: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    correlations: dict[str, Tensor] = field(default_factory=dict)


def stego_depthg_loss(
    f: Tensor,
    s: Tensor,
    f_knn: Tensor,
    s_knn: Tensor,
    weights: LossWeights,
    *,
    coords: Tensor | None = None,
    coords_knn: Tensor | None = None,
    depth: Tensor | None = None,
    depth_kernel: str = "product",
    neg_samples: int = 5,
    negative_perm: str = "derangement",
    negative_coords: str = "own",
    negative_perms: Sequence[Tensor] | None = None,
    generator: torch.Generator | None = None,
    spatial_centering: bool = True,
    keep_global_mean: bool = True,
    zero_clamp: bool = True,
    reduction: str = "mean",
    return_correlations: bool = False,
) -> LossTerms:
    """Total training loss ``L_STEGO + lambda_DepthG L_DepthG`` (STEGO eq. 5, DepthG eq. 3 and 7).

    Pairs: *self* (each image with itself at the same sample locations), *knn* (each image
    with its kNN partner, the partner at its own locations) and *random* (each image with
    another image of the batch, ``neg_samples`` draws averaged). The paper reading draws the
    negatives with :func:`derangement` and reads each at its own sample locations; the released
    code (docs/fidelity.md R10) draws them with :func:`super_perm` and reads image ``perm[i]`` at the sample
    locations of image i's kNN partner. The depth term uses the self pair.

    Args:
        f: ``(B, C, H, W)`` backbone feature maps of the images (the correlation target).
        s: ``(B, Q, H, W)`` head codes of the images.
        f_knn: ``(B, C, H, W)`` feature maps of each image's kNN partner.
        s_knn: ``(B, Q, H, W)`` codes of the partners.
        weights: lambdas and biases; ``lambda_depthg``/``b_depthg`` already scheduled.
        coords: ``(B, N, N, 2)`` grid_sample coordinates (x=column, y=row, in [-1, 1]) of
            each image's samples (random or FPS, :mod:`repro.method.sampling`); ``None`` means the
            full feature map (Cityscapes setting, no pointwise sampling).
        coords_knn: the partners' sample coordinates; required iff ``coords`` is given.
        depth: ``(B, 1, H, W)`` depth of the images in [0, 1] pooled to the feature grid
            (DepthG eq. 4); read at ``coords``. ``None`` disables the depth term. With
            ``depth_kernel="released"`` pass the whole crop's depth map instead.
        depth_kernel: see :func:`depth_feature_correlation_loss`.
        neg_samples: number of random-negative draws (STEGO: 5).
        negative_perm: ``"derangement"`` or ``"super_perm"`` (:data:`NEGATIVE_DRAWS`).
        negative_coords: ``"own"`` (the negative's own samples) or ``"knn"`` (read at ``coords_knn``).
        negative_perms: ``neg_samples`` given ``(B,)`` draws instead of drawing them (replaying a
            recorded run); ``None`` draws them with ``generator``.
        generator: torch generator for the negative draws.
        spatial_centering, keep_global_mean, zero_clamp, reduction: see :func:`correlation_loss`.
        return_correlations: also return the code-correlation tensors (for histograms).

    Returns:
        :class:`LossTerms` with ``total`` and unweighted ``terms`` ``self``, ``knn``,
        ``random`` and (if depth is given and ``lambda_depthg != 0``) ``depthg``.

    Raises:
        ValueError: on inconsistent shapes, coordinates given for one side only, an unknown negative
            draw or coordinate choice, or a wrong number of given draws.
    """
    if negative_perm not in NEGATIVE_DRAWS or negative_coords not in _NEGATIVE_COORDS:
        raise ValueError(f"negative_perm must be one of {tuple(NEGATIVE_DRAWS)} and negative_coords one of "
                         f"{_NEGATIVE_COORDS}, got {negative_perm!r}, {negative_coords!r}")
    if negative_perms is not None and len(negative_perms) != neg_samples:
        raise ValueError(f"{len(negative_perms)} negative draws given for neg_samples={neg_samples}")
    if (coords is None) != (coords_knn is None):
        raise ValueError("coords and coords_knn must both be given (sampling) or both be None (full map)")
    if f.shape[0] != f_knn.shape[0] or s.shape[0] != f.shape[0]:
        raise ValueError(f"batch mismatch: f {tuple(f.shape)}, s {tuple(s.shape)}, f_knn {tuple(f_knn.shape)}")
    corr_opts = dict(
        spatial_centering=spatial_centering, keep_global_mean=keep_global_mean, zero_clamp=zero_clamp, reduction=reduction
    )
    f_a, s_a = sample_at(f, coords), sample_at(s, coords)
    f_k, s_k = sample_at(f_knn, coords_knn), sample_at(s_knn, coords_knn)

    terms: dict[str, Tensor] = {
        "self": correlation_loss(f_a, f_a, s_a, s_a, weights.b_self, **corr_opts),
        "knn": correlation_loss(f_a, f_k, s_a, s_k, weights.b_knn, **corr_opts),
    }
    random_terms = []
    for k in range(neg_samples):
        if negative_perms is not None:
            perm = torch.as_tensor(negative_perms[k], dtype=torch.long, device=f.device)
        else:
            perm = NEGATIVE_DRAWS[negative_perm](f.shape[0], generator=generator, device=f.device)
        if negative_coords == "own" or coords is None:  # the anchors' own samples, permuted
            f_n, s_n = f_a[perm], s_a[perm]
        else:  # released: image perm[i] read where image i's kNN partner was sampled
            f_n, s_n = sample_at(f[perm], coords_knn), sample_at(s[perm], coords_knn)
        random_terms.append(correlation_loss(f_a, f_n, s_a, s_n, weights.b_random, **corr_opts))
    terms["random"] = torch.stack(random_terms).mean() if random_terms else s.new_zeros(())

    total = weights.lambda_self * terms["self"] + weights.lambda_knn * terms["knn"] + weights.lambda_random * terms["random"]
    if depth is not None and weights.lambda_depthg != 0.0:
        d_a = depth if depth_kernel == "released" else sample_at(depth, coords)
        terms["depthg"] = depth_feature_correlation_loss(
            d_a, d_a, s_a, s_a, weights.b_depthg, kernel=depth_kernel, zero_clamp=zero_clamp, reduction=reduction
        )
        total = total + weights.lambda_depthg * terms["depthg"]

    correlations: dict[str, Tensor] = {}
    if return_correlations:
        with torch.no_grad():
            correlations = {"self": correlation_tensor(s_a, s_a), "knn": correlation_tensor(s_a, s_k)}
    return LossTerms(total=total, terms=terms, correlations=correlations)
