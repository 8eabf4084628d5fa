"""Backbone loading (official DINO format), head, probes and LHP propagation."""

from __future__ import annotations

import itertools

import pytest
import timm
import torch
import torch.nn.functional as F

from repro.cli.main import main as cli_main
from repro.utils.errors import MissingFileError
from repro.method.lhp import lhp_mix, lhp_weights_3d, lhp_weights_attention
from repro.models import ClusterProbe, DinoBackbone, LinearProbe, ProjectionHead, SegmentationHead
from repro.models.backbone import last_block_attention


@pytest.fixture(scope="module")
def vits_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "dino_deitsmall8_pretrain.pth"
    assert cli_main(["weights", "init-random", "--arch", "vit_small_patch8", "--out", str(path), "--seed", "3"]) == 0
    return path


def test_random_checkpoint_has_the_official_dino_keys(vits_checkpoint):
    state = torch.load(vits_checkpoint, weights_only=True)
    assert state["pos_embed"].shape == (1, 785, 384)  # 28 * 28 patches + CLS at 224 px
    assert state["patch_embed.proj.weight"].shape == (384, 3, 8, 8)
    assert "blocks.11.mlp.fc2.weight" in state and "norm.weight" in state
    assert not any(k.startswith("head") for k in state)


def test_backbone_round_trip_gives_patch_features(vits_checkpoint):
    backbone = DinoBackbone("vit_small_patch8", vits_checkpoint)
    images = torch.randn(2, 3, 224, 224)
    feats = backbone(images)
    assert feats.shape == (2, 384, 28, 28)
    # the same numbers as timm's model with the file's weights: last block, final norm, CLS dropped
    ref = timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0)
    ref.load_state_dict(torch.load(vits_checkpoint, weights_only=True))
    ref.eval()
    with torch.no_grad():
        tokens = ref.forward_features(images)
    assert torch.allclose(feats, tokens[:, 1:].transpose(1, 2).reshape(2, 384, 28, 28), atol=1e-5)
    assert backbone(torch.randn(1, 3, 320, 320)).shape == (1, 384, 40, 40)  # test resolution
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.training


def test_backbone_accepts_full_dino_checkpoints_and_uses_the_teacher(vits_checkpoint, tmp_path):
    state = torch.load(vits_checkpoint, weights_only=True)
    teacher = {f"backbone.{k}": v for k, v in state.items()}
    teacher["head.mlp.0.weight"] = torch.zeros(3, 3)
    student = {f"module.backbone.{k}": torch.zeros_like(v) for k, v in state.items()}
    full = tmp_path / "full.pth"
    torch.save({"teacher": teacher, "student": student}, full)
    a = DinoBackbone("vit_small_patch8", vits_checkpoint)
    b = DinoBackbone("vit_small_patch8", full)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(a(x), b(x))


def test_backbone_errors(vits_checkpoint, tmp_path):
    with pytest.raises(MissingFileError, match="wget -O .*dino_deitsmall8_pretrain.pth"):
        DinoBackbone("vit_small_patch8", tmp_path / "dino_deitsmall8_pretrain.pth")
    with pytest.raises(ValueError, match="does not match"):
        DinoBackbone("vit_base_patch8", vits_checkpoint)
    with pytest.raises(ValueError, match="unknown backbone"):
        DinoBackbone("vit_huge_patch14", vits_checkpoint)
    backbone = DinoBackbone("vit_small_patch8", vits_checkpoint)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        backbone(torch.randn(1, 3, 100, 100))


def test_segmentation_head_paths_and_dropout():
    torch.manual_seed(0)
    head = SegmentationHead(16, 7, dropout=0.5)
    f = torch.randn(4, 16, 5, 5)
    head.eval()
    target, s = head(f)
    assert s.shape == (4, 7, 5, 5) and target is f
    expected = head.linear(f) + head.mlp(f)  # eval: no dropout, linear + 2-layer ReLU MLP
    assert torch.allclose(s, expected)
    head.train()
    target, s = head(f)
    # Dropout2d drops whole channels of the target; kept channels are rescaled by 1/(1-p)
    per_channel = target.abs().sum(dim=(2, 3))
    assert (per_channel == 0).any() and (per_channel > 0).any()
    kept = per_channel > 0
    assert torch.allclose(target.permute(0, 2, 3, 1)[kept.unsqueeze(1).unsqueeze(1).expand(-1, 5, 5, -1)],
                          2 * f.permute(0, 2, 3, 1)[kept.unsqueeze(1).unsqueeze(1).expand(-1, 5, 5, -1)])
    head_no_target = SegmentationHead(16, 7, dropout=0.5, dropout_target=False).train()
    assert head_no_target(f)[0] is f


