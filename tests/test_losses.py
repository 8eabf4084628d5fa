"""Losses against direct, loop-based re-computations of the papers' equations (values and gradients)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from repro.method.losses import (
    LossWeights,
    correlation_loss,
    depth_feature_correlation_loss,
    derangement,
    stego_depthg_loss,
)
from repro.method.sampling import random_grid_coords, sample_at



@pytest.fixture(autouse=True)
def float64_default():
    """The equation checks run in float64 so that 1e-10 tolerances are meaningful."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum() / (a.norm() * b.norm())


def loop_correlation_loss(f_i, f_j, s_i, s_j, b, *, sc=True, keep_mean=True, clamp=True):
    """STEGO eq. 1-4 written out entry by entry (mean instead of sum, see repro.method.losses).

    ``keep_mean`` adds the global mean of F (over the whole batch) back after centring,
    as the released code does.
    """
    batch, _, n, m = f_i.shape
    n2, m2 = f_j.shape[2:]
    entries = list(itertools.product(range(batch), range(n), range(m), range(n2), range(m2)))
    fd = {e: cos(f_i[e[0], :, e[1], e[2]], f_j[e[0], :, e[3], e[4]]).detach() for e in entries}
    global_mean = sum(fd.values()) / len(entries)
    total = 0.0
    for k, h, w, u, v in entries:
        target = fd[k, h, w, u, v]
        if sc:
            row_mean = sum(fd[k, h, w, u2, v2] for u2 in range(n2) for v2 in range(m2)) / (n2 * m2)
            target = target - row_mean + (global_mean if keep_mean else 0.0)
        s_cos = cos(s_i[k, :, h, w], s_j[k, :, u, v])
        if clamp:
            s_cos = torch.clamp(s_cos, min=0.0)
        total = total - (target - b) * s_cos
    return total / len(entries)


def loop_depth_loss(d_i, d_j, s_i, s_j, b):
    """DepthG eq. 5-6 written out: D = d_i[hw] d_j[uv], zero-clamped code correlation."""
    batch, _, n, m = s_i.shape
    n2, m2 = s_j.shape[2:]
    entries = list(itertools.product(range(batch), range(n), range(m), range(n2), range(m2)))
    total = 0.0
    for k, h, w, u, v in entries:
        dd = d_i[k, 0, h, w] * d_j[k, 0, u, v]
        total = total - (dd - b) * torch.clamp(cos(s_i[k, :, h, w], s_j[k, :, u, v]), min=0.0)
    return total / len(entries)


def make(seed, batch=2, c=5, q=4, n=3, m=3, n2=None, m2=None):
    g = torch.Generator().manual_seed(seed)
    n2, m2 = n2 or n, m2 or m
    f_i, f_j = torch.randn(batch, c, n, m, generator=g), torch.randn(batch, c, n2, m2, generator=g)
    s_i = torch.randn(batch, q, n, m, generator=g, requires_grad=True)
    s_j = torch.randn(batch, q, n2, m2, generator=g, requires_grad=True)
    return f_i, f_j, s_i, s_j


