"""Name -> dataset adapter lookup used by the CLI and the data pipeline."""

from __future__ import annotations

from pathlib import Path

from repro.data.datasets.cityscapes import Cityscapes27
from repro.data.datasets.cocostuff import CocoStuff27
from repro.data.datasets.nyuv2 import NYUv2
from repro.data.datasets.potsdam import Potsdam3
from repro.data.datasets.base import BaseDataset

__all__ = ["DATASETS", "get_dataset", "num_classes_for", "class_names_for"]

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
        The adapter instance (yields :class:`repro.data.datasets.base.Sample`).

    Raises:
        ValueError: if ``name`` is unknown (lists the known names).
    """
    try:
        cls = DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}") from None
    return cls(root, split, **kwargs)


def _data(config):
    data = getattr(config, "data", config)
    try:
        return data.dataset, bool(getattr(data, "score_void", False))
    except AttributeError:
        raise TypeError(f"expected an ExperimentConfig or its DataConfig, got {type(config).__name__}") from None


def num_classes_for(config) -> int:
    """Classes that are scored for a config: the dataset's K, plus 1 with ``data.score_void`` (R13).

    The released DepthG code scored NYUv2 void as class 0 of ``n_classes = 14`` (``src/data.py``
    ``ContrastiveSegDataset``); the prepare stage then shifts labels by +1 (void -1 -> 0).

    Args:
        config: an :class:`~repro.config.schema.ExperimentConfig` (or its ``data`` section).

    Returns:
        K (13 for NYUv2) or K + 1 (14) with ``score_void``.

    Raises:
        ValueError: for an unknown dataset.
    """
    name, void = _data(config)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name].num_classes + int(void)


def class_names_for(config) -> tuple[str, ...]:
    """Class names in label order for a config: ``("void", *names)`` with ``data.score_void`` (R13).

    Raises:
        ValueError: for an unknown dataset.
    """
    name, void = _data(config)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return (("void",) if void else ()) + tuple(DATASETS[name].class_names)
