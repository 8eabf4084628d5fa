"""Shared pytest fixtures: the real sample data under ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from slurm_cluster import slurm_cluster  # noqa: F401  (session fixture: a real local SLURM, tests marked slurm)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared(name: str, env: str, what: str, holds: str) -> Path:
    """``$<env>`` or ``<repo>/../shared/<name>``; a folder without its README.md is an error, never a silent skip."""
    root = Path(os.environ.get(env, REPO_ROOT.parent / "shared" / name))
    if not (root / "README.md").is_file():
        raise FileNotFoundError(f"{what} not found at {root}; set {env} to the folder holding {holds}")
    return root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real sample data under ``../shared/data`` (``$REPRO_SHARED_DATA``)."""
    return _shared("data", "REPRO_SHARED_DATA", "sample data",
                   "nyuv2-mini/, cityscapes-sample/, potsdam-sample/ and cocostuff-curated/")


@pytest.fixture(scope="session")
def shared_golden() -> Path:
    """Outputs of the released STEGO/DepthG code (``released/``, ``released-checkpoints/``) under
    ``../shared/golden`` (``$REPRO_SHARED_GOLDEN``)."""
    return _shared("golden", "REPRO_SHARED_GOLDEN", "golden outputs", "released/ and released-checkpoints/")


@pytest.fixture(scope="module")
def golden(shared_golden):
    """The released checkpoints of the golden fixtures (written by the released classes)."""
    return shared_golden / "released-checkpoints"


@pytest.fixture(scope="module")
def dino_state(tmp_path_factory):
    """The state dict of a seed-0 random ViT-S/8 in the official DINO format."""
    import torch

    from repro.models.backbone import init_random_checkpoint

    path = init_random_checkpoint("vit_small_patch8", tmp_path_factory.mktemp("dino") / "dino.pth", seed=0)
    return torch.load(path, weights_only=True)
