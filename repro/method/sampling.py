"""Where to read feature maps: random (STEGO) and depth-guided FPS (DepthG) sampling.

STEGO (ICLR 2022, sec. 3) reads ``N x N`` feature vectors per image with ``grid_sample`` at
uniformly random locations. DepthG (CVPR 2024, sec. 3.4) back-projects the depth map
(pooled to the feature resolution, eq. 4) to a point cloud and picks the locations by 3D
farthest point sampling (FPS), so samples concentrate at sharp depth changes (supp. B.5).

``coords`` are ``(B, n, m, 2)`` in ``[-1, 1]``, last dim ``(x = column, y = row)``; with
``align_corners=True`` cell ``(r, c)`` of an ``H x W`` map is at ``(2c/(W-1) - 1, 2r/(H-1) - 1)``.
Variant ``"paper"`` / order ``"xy"`` is the method as described; ``"released"`` mirrors
the public DepthG code (``tan`` of degrees-as-radians, ``Z = -5 z``, FPS from index 0,
row-major pick order, ``(row, col)`` fed to grid_sample's ``(x, y)`` slots).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "sample_at",
    "random_grid_coords",
    "cell_coords",
    "depth_to_points",
    "farthest_point_sampling",
    "fps_grid_coords",
    "pool_depth",
    "guidance_points",
]

_VARIANTS = ("paper", "released")
_ORDERS = ("xy", "released")
_RELEASED_FAR = 5.0  # the released code multiplies only Z by this "far" constant


def _check_depth(depth: Tensor, name: str = "depth") -> None:
    if not isinstance(depth, Tensor) or depth.ndim != 4 or depth.shape[1] != 1:
        shape = tuple(depth.shape) if isinstance(depth, Tensor) else type(depth).__name__
        raise ValueError(f"{name} must be a (B, 1, H, W) tensor, got shape {shape}")


def sample_at(t: Tensor, coords: Tensor | None) -> Tensor:
    """Bilinearly read a feature map at normalised coordinates (STEGO sec. 3).

    Args:
        t: Feature map, shape ``(B, C, H, W)``, floating dtype.
        coords: Sampling locations, shape ``(B, n, m, 2)`` in ``[-1, 1]``, last dim
            ``(x = column, y = row)``; cast to ``t.dtype``. ``None`` selects the
            "full feature map" mode (no pointwise sampling, e.g. Cityscapes).

    Returns:
        ``(B, C, n, m)`` values from ``grid_sample(mode="bilinear",
        padding_mode="border", align_corners=True)``, or ``t`` itself when ``coords``
        is ``None``.

    Raises:
        ValueError: If ``t`` is not 4-D, or ``coords`` is not ``(B, n, m, 2)`` with the
            same batch size as ``t``.
    """
    if t.ndim != 4:
        raise ValueError(f"t must be a (B, C, H, W) tensor, got shape {tuple(t.shape)}")
    if coords is None:
        return t
    if coords.ndim != 4 or coords.shape[-1] != 2 or coords.shape[0] != t.shape[0]:
        raise ValueError(
            f"coords must have shape (B={t.shape[0]}, n, m, 2), got {tuple(coords.shape)}"
        )
    return F.grid_sample(
        t, coords.to(dtype=t.dtype), mode="bilinear", padding_mode="border", align_corners=True
    )


def random_grid_coords(
    batch: int,
    n_side: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Uniformly random sampling coordinates, STEGO's default sampling (sec. 3).

    Args:
        batch: Batch size ``B`` (>= 1).
        n_side: Samples per side ``N`` (>= 1); ``N * N`` locations per image.
        generator: Optional RNG; numbers are drawn on its device, then moved to ``device``.
        device: Output device (default: the generator's device, else the CPU).
        dtype: Floating output dtype.

    Returns:
        ``(B, N, N, 2)`` coordinates, i.i.d. uniform in ``[-1, 1)``, last dim ``(x, y)``.

    Raises:
        ValueError: If ``batch`` or ``n_side`` is smaller than 1.
    """
    if batch < 1 or n_side < 1:
        raise ValueError(f"batch and n_side must be >= 1, got batch={batch}, n_side={n_side}")
    draw_device = generator.device if generator is not None else device
    u = torch.rand(batch, n_side, n_side, 2, generator=generator, device=draw_device, dtype=dtype)
    if device is not None:
        u = u.to(device)
    return u * 2 - 1


