"""Shared pytest fixtures: the real sample data under ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from slurm_cluster import slurm_cluster  # noqa: F401  (session fixture: a real local SLURM, tests marked slurm)

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_root() -> Path:
    """Return the sample-data root: ``$REPRO_SHARED_DATA`` or ``<repo>/../shared/data``."""
    return Path(os.environ.get("REPRO_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real sample data; a missing folder is an error, never a silent skip."""
    root = shared_data_root()
    if not (root / "README.md").is_file():
        raise FileNotFoundError(
            f"sample data not found at {root}; set REPRO_SHARED_DATA to the folder holding "
            "nyuv2-mini/, cityscapes-sample/, potsdam-sample/ and cocostuff-curated/"
        )
    return root


def shared_golden_root() -> Path:
    """Return the golden-output root: ``$REPRO_SHARED_GOLDEN`` or ``<repo>/../shared/golden``."""
    return Path(os.environ.get("REPRO_SHARED_GOLDEN", REPO_ROOT.parent / "shared" / "golden"))


@pytest.fixture(scope="session")
def shared_golden() -> Path:
    """Outputs of the released STEGO/DepthG code (``released/``, ``released-checkpoints/``); never skipped."""
    root = shared_golden_root()
    if not (root / "README.md").is_file():
        raise FileNotFoundError(f"golden outputs not found at {root}; set REPRO_SHARED_GOLDEN to the folder holding "
                                "released/ and released-checkpoints/")
    return root
