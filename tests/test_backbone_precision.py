"""model.backbone_precision: the frozen backbone in bf16 or fp32 whatever the caller's autocast, and its identity."""

from __future__ import annotations

import pytest
import torch

from repro.config.loader import ConfigError
from repro.config.entries import load_entry
from repro.config.identity import config_hash, identity
from repro.models.backbone import DinoBackbone, init_random_checkpoint


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return init_random_checkpoint("vit_small_patch8", tmp_path_factory.mktemp("w") / "random.pth", seed=0)


def test_bf16_is_close_to_fp32_and_fp32_ignores_an_outer_autocast(weights):
    x = torch.randn(1, 3, 64, 64)
    nets = {p: DinoBackbone("vit_small_patch8", weights, precision=p) for p in ("default", "fp32", "bf16")}
    f32, b16, default = (nets[p](x) for p in ("fp32", "bf16", "default"))
    assert b16.dtype == f32.dtype == torch.float32
    assert torch.equal(default, f32)  # no autocast around it: the default is fp32
    diff = float((b16 - f32).abs().max())
    assert 0 < diff < 0.02 * float(f32.abs().max())  # bf16 keeps 8 bits of mantissa
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(nets["fp32"](x), f32)  # autocast disabled inside
        assert not torch.equal(nets["default"](x), f32)  # the caller's autocast applies
    with pytest.raises(ValueError, match="precision must be one of"):
        DinoBackbone("vit_small_patch8", weights, precision="fp16")


def test_default_leaves_every_run_identity_unchanged_and_other_values_change_it():
    cfg = load_entry("table1/stego-vits8", ["fidelity=paper"])
    assert cfg.model.backbone_precision == "default" and "model.backbone_precision" not in identity(cfg)
    forced = load_entry("table1/stego-vits8", ["fidelity=paper", "model.backbone_precision=bf16"])
    assert identity(forced)["model.backbone_precision"] == "bf16" and config_hash(forced) != config_hash(cfg)
    with pytest.raises(ConfigError, match="backbone_precision"):
        load_entry("table1/stego-vits8", ["model.backbone_precision=fp16"])
