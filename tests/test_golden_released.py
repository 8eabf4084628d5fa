"""Replays of the released STEGO/DepthG code's own outputs (``../shared/golden/released``, SPEC section 7).

Each fixture holds inputs, the random draws the released code made (sample coordinates, negative
permutations) and its outputs; repro's public functions, set up as the ``released`` fidelity
profile sets them, must give the same numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from repro.config.entries import load_entry
from repro.data.transforms import images_to_tensor
from repro.evaluate.metrics import ConfusionMatrix, compute_metrics
from repro.method.lhp import lhp_mix, lhp_weights_3d
from repro.method.losses import LossWeights, depth_feature_correlation_loss, stego_depthg_loss, super_perm
from repro.models.backbone import DinoBackbone, init_random_checkpoint
from repro.method.sampling import depth_to_points, fps_grid_coords, pool_depth, sample_at


def _load(golden, name: str) -> dict[str, np.ndarray]:
    with np.load(golden / "released" / f"{name}.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def backbone_vits8(tmp_path_factory, shared_golden):
    g = _load(shared_golden, "item1_backbone_vits8")
    path = init_random_checkpoint("vit_small_patch8", tmp_path_factory.mktemp("w") / "random.pth", seed=0)
    state = torch.load(path, weights_only=True)
    for key, name in (("pos_embed", "pos_embed"), ("blocks.0.attn.qkv.weight", "blocks0_qkv_weight"),
                      ("norm.weight", "norm_weight")):
        # other random weights here would make the comparison meaningless
        assert float(state[key].double().sum()) == pytest.approx(float(g[f"weights_checksum_{name}_sum"]), abs=1e-6)
    return path, g


@pytest.mark.parametrize("size", [224, 320])
def test_backbone_features_match_dino_at_224_and_320(backbone_vits8, size):
    path, g = backbone_vits8
    config = load_entry("table1/depthg-vits8", ["fidelity=released"])
    backbone = DinoBackbone("vit_small_patch8", path, pos_embed=config.model.pos_embed)
    feats = backbone(images_to_tensor(g[f"img_uint8_{size}"]))
    released = torch.from_numpy(g[f"feat_released_{size}"])
    assert feats.shape == released.shape
    assert float((feats - released).abs().max()) <= 1e-4
    if size == 320:  # timm's antialiased resampling is what R2 fixes
        timm = DinoBackbone("vit_small_patch8", path, pos_embed="timm")(images_to_tensor(g["img_uint8_320"]))
        assert float((timm - released).abs().max()) > 0.05


def _weights(g) -> LossWeights:
    lam, b = g["weights_lambda_self_knn_random"], g["shifts_b_self_knn_random"]
    return LossWeights(*map(float, lam), *map(float, b))


def _assert_loss_and_gradients(g, prefix: str, terms, names, code, code_pos) -> None:
    """Loss terms and total within 1e-6, gradients of the total within 1e-5 of their max (the issue's bounds)."""
    for name in names:
        assert abs(float(terms.terms[name].detach()) - float(g[f"{prefix}__loss_{name}"])) <= 1e-6, name
    assert abs(float(terms.total.detach()) - float(g[f"{prefix}__loss_total"])) <= 1e-6
    terms.total.backward()
    for grad, key in ((code.grad, "grad_code_total"), (code_pos.grad, "grad_code_pos_total")):
        ref = torch.from_numpy(g[f"{prefix}__{key}"])
        assert float((grad - ref).abs().max()) <= 1e-5 * float(ref.abs().max()), key


def _replay_item3(g, tag: str):
    feats = torch.from_numpy(g["feats"])
    code = torch.from_numpy(g["code"]).requires_grad_()
    knn = torch.from_numpy(g["knn_perm"])
    code_pos = torch.from_numpy(g["code"])[knn].clone().requires_grad_()  # a separate leaf, as in the released call
    # the released sample() feeds coords.permute(0, 2, 1, 3) to grid_sample
    coords1 = torch.from_numpy(g[f"{tag}__coords1_as_drawn"]).permute(0, 2, 1, 3)
    coords2 = torch.from_numpy(g[f"{tag}__coords2_as_drawn"]).permute(0, 2, 1, 3)
    centring = not tag.startswith("nocenter")
    terms = stego_depthg_loss(feats, code, feats[knn], code_pos, _weights(g), coords=coords1, coords_knn=coords2,
                              negative_perm="super_perm", negative_coords="knn",
                              negative_perms=list(torch.from_numpy(g[f"{tag}__super_perms"])),
                              spatial_centering=centring, keep_global_mean=True, zero_clamp=True)
    return terms, code, code_pos


@pytest.mark.parametrize("tag", ["pw_N11", "pw_N9", "nocenter_N11"])
def test_correlation_loss_terms_and_gradients_match_stego(shared_golden, tag):
    g = _load(shared_golden, "item3_correlation_loss")
    terms, code, code_pos = _replay_item3(g, tag)
    _assert_loss_and_gradients(g, tag, terms, ("self", "knn", "random"), code, code_pos)
    for part in ("self", "knn", "random"):  # each term's gradient on its own
        _, code_k, _ = (t := _replay_item3(g, tag))
        t[0].terms[part].backward()
        ref = torch.from_numpy(g[f"{tag}__grad_code_{part}"])
        assert float((code_k.grad - ref).abs().max()) <= 1e-5 * float(ref.abs().max()), part


def test_super_perm_has_no_fixed_points_and_is_not_always_a_permutation():
    gen = torch.Generator().manual_seed(0)
    draws = [super_perm(32, generator=gen) for _ in range(2000)]
    assert all(bool((p != torch.arange(32)).all()) for p in draws)
    not_perm = sum(len(set(p.tolist())) < 32 for p in draws) / len(draws)
    assert 0.55 < not_perm < 0.70  # SPEC R10: about 63 % at B = 32


def _fed_depth(g) -> torch.Tensor:
    return torch.from_numpy(g["depth_uint8"]).float()  # the released loader feeds 0..255 integers


@pytest.mark.parametrize("n", [9, 11])
def test_fps_coordinates_equal_the_released_picks(shared_golden, n):
    g = _load(shared_golden, "item4_depth_fps")
    coords = fps_grid_coords(pool_depth(_fed_depth(g), (28, 28)), n, order="released")
    expected = torch.from_numpy(g[f"N{n}__fps_coords_0to1"]) * 2 - 1  # forward() uses the picks *2-1
    assert torch.equal(coords, expected)


def test_depth_feature_term_and_its_d_tensor(shared_golden):
    g = _load(shared_golden, "item4_depth_fps")
    depth, code = _fed_depth(g), torch.from_numpy(g["code"])
    coords = fps_grid_coords(pool_depth(depth, (28, 28)), 9, order="released").permute(0, 2, 1, 3)
    s = sample_at(code, coords)
    loss = depth_feature_correlation_loss(depth, depth, s, s, 0.03, kernel="released")
    assert abs(float(loss) - float(g["N9__depth_term_loss_mean"])) <= 1e-6
    d = torch.nn.functional.normalize(torch.nn.functional.interpolate(depth, (9, 9), mode="bilinear",
                                                                      align_corners=True), dim=1)
    assert torch.equal(torch.einsum("bchw,bcuv->bhwuv", d, d), torch.from_numpy(g["N9__depth_term_D"]))


@pytest.mark.parametrize("n", [9, 11])
def test_depthg_loss_as_the_trainer_calls_it(shared_golden, n):
    """The released profile's loss on FPS samples (no extra transposition: the loss is a mean over all pairs)."""
    g = _load(shared_golden, "item4_depth_fps")
    config = load_entry("table1/depthg-vits8", ["fidelity=released"])
    assert (config.loss.depth_kernel, config.sampling.fps_order, config.loss.negative_perm,
            config.loss.negative_coords) == ("released", "released", "super_perm", "knn")
    depth, feats = _fed_depth(g), torch.from_numpy(g["feats"])
    code = torch.from_numpy(g["code"]).requires_grad_()
    knn = torch.from_numpy(g["knn_perm"])
    code_pos = torch.from_numpy(g["code"])[knn].clone().requires_grad_()
    coords = fps_grid_coords(pool_depth(depth, (28, 28)), n, order=config.sampling.fps_order)
    weights = LossWeights(0.58, 0.36, 0.70, 0.07, 0.025, 0.761, 0.19, 0.03)  # paper_reproduction.sh, COCO ViT-S
    terms = stego_depthg_loss(feats, code, feats[knn], code_pos, weights, coords=coords, coords_knn=coords[knn],
                              depth=depth, depth_kernel=config.loss.depth_kernel,
                              negative_perm=config.loss.negative_perm, negative_coords=config.loss.negative_coords,
                              negative_perms=list(torch.from_numpy(g[f"N{n}__super_perms"])),
                              spatial_centering=config.loss.spatial_centering,
                              keep_global_mean=config.loss.keep_global_mean)
    _assert_loss_and_gradients(g, f"N{n}", terms, ("self", "knn", "random", "depthg"), code, code_pos)


def test_3d_lhp_mixing(shared_golden):
    g = _load(shared_golden, "item4_depth_fps")
    config = load_entry("table1/depthg-lhp-vits8", ["fidelity=released"])
    points = depth_to_points(pool_depth(_fed_depth(g), (28, 28)), variant=config.lhp.variant)
    mixed = lhp_mix(torch.from_numpy(g["code"]), lhp_weights_3d(points, variant=config.lhp.variant))
    ref = torch.from_numpy(g["lhp_mixed_code"])
    assert float((mixed - ref).abs().max()) <= 1e-6 * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("preds,matching,key", [("preds_K27", "hungarian", "stego_hungarian_extra0_acc_miou"),
                                                ("preds_linear_K27", "identity", "stego_identity_acc_miou")])
def test_metrics_match_stegos_unsupervised_metrics(shared_golden, preds, matching, key):
    g = _load(shared_golden, "item6_eval")
    cm = ConfusionMatrix(27)
    for p, label in zip(g[preds], g["labels"]):
        cm.update(torch.from_numpy(p.astype(np.int64)), torch.from_numpy(label.astype(np.int64)))
    result = compute_metrics(cm, matching=matching)
    acc, miou = g[key]
    assert abs(result.accuracy - acc) <= 1e-5 and abs(result.miou - miou) <= 1e-5


def test_dense_crf_matches_the_released_crf_given_the_released_image(shared_golden):
    from repro.data.transforms import images_to_tensor
    from repro.evaluate.crf import dense_crf, released_crf_image

    g = _load(shared_golden, "item6_eval")
    rgb = g["crf_image_uint8_rgb"]
    logits = torch.nn.functional.interpolate(torch.from_numpy(g["crf_logits_20x20"]), size=rgb.shape[:2],
                                             mode="bilinear", align_corners=False)
    log_probs = torch.log_softmax(logits, dim=1)[0]
    image = released_crf_image(images_to_tensor(rgb[None])[0])  # un-normalised, truncated, BGR (R12)
    q = dense_crf(image, log_probs)
    assert np.array_equal(q.argmax(0), g["crf_argmax_released"])
    assert float(np.abs(q - g["crf_Q_released"]).max()) <= 1e-5
    agree = (dense_crf(rgb, log_probs).argmax(0) == g["crf_argmax_released"]).mean()  # the paper profile's RGB image
    assert 0.9 < agree < 1.0
