"""The experiment registry: one YAML per table row under ``experiments/<table>/<entry>.yaml``.

An entry's name is ``<table>/<entry>`` (``table1/depthg-vits8``, ``supp4/n9``), the path of its
file relative to :data:`EXPERIMENTS_DIR` without the suffix. :data:`TABLES` maps the table keys
to the paper tables they reproduce (DepthG main paper and supplement, repro/config/paper_tables.yaml) and the
``demo`` entry; every entry runs in both fidelities (:mod:`repro.config.fidelity`). ``repro list [TABLE]`` prints them.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from pathlib import Path

from repro.config.fidelity import PROFILES
from repro.config.loader import load_config
from repro.config.schema import ExperimentConfig
from repro.utils.errors import UserError

__all__ = [
    "EXPERIMENTS_DIR",
    "TABLES",
    "UnknownEntryError",
    "list_entries",
    "entry_path",
    "load_entry",
    "format_entry",
    "run_name",
]

EXPERIMENTS_DIR = Path(__file__).with_name("experiments")
"""Folder of the experiment YAMLs (shipped as package data)."""

TABLES: dict[str, str] = {
    "table1": "DepthG Table 1: COCO-Stuff-27",
    "table2": "DepthG Table 2: Cityscapes-27 (unsupervised)",
    "table3": "DepthG Table 3: Potsdam-3 (unsupervised accuracy)",
    "table4": "DepthG Table 4: contributions ablation, COCO-Stuff-27 ViT-S/8",
    "table5": "DepthG Table 5: depth map sources, COCO-Stuff-27 ViT-S/8",
    "table6": "DepthG Table 6: local hidden positives, COCO-Stuff-27 ViT-S/8",
    "supp3": "DepthG supplement Table 3: guidance variations (COCO-Stuff-27, Potsdam-3)",
    "supp4": "DepthG supplement Table 4: number of feature samples N, COCO-Stuff-27 ViT-S/8",
    "supp5": "DepthG supplement Table 5: guidance scheduling, COCO-Stuff-27 ViT-S/8",
    "supp6": "DepthG supplement Table 6: NYUv2, estimated vs sensor depth",
    "demo": "Demo on the NYUv2 sample (nyuv2-mini)",
}
"""Table key -> title, in the order RESULTS.md and ``repro list`` present them."""

METRIC_ORDER = ("unsup_acc", "unsup_miou", "linear_acc", "linear_miou")


class UnknownEntryError(UserError, KeyError):
    """An experiment name that is not in the registry; the message lists close matches."""

    def __str__(self) -> str:  # KeyError would show the repr of the message
        return str(self.args[0]) if self.args else ""


def list_entries(table: str | None = None) -> list[str]:
    """Names of the registered experiments.

    Args:
        table: a key of :data:`TABLES` (``"table1"``, ``"supp4"``, ...) to list one table only;
            ``None`` lists every entry.

    Returns:
        Sorted entry names ``<table>/<entry>``.

    Raises:
        UnknownEntryError: if ``table`` is not a key of :data:`TABLES`.
    """
    if table is not None and table not in TABLES:
        close = difflib.get_close_matches(table, TABLES, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownEntryError(f"unknown table {table!r}{hint} (known: {', '.join(TABLES)})")
    folders = [EXPERIMENTS_DIR / table] if table else sorted(p for p in EXPERIMENTS_DIR.iterdir() if p.is_dir())
    return sorted(f"{folder.name}/{path.stem}" for folder in folders if folder.is_dir()
                  for path in folder.glob("*.yaml"))


def entry_path(name: str) -> Path:
    """The YAML file of a registered experiment.

    Args:
        name: entry name ``<table>/<entry>`` (a trailing ``.yaml`` is accepted).

    Returns:
        Path of ``experiments/<table>/<entry>.yaml``.

    Raises:
        UnknownEntryError: if no such entry exists; the message names up to five close matches.
    """
    key = name.removesuffix(".yaml").strip("/")
    path = EXPERIMENTS_DIR / f"{key}.yaml"
    if "/" in key and ".." not in key and path.is_file():
        return path
    names = list_entries()
    close = difflib.get_close_matches(key, names, n=5, cutoff=0.5)
    if not close:  # e.g. "depthg-vits8" without its table
        close = [n for n in names if n.split("/", 1)[-1] == key.split("/")[-1]][:5]
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise UnknownEntryError(f"unknown experiment {name!r}{hint} (`repro list` shows all {len(names)})")


def load_entry(name_or_path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load a registered experiment, or an experiment YAML given by path.

    Args:
        name_or_path: entry name (``table1/depthg-vits8``) or the path of a YAML file. A string
            is read as a path when it names an existing file or ends in ``.yaml``/``.yml`` and
            is not a registered name.
        overrides: ``key.sub=value`` strings, applied last.

    Returns:
        The validated :class:`ExperimentConfig` (``data.root`` is returned unexpanded, e.g.
        ``${REPRO_DATA}/cocostuff``; the run code expands environment variables).

    Raises:
        UnknownEntryError: for an unknown entry name (with close matches).
        ConfigError: for an invalid file or override (names the key and the file).
        FileNotFoundError: for a missing YAML path.
    """
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or Path(text).is_file():
        return load_config(Path(text), overrides)
    if text.endswith((".yaml", ".yml")) and not (EXPERIMENTS_DIR / text).is_file():
        return load_config(Path(text), overrides)  # raises FileNotFoundError naming the path
    return load_config(entry_path(text), overrides)


def _fmt_paper(paper: dict[str, float]) -> str:
    keys = [k for k in METRIC_ORDER if k in paper] + sorted(k for k in paper if k not in METRIC_ORDER)
    return " ".join(f"{k}={paper[k]:.1f}" for k in keys) if keys else "-"


def format_entry(name: str, config: ExperimentConfig) -> str:
    """One line describing an entry: name, method, dataset, backbone and the paper's numbers.

    Args:
        name: the entry name.
        config: its loaded config.

    Returns:
        A line such as ``table1/depthg-vits8  depthg  cocostuff27  vit_small_patch8  unsup_acc=56.3 ...``.
    """
    runs = "  ".join(run_name(name, f) for f in PROFILES)
    return (f"{name:30s} {config.method:7s} {config.data.dataset:13s} {config.model.arch:17s} {runs}  "
            f"{_fmt_paper(config.paper)}")


def run_name(entry: str, fidelity: str) -> str:
    """The name of one fidelity's run of an entry, ``<entry>/<fidelity>`` (also its folder under the work dir)."""
    return f"{entry}/{fidelity}"


def natural_order(name: str) -> list:
    """Sort key that orders ``supp4/n6`` before ``supp4/n10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