def cell_coords(
    rows: Tensor, cols: Tensor, height: int, width: int, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Normalised coordinates that hit cells exactly with ``align_corners=True``.

    Args:
        rows: Integer row indices in ``[0, height)``, any shape ``S``.
        cols: Integer column indices in ``[0, width)``, same shape ``S`` (broadcastable).
        height: Map height ``H`` (>= 1); ``H == 1`` maps every row to ``y = 0``.
        width: Map width ``W`` (>= 1); ``W == 1`` maps every column to ``x = 0``.
        dtype: Floating output dtype.

    Returns:
        ``(*S, 2)`` coordinates on ``rows.device``, last dim ``(x, y)`` with
        ``x = 2 c / (W - 1) - 1`` and ``y = 2 r / (H - 1) - 1``.

    Raises:
        ValueError: If ``height`` or ``width`` is smaller than 1.
    """
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1, got {height}x{width}")

    def norm(i: Tensor, size: int) -> Tensor:
        i = i.to(dtype)
        return torch.zeros_like(i) if size == 1 else i * (2.0 / (size - 1)) - 1.0

    x, y = torch.broadcast_tensors(norm(cols, width), norm(rows, height))
    return torch.stack((x, y), dim=-1)


def depth_to_points(depth: Tensor, *, fov_deg: float = 90.0, variant: str = "paper") -> Tensor:
    """Back-project a depth map to one 3D point per cell (DepthG sec. 3.4).

    ``"paper"``: pinhole camera with cell centres ``u = col + 0.5``, ``v = row + 0.5``,
    principal point ``(W/2, H/2)`` and focal length ``f = W / (2 tan(fov/2))`` (``fov``
    in degrees, square pixels): ``X = (u - cx) z / f``, ``Y = (v - cy) z / f``, ``Z = z``.

    ``"released"``: the public DepthG code, with ``fov_deg`` passed to ``tan`` as if it
    were radians: ``k = 2 tan(fov_deg / 2)`` (``~3.2396`` for 90),
    ``X = k z (col - W/2) / W``, ``Y = k z (row - H/2) / H``, ``Z = -5 z``.

    Args:
        depth: Normalised depth, shape ``(B, 1, H, W)``, floating dtype, values in
            ``[0, 1]`` (relative units).
        fov_deg: Horizontal field of view in degrees (``"paper"``: ``0 < fov < 180``).
        variant: ``"paper"`` or ``"released"``.

    Returns:
        ``(B, H * W, 3)`` points ``(X, Y, Z)`` in row-major cell order, same dtype and
        device as ``depth``.

    Raises:
        ValueError: If ``depth`` is not ``(B, 1, H, W)``, ``variant`` is unknown, or
            ``fov_deg`` is out of range for ``"paper"``.
    """
    _check_depth(depth)
    if variant not in _VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {_VARIANTS}")
    b, _, h, w = depth.shape
    z = depth.reshape(b, h, w)
    rows = torch.arange(h, device=depth.device, dtype=depth.dtype).view(1, h, 1)
    cols = torch.arange(w, device=depth.device, dtype=depth.dtype).view(1, 1, w)
    if variant == "paper":
        if not 0.0 < fov_deg < 180.0:
            raise ValueError(f"fov_deg must be in (0, 180) degrees, got {fov_deg}")
        f = w / (2.0 * math.tan(math.radians(fov_deg) / 2.0))
        x = (cols + 0.5 - w / 2.0) * z / f
        y = (rows + 0.5 - h / 2.0) * z / f
        zz = z
    else:
        k = 2.0 * math.tan(fov_deg / 2.0)  # deliberately radians, as in the released code
        x = k * z * (cols - w / 2.0) / w
        y = k * z * (rows - h / 2.0) / h
        zz = -_RELEASED_FAR * z
    return torch.stack((x, y, zz), dim=-1).reshape(b, h * w, 3)


def farthest_point_sampling(
    points: Tensor,
    n: int,
    *,
    start: int | Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Batched farthest point sampling (DepthG sec. 3.4; Eldar et al. 1997).

    Keeps a running squared distance ``(B, P)`` from every point to the picked set; the
    next pick is its argmax (ties -> lowest index). Picked entries are set to ``-1`` so
    that no index is picked twice, even among duplicate points. The only Python loop is
    over the ``n`` picks.

    Args:
        points: Point clouds, shape ``(B, P, 3)`` (any trailing coordinate count works),
            floating dtype; distances are computed in this dtype on its device.
        n: Number of picks, ``1 <= n <= P``.
        start: First pick: ``None`` -> a random index per batch item drawn from
            ``generator``; ``int`` -> the same index for all items; ``LongTensor (B,)``
            -> one index per item.
        generator: RNG for ``start=None``.

    Returns:
        ``(B, n)`` int64 indices into ``P``, in pick order, on ``points.device``.

    Raises:
        ValueError: If ``points`` is not 3-D, ``n`` is outside ``[1, P]``, or ``start``
            has the wrong shape or is out of ``[0, P)``.
    """
    if points.ndim != 3:
        raise ValueError(f"points must be a (B, P, 3) tensor, got shape {tuple(points.shape)}")
    b, p, _ = points.shape
    if not 1 <= n <= p:
        raise ValueError(f"n must be in [1, P={p}], got n={n}")
    device = points.device
    if start is None:
        gen_device = generator.device if generator is not None else device
        cur = torch.randint(p, (b,), generator=generator, device=gen_device).to(device)
    elif isinstance(start, Tensor):
        if start.shape != (b,):
            raise ValueError(f"start tensor must have shape (B={b},), got {tuple(start.shape)}")
        cur = start.to(device=device, dtype=torch.long)
        if bool(((cur < 0) | (cur >= p)).any()):
            raise ValueError(f"start indices must be in [0, {p})")
    else:
        if not 0 <= int(start) < p:
            raise ValueError(f"start must be in [0, {p}), got {start}")
        cur = torch.full((b,), int(start), device=device, dtype=torch.long)

    idx = torch.empty(b, n, device=device, dtype=torch.long)
    min_d = torch.full((b, p), math.inf, device=device, dtype=points.dtype)
    gather_idx = cur.view(b, 1, 1).expand(b, 1, points.shape[2])
    for i in range(n):
        idx[:, i] = cur
        picked = points.gather(1, gather_idx)  # (B, 1, 3)
        d = (points - picked).square().sum(-1)  # (B, P)
        torch.minimum(min_d, d, out=min_d)
        min_d.scatter_(1, cur.view(b, 1), -1.0)
        cur = min_d.argmax(dim=1)
        gather_idx = cur.view(b, 1, 1).expand(b, 1, points.shape[2])
    return idx


def guidance_points(guidance: Tensor, *, fov_deg: float = 90.0) -> Tensor:
    """FPS points of a multi-channel guidance map (MDE features, class fractions; fidelity item R20).

    A depth map is back-projected (:func:`depth_to_points`); a ``C > 1`` map has no depth to
    back-project, so each cell becomes the point ``(X, Y, g_hat)``: ``X = (u - cx) / f``,
    ``Y = (v - cy) / f`` are the ``"paper"`` pinhole ray of the cell at unit depth (``f = W / (2
    tan(fov / 2))``, cell centres ``u = col + 0.5``, ``v = row + 0.5``), and ``g_hat = g / ||g||`` the
    L2-normalised guidance vector (a zero vector stays zero). Squared distances are then the 2D
    image-plane distance plus ``2 - 2 cos``, the cosine distance the guidance correlation uses
    (:func:`repro.method.losses.depth_correlation_tensor`): FPS spreads samples over guidance space and,
    within equal guidance (one class), over the image, as 3D FPS on an image plane does.

    Args:
        guidance: ``(B, C, H, W)`` guidance pooled to the feature grid, ``C > 1``, floating dtype.
        fov_deg: horizontal field of view in degrees, ``0 < fov < 180``.

    Returns:
        ``(B, H * W, 2 + C)`` points in row-major cell order, dtype and device of ``guidance``.

    Raises:
        ValueError: if ``guidance`` is not 4-D with ``C > 1`` or ``fov_deg`` is out of range.
    """
    if not isinstance(guidance, Tensor) or guidance.ndim != 4 or guidance.shape[1] < 2:
        shape = tuple(guidance.shape) if isinstance(guidance, Tensor) else type(guidance).__name__
        raise ValueError(f"multi-channel guidance must be a (B, C > 1, H, W) tensor, got {shape}")
    if not 0.0 < fov_deg < 180.0:
        raise ValueError(f"fov_deg must be in (0, 180) degrees, got {fov_deg}")
    b, c, h, w = guidance.shape
    f = w / (2.0 * math.tan(math.radians(fov_deg) / 2.0))
    rows = torch.arange(h, device=guidance.device, dtype=guidance.dtype)
    cols = torch.arange(w, device=guidance.device, dtype=guidance.dtype)
    y, x = torch.meshgrid((rows + 0.5 - h / 2.0) / f, (cols + 0.5 - w / 2.0) / f, indexing="ij")
    xy = torch.stack((x, y), dim=-1).reshape(1, h * w, 2).expand(b, h * w, 2)
    unit = F.normalize(guidance, dim=1).permute(0, 2, 3, 1).reshape(b, h * w, c)
    return torch.cat((xy, unit), dim=-1)


def fps_grid_coords(
    depth: Tensor,
    n_side: int,
    *,
    order: str = "xy",
    start: int | Tensor | None = None,
    generator: torch.Generator | None = None,
    fov_deg: float = 90.0,
) -> Tensor:
    """Depth-guided sampling coordinates by 3D farthest point sampling (DepthG sec. 3.4).

    ``order="xy"`` (paper): points from ``depth_to_points(variant="paper")``, ``N**2``
    FPS picks from ``start``, each read back exactly at its own cell, in pick order.

    ``order="released"``: points from ``depth_to_points(variant="released")``, FPS from
    index 0 (``start`` and ``generator`` are ignored), picks in ascending row-major order
    (the released code's mask + ``nonzero()``), and coordinates
    ``(2 row / H - 1, 2 col / W - 1)`` placed in grid_sample's ``(x, y)`` slots, i.e.
    transposed and not aligned with cell centres.

    A multi-channel guidance map ``(B, C > 1, H, W)`` (MDE features, class fractions) is sampled
    by FPS over :func:`guidance_points` instead of the back-projected depth (both orders; R20).

    Args:
        depth: Depth pooled to the feature resolution, ``(B, 1, H, W)``, values in
            ``[0, 1]``, or ``(B, C, H, W)`` multi-channel guidance; output dtype/device follow it.
        n_side: Samples per side ``N``; needs ``1 <= N**2 <= H * W``.
        order: ``"xy"`` or ``"released"``.
        start: First FPS pick (see :func:`farthest_point_sampling`), ``"xy"`` only.
        generator: RNG for a random start, ``"xy"`` only.
        fov_deg: Field of view passed to :func:`depth_to_points`.

    Returns:
        ``(B, N, N, 2)`` coordinates for :func:`sample_at`.

    Raises:
        ValueError: If ``depth`` is not ``(B, 1, H, W)``, ``order`` is unknown,
            ``n_side < 1`` or ``N**2 > H * W``.
    """
    multi = isinstance(depth, Tensor) and depth.ndim == 4 and depth.shape[1] > 1
    if not multi:
        _check_depth(depth)
    if order not in _ORDERS:
        raise ValueError(f"unknown order {order!r}; expected one of {_ORDERS}")
    b, _, h, w = depth.shape
    if n_side < 1 or n_side * n_side > h * w:
        raise ValueError(f"n_side**2 must be in [1, H*W={h * w}], got n_side={n_side}")
    n = n_side * n_side
    if order == "xy":
        pts = guidance_points(depth, fov_deg=fov_deg) if multi else depth_to_points(depth, fov_deg=fov_deg)
        idx = farthest_point_sampling(pts, n, start=start, generator=generator)
        coords = cell_coords(idx // w, idx % w, h, w, dtype=depth.dtype)
    else:
        pts = (guidance_points(depth, fov_deg=fov_deg) if multi
               else depth_to_points(depth, fov_deg=fov_deg, variant="released"))
        idx = farthest_point_sampling(pts, n, start=0).sort(dim=1).values
        rows = (idx // w).to(depth.dtype)
        cols = (idx % w).to(depth.dtype)
        coords = torch.stack((rows / h * 2 - 1, cols / w * 2 - 1), dim=-1)
    return coords.reshape(b, n_side, n_side, 2)


def pool_depth(depth: Tensor, size: tuple[int, int]) -> Tensor:
    """Average-pool a depth map to the feature resolution (DepthG eq. 4).

    Args:
        depth: Depth map, shape ``(B, 1, Hd, Wd)``, floating dtype, values in ``[0, 1]``.
        size: Target ``(H, W)``, e.g. the ``28 x 28`` DINO patch grid; both >= 1.

    Returns:
        ``(B, 1, H, W)`` adaptive-average-pooled depth, same dtype and device.

    Raises:
        ValueError: If ``depth`` is not ``(B, 1, Hd, Wd)`` or ``size`` is not two
            positive integers.
    """
    _check_depth(depth)
    if len(size) != 2 or any(int(s) < 1 for s in size):
        raise ValueError(f"size must be two positive ints (H, W), got {size}")
    return F.adaptive_avg_pool2d(depth, (int(size[0]), int(size[1])))
