"""Tests for repro.method.sampling: random / depth-guided FPS sampling (STEGO sec. 3, DepthG sec. 3.4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from repro.method.sampling import (
    cell_coords,
    depth_to_points,
    farthest_point_sampling,
    fps_grid_coords,
    pool_depth,
    random_grid_coords,
    sample_at,
)


def naive_fps(points: np.ndarray, n: int, start: int) -> list[int]:
    """Textbook farthest point sampling on one (P, 3) cloud; ties -> lowest index."""
    p = points.shape[0]
    picked = [start]
    dist = np.full(p, np.inf)
    while len(picked) < n:
        last = points[picked[-1]]
        for j in range(p):
            d = float(((points[j] - last) ** 2).sum())
            if d < dist[j]:
                dist[j] = d
        best, best_d = -1, -1.0
        for j in range(p):
            if j not in picked and dist[j] > best_d:
                best, best_d = j, dist[j]
        picked.append(best)
    return picked


def index_map(b: int, h: int, w: int) -> torch.Tensor:
    """(B, 1, H, W) float64 map whose value at (r, c) is the flat index r * W + c."""
    return torch.arange(h * w, dtype=torch.float64).view(1, 1, h, w).expand(b, 1, h, w)


# ---------------------------------------------------------------- farthest point sampling


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("num_points,n", [(40, 12), (97, 30)])
def test_fps_matches_naive_reference(seed: int, batch: int, num_points: int, n: int) -> None:
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(batch, num_points, 3, generator=g, dtype=torch.float64)
    starts = torch.randint(num_points, (batch,), generator=g)
    got = farthest_point_sampling(pts, n, start=starts)
    assert got.shape == (batch, n) and got.dtype == torch.long
    for i in range(batch):
        assert got[i].tolist() == naive_fps(pts[i].numpy(), n, int(starts[i]))
    # A fixed int start is the same for every item.
    got0 = farthest_point_sampling(pts, n, start=5)
    for i in range(batch):
        assert got0[i].tolist() == naive_fps(pts[i].numpy(), n, 5)


def test_fps_batched_equals_per_item_and_random_start_is_seeded() -> None:
    g = torch.Generator().manual_seed(7)
    pts = torch.randn(5, 200, 3, generator=g)
    idx_a = farthest_point_sampling(pts, 50, generator=torch.Generator().manual_seed(3))
    idx_b = farthest_point_sampling(pts, 50, generator=torch.Generator().manual_seed(3))
    assert torch.equal(idx_a, idx_b)
    assert len(set(idx_a[:, 0].tolist())) > 1  # random starts differ across the batch
    for i in range(5):
        single = farthest_point_sampling(pts[i : i + 1], 50, start=int(idx_a[i, 0]))
        assert torch.equal(single[0], idx_a[i])


def test_fps_no_duplicates_even_with_duplicate_points() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.rand(2, 10, 3, generator=g)
    pts = torch.cat([base, base, base, torch.zeros(2, 5, 3)], dim=1)  # P = 35, many copies
    idx = farthest_point_sampling(pts, 35, start=0)
    for row in idx:
        assert sorted(row.tolist()) == list(range(35))  # n == P: a permutation
    # All-identical cloud: every distance is 0, picks must still be distinct.
    same = torch.ones(3, 16, 3)
    idx = farthest_point_sampling(same, 16, start=torch.tensor([0, 5, 15]))
    for row in idx:
        assert sorted(row.tolist()) == list(range(16))
    assert idx[1].tolist() == [5, 0, 1, 2, 3, 4] + list(range(6, 16))  # ties -> lowest index


@pytest.mark.parametrize("n", [0, -1, 21])
def test_fps_bad_n_raises(n: int) -> None:
    with pytest.raises(ValueError, match="n must be in"):
        farthest_point_sampling(torch.rand(2, 20, 3), n, start=0)


def test_fps_bad_input_raises() -> None:
    with pytest.raises(ValueError, match=r"\(B, P, 3\)"):
        farthest_point_sampling(torch.rand(20, 3), 4)
    with pytest.raises(ValueError, match="start must be in"):
        farthest_point_sampling(torch.rand(2, 20, 3), 4, start=20)
    with pytest.raises(ValueError, match="shape"):
        farthest_point_sampling(torch.rand(2, 20, 3), 4, start=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="start indices"):
        farthest_point_sampling(torch.rand(2, 20, 3), 4, start=torch.tensor([1, -1]))


# ------------------------------------------------------------- concentration at a depth edge


def test_fps_concentrates_on_sharp_depth_change() -> None:
    """Supplement B.5: samples concentrate where depth changes sharply.

    Near plateau (0.2) on the left, a sigmoid ramp ~4 cells wide around column 20.5, far
    plateau (1.0) on the right. The band is where the ramp is between 5% and 95%.
    """
    h = w = 28
    n_side, batch = 9, 16
    cols = torch.arange(w, dtype=torch.float32)
    ramp = torch.sigmoid((cols - 20.5) / 0.7)
    depth = (0.2 + 0.8 * ramp).view(1, 1, 1, w).expand(batch, 1, h, w).contiguous()
    band = (ramp > 0.05) & (ramp < 0.95)
    area = band.float().mean().item()
    assert 3 <= int(band.sum()) <= 5  # "a few cells wide"

    def band_fraction(coords: torch.Tensor) -> torch.Tensor:
        col = sample_at(index_map(batch, h, w), coords.double()).round().long() % w
        return band[col].float().flatten(1).mean(1)  # (B,)

    g = torch.Generator().manual_seed(0)
    fps_paper = band_fraction(fps_grid_coords(depth, n_side, generator=g))
    rel = fps_grid_coords(depth, n_side, order="released")  # (x, y) = (row, col) slots
    rel_col = ((rel[..., 1] + 1) / 2 * w).round().long()
    fps_released = band[rel_col].float().flatten(1).mean(1)
    flat = torch.full_like(depth, 0.6)
    fps_flat = band_fraction(fps_grid_coords(flat, n_side, generator=g))
    perm = torch.stack([torch.randperm(h * w, generator=g)[: n_side**2] for _ in range(batch)])
    rand_frac = band[perm % w].float().mean(1)
    print(
        f"\nramp band area fraction {area:.3f}; FPS(paper) picks in band "
        f"min {fps_paper.min():.3f} mean {fps_paper.mean():.3f}; FPS(released) "
        f"{fps_released.mean():.3f}; FPS on flat depth {fps_flat.mean():.3f}; "
        f"random cells {rand_frac.mean():.3f}"
    )
    assert fps_paper.min() > 2 * area  # every random start
    assert fps_released.min() > 2 * area
    assert abs(fps_flat.mean() - area) < 0.5 * area  # control: no depth edge, no concentration
    assert abs(rand_frac.mean() - area) < 0.3 * area


# ---------------------------------------------------------------- coordinates / transposition


@pytest.mark.parametrize("start", [0, 17, "tensor", None])
def test_fps_grid_coords_xy_reads_back_the_picked_cells(start) -> None:
    b, h, w, n_side = 3, 12, 20, 7
    g = torch.Generator().manual_seed(1)
    depth = torch.rand(b, 1, h, w, generator=g, dtype=torch.float64)
    if start == "tensor":
        start = torch.tensor([0, 100, 239])
    coords = fps_grid_coords(depth, n_side, start=start, generator=torch.Generator().manual_seed(4))
    assert coords.shape == (b, n_side, n_side, 2) and coords.dtype == torch.float64
    picks = farthest_point_sampling(
        depth_to_points(depth), n_side**2, start=start, generator=torch.Generator().manual_seed(4)
    )
    read = sample_at(index_map(b, h, w), coords).reshape(b, -1)
    torch.testing.assert_close(read, picks.double(), atol=1e-9, rtol=0)
    assert torch.equal(read.round().long(), picks)


def test_fps_grid_coords_released_is_sorted_and_transposed() -> None:
    b, h, w, n_side = 2, 12, 20, 7
    depth = torch.rand(b, 1, h, w, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    coords = fps_grid_coords(depth, n_side, order="released", start=99)  # start is ignored
    picks = farthest_point_sampling(depth_to_points(depth, variant="released"), n_side**2, start=0)
    picks = picks.sort(dim=1).values
    rows, cols = (picks // w).double(), (picks % w).double()
    expected = torch.stack((2 * rows / h - 1, 2 * cols / w - 1), dim=-1)
    torch.testing.assert_close(coords.reshape(b, -1, 2), expected, atol=1e-12, rtol=0)

    # grid_sample puts x on the column axis: the read lands at row' = col (H-1)/W and
    # col' = row (W-1)/H. The index map is linear in (r, c), so bilinear reading is exact.
    read = sample_at(index_map(b, h, w), coords).reshape(b, -1)
    torch.testing.assert_close(read, cols * (h - 1) + rows * (w - 1) / h, atol=1e-9, rtol=0)
    hit = (read - picks.double()).abs() < 1e-6
    assert hit.float().mean() < 0.1  # the transposed read misses the picked cells

    # Swapping (x, y) back gives (col / W, row / H) in [0, 1): within one cell of the pick,
    # and exactly on it after rescaling by size / (size - 1).
    unit = (coords.flip(-1) + 1) / 2
    pos = unit * torch.tensor([w - 1, h - 1], dtype=torch.float64)
    true = torch.stack((cols, rows), -1).reshape(b, n_side, n_side, 2)
    assert ((pos - true).abs() < 1).all()
    assert not torch.allclose(pos, true)
    fixed = unit * torch.tensor([w / (w - 1), h / (h - 1)], dtype=torch.float64) * 2 - 1
    read_fixed = sample_at(index_map(b, h, w), fixed).reshape(b, -1)
    assert torch.equal(read_fixed.round().long(), picks)
    torch.testing.assert_close(read_fixed, picks.double(), atol=1e-9, rtol=0)


def test_fps_grid_coords_bad_input_raises() -> None:
    depth = torch.rand(1, 1, 5, 5)
    with pytest.raises(ValueError, match="unknown order"):
        fps_grid_coords(depth, 3, order="yx")
    with pytest.raises(ValueError, match="n_side"):
        fps_grid_coords(depth, 6)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        fps_grid_coords(torch.rand(1, 5, 5), 2)  # (C > 1 channels are guidance vectors: test_guidance_sources.py)


# ---------------------------------------------------------------------- back-projection


def test_depth_to_points_paper_constant_depth_is_a_centred_plane() -> None:
    h, w, z = 6, 8, 0.5
    pts = depth_to_points(torch.full((2, 1, h, w), z, dtype=torch.float64)).view(2, h, w, 3)
    assert pts.shape == (2, h, w, 3)
    torch.testing.assert_close(pts[..., 2], torch.full((2, h, w), z, dtype=torch.float64))
    torch.testing.assert_close(pts[..., 0], -pts[..., 0].flip(2))  # symmetric in X
    torch.testing.assert_close(pts[..., 1], -pts[..., 1].flip(1))  # symmetric in Y
    # fov 90 deg: f = W / 2, so the rightmost cell centre sits at z (W/2 - 0.5) / (W/2).
    assert pts[..., 0].max().item() == pytest.approx(z * (w / 2 - 0.5) / (w / 2))
    assert pts[..., 0].min().item() == pytest.approx(-z * (w / 2 - 0.5) / (w / 2))
    assert (pts[0, :, 1:, 0] > pts[0, :, :-1, 0]).all()  # X grows with the column
    assert (pts[0, 1:, :, 1] > pts[0, :-1, :, 1]).all()  # Y grows with the row


def test_depth_to_points_paper_pinhole_formula() -> None:
    h, w, r, c, fov = 5, 9, 3, 7, 60.0
    depth = torch.rand(2, 1, h, w, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pts = depth_to_points(depth, fov_deg=fov)
    assert pts.shape == (2, h * w, 3) and pts.dtype == torch.float64
    z = depth[1, 0, r, c].item()
    f = w / (2 * math.tan(math.radians(fov) / 2))
    expected = [(c + 0.5 - w / 2) * z / f, (r + 0.5 - h / 2) * z / f, z]
    assert pts[1, r * w + c].tolist() == pytest.approx(expected)


def test_depth_to_points_released_formula() -> None:
    h, w, r, c = 5, 9, 3, 7
    depth = torch.rand(1, 1, h, w, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pts = depth_to_points(depth, variant="released")
    z = depth[0, 0, r, c].item()
    k = 2 * math.tan(45.0)  # 90 "degrees" halved and fed to tan as radians
    assert k == pytest.approx(3.2396, abs=1e-4)
    expected = [k * z * (c - w / 2) / w, k * z * (r - h / 2) / h, -5 * z]
    assert pts[0, r * w + c].tolist() == pytest.approx(expected)


def test_depth_to_points_bad_input_raises() -> None:
    with pytest.raises(ValueError, match="unknown variant"):
        depth_to_points(torch.rand(1, 1, 4, 4), variant="ideal")
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        depth_to_points(torch.rand(1, 4, 4))
    with pytest.raises(ValueError, match="fov_deg"):
        depth_to_points(torch.rand(1, 1, 4, 4), fov_deg=180.0)


# ---------------------------------------------------------------- random coords / sample_at


def test_random_grid_coords_shape_range_and_seed() -> None:
    a = random_grid_coords(4, 11, generator=torch.Generator().manual_seed(5))
    b = random_grid_coords(4, 11, generator=torch.Generator().manual_seed(5))
    c = random_grid_coords(4, 11, generator=torch.Generator().manual_seed(6))
    assert a.shape == (4, 11, 11, 2) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
    assert a.min() < -0.9 and a.max() > 0.9  # spans the range
    assert random_grid_coords(1, 2, dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="n_side"):
        random_grid_coords(2, 0)


def test_sample_at_none_and_exact_cells() -> None:
    t = torch.randn(2, 3, 5, 7)
    assert sample_at(t, None) is t
    rows = torch.tensor([[0, 4, 2], [1, 3, 4]]).expand(2, 2, 3)
    cols = torch.tensor([[6, 0, 3], [5, 1, 6]]).expand(2, 2, 3)
    out = sample_at(t, cell_coords(rows, cols, 5, 7))
    assert out.shape == (2, 3, 2, 3)
    torch.testing.assert_close(out, t[:, :, rows[0], cols[0]], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="coords"):
        sample_at(t, torch.zeros(3, 2, 2, 2))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        sample_at(t[0], torch.zeros(2, 2, 2, 2))


def test_cell_coords_values_and_degenerate_sizes() -> None:
    xy = cell_coords(torch.tensor([0, 3]), torch.tensor([0, 4]), 4, 5)
    torch.testing.assert_close(xy, torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))
    xy = cell_coords(torch.tensor([0]), torch.tensor([2]), 1, 5)  # H == 1 -> y = 0
    torch.testing.assert_close(xy, torch.tensor([[0.0, 0.0]]))
    t = torch.arange(5.0).view(1, 1, 1, 5)
    rows, cols = torch.zeros(1, 1, 5, dtype=torch.long), torch.arange(5).view(1, 1, 5)
    out = sample_at(t, cell_coords(rows, cols, 1, 5))
    torch.testing.assert_close(out.flatten(), torch.arange(5.0))
    with pytest.raises(ValueError, match="height and width"):
        cell_coords(torch.tensor([0]), torch.tensor([0]), 0, 5)


def test_pool_depth_block_means() -> None:
    depth = torch.rand(2, 1, 8, 12, generator=torch.Generator().manual_seed(0))
    pooled = pool_depth(depth, (4, 3))
    assert pooled.shape == (2, 1, 4, 3)
    torch.testing.assert_close(pooled, depth.view(2, 1, 4, 2, 3, 4).mean(dim=(3, 5)))
    with pytest.raises(ValueError, match="size"):
        pool_depth(depth, (0, 3))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        pool_depth(depth[:, 0], (4, 3))
