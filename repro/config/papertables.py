"""Where each registered entry's numbers stand in the papers: table, row and column of every quoted value.

The data is ``repro/config/paper_tables.yaml`` (shipped with the package); the quoted values are the
entries' own ``paper:`` keys (:func:`repro.config.entries.load_entry`). RESULTS.md orders and labels
its rows with it, and ``results/model-index.yml`` records each value's table, row and column.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import yaml

__all__ = ["PAPER_TABLES_FILE", "PaperCell", "paper_cell", "entry_label", "paper_order", "paper_citation",
           "table_layout"]

PAPER_TABLES_FILE = Path(__file__).with_name("paper_tables.yaml")


@dataclass(frozen=True)
class PaperCell:
    """One quoted number's place: ``paper`` (citation), ``table`` (``Table 1``), ``row`` and ``column`` as printed."""

    paper: str
    table: str
    row: str
    column: str


@functools.lru_cache(maxsize=1)
def _data() -> dict:
    data = yaml.safe_load(PAPER_TABLES_FILE.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("tables"), dict):
        raise ValueError(f"{PAPER_TABLES_FILE}: expected a mapping with 'papers' and 'tables'")
    return data


def table_layout(table: str) -> dict | None:
    """The raw layout of one table key (``table1``, ``supp4``) from the data file, or None (e.g. ``demo``)."""
    return _data()["tables"].get(table)


def paper_citation(table: str) -> str | None:
    """The paper a table key belongs to (authors, title, venue), or None for a key with no paper table."""
    layout = table_layout(table)
    return None if layout is None else _data()["papers"][layout["paper"]]


def paper_order(table: str, names: list[str]) -> list[str]:
    """``names`` in the paper's row (or, transposed, column) order; entries the file does not place go last, sorted."""
    layout = table_layout(table) or {}
    listed = list(layout.get("columns" if layout.get("transposed") else "rows") or {})
    return [n for n in listed if n in names] + sorted(n for n in names if n not in listed)


def entry_label(table: str, entry: str) -> str | None:
    """How the paper names an entry's row (transposed tables: its column), e.g. ``+ Ours, ViT-S/8``; None if unplaced."""
    layout = table_layout(table) or {}
    return (layout.get("columns" if layout.get("transposed") else "rows") or {}).get(entry)


def paper_cell(table: str, entry: str, metric: str) -> PaperCell | None:
    """Table, row and column of ``entry``'s quoted ``metric`` (e.g. ``unsup_acc``); None where the file places none.

    Source: the papers in ``../shared/papers`` (DepthG main text Tables 1-6, supplement Tables 3-6).
    """
    layout = table_layout(table)
    if layout is None:
        return None
    if layout.get("transposed"):
        row, column = (layout.get("rows") or {}).get(metric), (layout.get("columns") or {}).get(entry)
    else:
        row = (layout.get("rows") or {}).get(entry)
        column = ((layout.get("entry_columns") or {}).get(entry) or {}).get(metric) \
            or (layout.get("columns") or {}).get(metric)
    if row is None or column is None:
        return None
    return PaperCell(paper_citation(table), layout["label"], str(row), str(column))