def test_cluster_probe_loss_is_minus_mean_max_cosine():
    torch.manual_seed(1)
    probe = ClusterProbe(6, 4)
    code = torch.randn(2, 6, 3, 3)
    loss, probs = probe(code)
    sims = torch.einsum("bqhw,kq->bkhw", F.normalize(code, dim=1), F.normalize(probe.clusters, dim=1))
    assert torch.allclose(loss, -sims.max(1).values.mean())
    assert torch.equal(probs.argmax(1), probe.predict(code)) and torch.all(probs.sum(1) == 1)
    loss_soft, soft = probe(code, alpha=2.0)
    assert torch.allclose(soft, torch.softmax(2 * sims, 1))
    loss.backward()
    assert probe.clusters.grad is not None


def test_linear_probe_loss_ignores_unlabelled_and_rejects_bad_labels():
    torch.manual_seed(2)
    probe = LinearProbe(5, 3)
    code = torch.randn(1, 5, 4, 4)
    labels = torch.randint(0, 3, (1, 8, 8))
    labels[0, :4] = -1
    logits = F.interpolate(probe(code), size=(8, 8), mode="bilinear", align_corners=False)
    ref = F.cross_entropy(logits[0].permute(1, 2, 0)[4:].reshape(-1, 3), labels[0, 4:].reshape(-1))
    assert torch.allclose(probe.loss(code, labels), ref)
    with pytest.raises(ValueError, match="labels must be"):
        probe.loss(code, torch.full((1, 8, 8), 3))
    assert probe.loss(code, torch.full((1, 8, 8), -1)).item() == 0.0


def test_3d_lhp_weights_paper_and_mix():
    torch.manual_seed(3)
    points = torch.rand(2, 12, 3)
    w = lhp_weights_3d(points, k=3)
    assert torch.allclose(w.sum(2), torch.ones(2, 12))
    assert ((w > 0).sum(2) == 4).all() and (torch.diagonal(w, dim1=1, dim2=2) > 0).all()
    dist = torch.cdist(points, points)
    for bi, p in itertools.product(range(2), range(12)):
        chosen = w[bi, p].nonzero().flatten()
        nearest = dist[bi, p].argsort()[:4]
        assert set(chosen.tolist()) == set(nearest.tolist())
        order = dist[bi, p, chosen].argsort()
        assert (w[bi, p, chosen][order].diff() <= 1e-12).all()  # nearer -> larger weight
    code = torch.randn(2, 5, 3, 4)
    mixed = lhp_mix(code, w)
    flat = code.reshape(2, 5, 12)
    for bi, p in itertools.product(range(2), range(12)):
        assert torch.allclose(mixed.reshape(2, 5, 12)[bi, :, p], (w[bi, p] * flat[bi]).sum(-1), atol=1e-6)
    assert ProjectionHead(5)(mixed).shape == code.shape


def test_3d_lhp_released_keeps_the_nearest_percent_and_divides_by_p():
    torch.manual_seed(4)
    points = torch.rand(1, 400, 3)
    w = lhp_weights_3d(points, variant="released")
    kept = (w > 0).sum(2)
    assert (kept >= 1).all() and (kept <= 6).all()  # ~1% of 400 cells
    assert (w.sum(2) <= 4 * 1.0 / 400 + 1e-6).all()
    with pytest.raises(ValueError):
        lhp_weights_3d(points, variant="attention")


def test_attention_lhp_stays_in_the_3x3_window():
    torch.manual_seed(5)
    att = torch.rand(2, 20, 20)
    w = lhp_weights_attention(att, 4, 5)
    assert torch.allclose(w.sum(2), torch.ones(2, 20))
    rows, cols = torch.arange(20) // 5, torch.arange(20) % 5
    outside = ((rows[:, None] - rows[None]).abs() > 1) | ((cols[:, None] - cols[None]).abs() > 1)
    assert (w[:, outside] == 0).all()
    with pytest.raises(ValueError):
        lhp_weights_attention(att, 5, 5)


def test_last_block_attention_matches_timm_attention_weights(vits_checkpoint):
    backbone = DinoBackbone("vit_small_patch8", vits_checkpoint)
    images = torch.randn(2, 3, 64, 48)
    feats, attention = last_block_attention(backbone, images)
    assert torch.equal(feats, backbone(images)) and attention.shape == (2, 48, 48)
    # reference: run timm's own attention layer un-fused and capture its softmax output
    attn_layer = backbone.vit.blocks[-1].attn
    captured = []
    attn_layer.fused_attn = False
    handle = attn_layer.attn_drop.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        backbone(images)
    finally:
        handle.remove()
        attn_layer.fused_attn = True
    reference = captured[-1].mean(dim=1)[:, 1:, 1:]
    assert torch.allclose(attention, reference, atol=1e-6)
    full_rows = captured[-1].mean(dim=1).sum(-1)
    assert torch.allclose(full_rows, torch.ones_like(full_rows), atol=1e-5)
    weights = lhp_weights_attention(attention, 8, 6)
    assert torch.allclose(weights.sum(2), torch.ones(2, 48), atol=1e-5)
