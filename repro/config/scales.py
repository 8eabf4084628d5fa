"""Scales: how much of an entry runs (``scale: full`` or ``scale: smoke``), defined in ``scales.yaml``.

A scale is data in one place: a config layer, applied by :func:`repro.config.load_config` after the
entry's fidelity profile and before command-line overrides, and the resources its jobs ask the
scheduler for (:func:`repro.cluster.jobs.resources_for`). ``full`` is the registered entry. ``smoke`` is a
dress rehearsal of the same code path on the first images of each split for a few batches on one CPU
core; its runs live under ``<work>/smoke/`` (:func:`scale_root`) and never enter a results table.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["SCALES_FILE", "FULL", "Scale", "scales", "get_scale", "scale_root"]

SCALES_FILE = Path(__file__).with_name("scales.yaml")
FULL = "full"


@dataclass(frozen=True)
class Scale:
    """One scale of ``scales.yaml``.

    Attributes:
        name: ``full`` or ``smoke``.
        about: one line on what the scale runs (printed, and recorded in RESULTS.md's pipeline check).
        config: the config layer (nested mapping, validated like an experiment file).
        resources: replaces keys of the default job request (``gpus``, ``cpus``, ``mem_gb``, ``time_min``).
        stand_ins: a missing weights file is replaced by a random-weight stand-in (said loudly).
    """

    name: str
    about: str
    config: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, int] = field(default_factory=dict)
    stand_ins: bool = False


@functools.cache
def scales() -> dict[str, Scale]:
    """Every scale of ``scales.yaml``, by name (read once)."""
    raw = yaml.safe_load(SCALES_FILE.read_text())
    known = {"about", "config", "resources", "stand_ins"}
    out = {}
    for name, spec in raw.items():
        unknown = set(spec) - known
        if unknown:
            raise ValueError(f"{SCALES_FILE}: scale {name!r} has unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
        out[name] = Scale(name, str(spec.get("about", "")), dict(spec.get("config") or {}),
                          {k: int(v) for k, v in (spec.get("resources") or {}).items()}, bool(spec.get("stand_ins")))
    if FULL not in out or out[FULL].config:
        raise ValueError(f"{SCALES_FILE}: the 'full' scale must exist and change nothing")
    return out


def get_scale(name: str) -> Scale:
    """The scale called ``name``.

    Raises:
        ValueError: an unknown scale, naming the known ones.
    """
    known = scales()
    if name not in known:
        raise ValueError(f"unknown scale {name!r}; known: {', '.join(known)}")
    return known[name]


def scale_root(work_dir: str | Path, scale: str) -> Path:
    """Where runs and data of ``scale`` live: ``work_dir`` for ``full``, ``work_dir/<scale>`` otherwise."""
    return Path(work_dir) if scale == FULL else Path(work_dir) / scale
