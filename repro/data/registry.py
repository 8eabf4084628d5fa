"""Name -> dataset adapter lookup used by the CLI and the data pipeline."""

from __future__ import annotations

from pathlib import Path

from repro.data.cityscapes import Cityscapes27
from repro.data.cocostuff import CocoStuff27
from repro.data.nyuv2 import NYUv2
from repro.data.potsdam import Potsdam3
from repro.data.sample import BaseDataset

__all__ = ["DATASETS", "get_dataset"]

DATASETS: dict[str, type[BaseDataset]] = {
    "cocostuff27": CocoStuff27,
    "cityscapes27": Cityscapes27,
    "potsdam3": Potsdam3,
    "nyuv2": NYUv2,
}


def get_dataset(name: str, root: str | Path, split: str, **kwargs) -> BaseDataset:
    """Build the adapter registered as ``name``.

    Args:
        name: one of :data:`DATASETS` (``cocostuff27``, ``cityscapes27``, ``potsdam3``, ``nyuv2``).
        root: dataset root folder.
        split: split name understood by that adapter (e.g. ``"train"``, ``"val"``, ``"test"``).
        **kwargs: adapter-specific options (``curated_root``, ``layout``, ``require_depth``, ...).

    Returns:
        The adapter instance (yields :class:`repro.data.sample.Sample`).

    Raises:
        ValueError: if ``name`` is unknown (lists the known names).
    """
    try:
        cls = DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}") from None
    return cls(root, split, **kwargs)