@pytest.mark.parametrize(
    "sc,keep_mean,clamp", [(True, True, True), (True, False, True), (False, False, True), (True, True, False)]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_correlation_loss_matches_equation(seed, sc, keep_mean, clamp):
    f_i, f_j, s_i, s_j = make(seed, n2=2, m2=4)
    b = 0.23
    ours = correlation_loss(f_i, f_j, s_i, s_j, b, spatial_centering=sc, keep_global_mean=keep_mean, zero_clamp=clamp)
    g_ours = torch.autograd.grad(ours, (s_i, s_j))
    ref = loop_correlation_loss(f_i, f_j, s_i, s_j, b, sc=sc, keep_mean=keep_mean, clamp=clamp)
    g_ref = torch.autograd.grad(ref, (s_i, s_j))
    assert torch.allclose(ours, ref, atol=1e-10)
    for a, r in zip(g_ours, g_ref):
        assert torch.allclose(a, r, atol=1e-10)
    assert any(g.abs().sum() > 0 for g in g_ours)


def test_correlation_loss_sum_reduction_is_paper_sum():
    f_i, f_j, s_i, s_j = make(3)
    mean = correlation_loss(f_i, f_j, s_i, s_j, 0.1)
    total = correlation_loss(f_i, f_j, s_i, s_j, 0.1, reduction="sum")
    assert torch.allclose(total, mean * (2 * 9 * 9))
    with pytest.raises(ValueError, match="reduction"):
        correlation_loss(f_i, f_j, s_i, s_j, 0.1, reduction="max")


def test_correlation_loss_no_gradient_to_features():
    f_i, f_j, s_i, s_j = make(4)
    f_i.requires_grad_(True)
    loss = correlation_loss(f_i, f_j, s_i, s_j, 0.1)
    loss.backward()
    assert f_i.grad is None


def test_correlation_loss_sign_attracts_correlated_features():
    """Minimising the loss must raise code similarity where F - b > 0 (STEGO sec. 3.2)."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(1, 8, 1, 2, generator=g)
    f[:, :, 0, 1] = f[:, :, 0, 0]  # identical features -> F = 1 > b
    base = torch.randn(1, 4, 1, 1, generator=g)
    # weakly aligned start (cos > 0): a zero-clamped pair at cos <= 0 gets no gradient by design
    s = (base + 0.8 * torch.randn(1, 4, 1, 2, generator=g)).requires_grad_(True)
    opt = torch.optim.SGD([s], lr=0.5)
    before = cos(s[0, :, 0, 0], s[0, :, 0, 1]).item()
    for _ in range(50):
        opt.zero_grad()
        correlation_loss(f, f, s, s, 0.1, spatial_centering=False).backward()
        opt.step()
    assert 0 < before < 0.9
    assert cos(s[0, :, 0, 0], s[0, :, 0, 1]).item() > 0.9


@pytest.mark.parametrize("seed", [0, 5])
def test_depth_feature_correlation_matches_equation(seed):
    _, _, s_i, s_j = make(seed, n2=2, m2=4)
    g = torch.Generator().manual_seed(seed + 100)
    d_i, d_j = torch.rand(2, 1, 3, 3, generator=g), torch.rand(2, 1, 2, 4, generator=g)
    ours = depth_feature_correlation_loss(d_i, d_j, s_i, s_j, 0.03)
    ref = loop_depth_loss(d_i, d_j, s_i, s_j, 0.03)
    assert torch.allclose(ours, ref, atol=1e-10)
    for a, r in zip(torch.autograd.grad(ours, (s_i, s_j)), torch.autograd.grad(ref, (s_i, s_j))):
        assert torch.allclose(a, r, atol=1e-10)


def test_depth_kernel_released_is_uniform_attraction():
    """SPEC 7.1: L2-normalised single-channel depth makes D = 1 wherever depth is non-zero."""
    _, _, s_i, _ = make(7, n=4, m=4)
    depth_full = torch.rand(2, 1, 32, 32) * 255  # released: whole map, 0..255 scale
    released = depth_feature_correlation_loss(depth_full, depth_full, s_i, s_i, 0.03, kernel="released")
    ones = torch.ones(2, 1, 4, 4)
    uniform = depth_feature_correlation_loss(ones, ones, s_i, s_i, 0.03)
    assert torch.allclose(released, uniform, atol=1e-12)
    # the paper kernel on the same (normalised) depth differs
    d = F.interpolate(depth_full / 255, size=(4, 4), mode="bilinear", align_corners=True)
    assert not torch.allclose(depth_feature_correlation_loss(d, d, s_i, s_i, 0.03), uniform)
    # integer depth (SPEC 7.4: 8-bit PNGs loaded as ints) is accepted in released mode
    as_int = depth_feature_correlation_loss(depth_full.round().to(torch.uint8), depth_full.to(torch.uint8), s_i, s_i, 0.03, kernel="released")
    assert torch.isfinite(as_int)


def test_depth_loss_rejects_depth_not_at_sample_points():
    _, _, s_i, s_j = make(8)
    with pytest.raises(ValueError, match="sample locations"):
        depth_feature_correlation_loss(torch.rand(2, 1, 28, 28), torch.rand(2, 1, 28, 28), s_i, s_j, 0.0)
    with pytest.raises(ValueError, match="kernel"):
        depth_feature_correlation_loss(torch.rand(2, 1, 3, 3), torch.rand(2, 1, 3, 3), s_i, s_j, 0.0, kernel="l2")


@pytest.mark.parametrize("n", [2, 3, 7, 32])
def test_derangement_has_no_fixed_points_and_is_a_permutation(n):
    g = torch.Generator().manual_seed(n)
    for _ in range(20):
        p = derangement(n, generator=g)
        assert sorted(p.tolist()) == list(range(n))
        assert (p != torch.arange(n)).all()
    with pytest.raises(ValueError):
        derangement(1)


WEIGHTS = LossWeights(
    lambda_self=0.58, lambda_knn=0.36, lambda_random=0.70, b_self=0.07, b_knn=0.02, b_random=0.76,
    lambda_depthg=0.19, b_depthg=0.03,
)


def test_stego_depthg_loss_is_the_weighted_sum_of_eq3_and_eq7():
    g = torch.Generator().manual_seed(11)
    batch, c, q, h = 4, 6, 5, 7
    f, f_knn = torch.randn(batch, c, h, h, generator=g), torch.randn(batch, c, h, h, generator=g)
    s = torch.randn(batch, q, h, h, generator=g, requires_grad=True)
    s_knn = torch.randn(batch, q, h, h, generator=g, requires_grad=True)
    depth = torch.rand(batch, 1, h, h, generator=g)
    coords = random_grid_coords(batch, 3, generator=g)
    coords_knn = random_grid_coords(batch, 3, generator=g)

    out = stego_depthg_loss(
        f, s, f_knn, s_knn, WEIGHTS, coords=coords, coords_knn=coords_knn, depth=depth,
        generator=torch.Generator().manual_seed(0),
    )
    # re-compute each term directly, with the same negative draws
    fa, sa = sample_at(f, coords), sample_at(s, coords)
    fk, sk = sample_at(f_knn, coords_knn), sample_at(s_knn, coords_knn)
    self_term = correlation_loss(fa, fa, sa, sa, WEIGHTS.b_self)
    knn_term = correlation_loss(fa, fk, sa, sk, WEIGHTS.b_knn)
    gen = torch.Generator().manual_seed(0)
    negs = []
    for _ in range(5):
        p = derangement(batch, generator=gen)
        negs.append(correlation_loss(fa, sample_at(f[p], coords[p]), sa, sample_at(s[p], coords[p]), WEIGHTS.b_random))
    random_term = torch.stack(negs).mean()
    da = sample_at(depth, coords)
    depth_term = depth_feature_correlation_loss(da, da, sa, sa, WEIGHTS.b_depthg)
    expected = (
        WEIGHTS.lambda_self * self_term + WEIGHTS.lambda_knn * knn_term + WEIGHTS.lambda_random * random_term
        + WEIGHTS.lambda_depthg * depth_term
    )
    assert torch.allclose(out.total, expected, atol=1e-12)
    for name, value in [("self", self_term), ("knn", knn_term), ("random", random_term), ("depthg", depth_term)]:
        assert torch.allclose(out.terms[name], value, atol=1e-12), name
    out.total.backward()
    assert s.grad.abs().sum() > 0 and s_knn.grad.abs().sum() > 0


def test_stego_depthg_loss_full_feature_map_mode_and_no_depth():
    g = torch.Generator().manual_seed(12)
    f, s = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 3, 5, 5, generator=g)
    out = stego_depthg_loss(f, s, f, s, WEIGHTS, generator=g)
    assert set(out.terms) == {"self", "knn", "random"}
    assert torch.allclose(out.terms["self"], correlation_loss(f, f, s, s, WEIGHTS.b_self))
    assert math.isfinite(out.total.item())
    with pytest.raises(ValueError, match="both"):
        stego_depthg_loss(f, s, f, s, WEIGHTS, coords=random_grid_coords(3, 2))
