"""One PNG per table (``results/figures/<table>.png``): what every number of RESULTS.md is made of.

Per entry and metric, one lane per fidelity profile: the paper's value (black bar), the published
checkpoint scored by repro (red star), every finished seed (dots) and their mean ± sample std (square
with error bar). A lane without a finished seed is shaded and reads *pending*.

Each PNG carries the sha256 of the numbers it plots in its ``Comment`` text chunk
(``repro-figure <digest>``): :func:`figure_digest` recomputes it from the record, so ``repro compare
--check`` tells a stale figure from a current one without comparing pixels, and a rerun leaves a
current figure's file untouched.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from repro.utils.files import atomic_path
from repro.config.papertables import entry_label
from repro.results.document import FIDELITIES, LABELS

__all__ = ["FIGURE_VERSION", "figure_data", "figure_digest", "read_digest", "write_figure"]

FIGURE_VERSION = 2
"""Bumped whenever the drawing changes, so every figure is redrawn (and a stale one detected)."""

_COLOURS = {"paper": "#1f77b4", "released": "#ff7f0e"}


def figure_data(key: str, title: str, names: list[str], metrics: list[str], record: dict) -> dict:
    """Everything a table's figure shows, as plain JSON data (the digest is taken over it)."""
    lanes = []
    for name in names:
        rec = record["entries"][name]
        ckpt = (rec.get("released_checkpoint") or {}).get("metrics") or {}
        for fid in FIDELITIES:
            group = (rec.get("fidelities") or {}).get(fid) or {}
            seeds = group.get("seeds") or {}
            lanes.append({"entry": name, "label": entry_label(key, name), "fidelity": fid,
                          "paper": {m: (rec.get("paper") or {}).get(m) for m in metrics},
                          "checkpoint": {m: ckpt.get(m) for m in metrics},
                          "seeds": {m: [seeds[s]["final"][m] for s in seeds] for m in metrics},
                          "stats": {m: (group.get("metrics") or {}).get(m) for m in metrics}})
    return {"version": FIGURE_VERSION, "table": key, "title": title, "metrics": metrics, "lanes": lanes}


def figure_digest(data: dict) -> str:
    """sha256 (hex) of :func:`figure_data`'s output as canonical JSON."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_digest(path: str | Path) -> str | None:
    """The digest a figure was drawn from (its ``Comment`` chunk), or None for a missing or foreign file."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            comment = str(getattr(image, "text", {}).get("Comment", ""))
    except (OSError, ValueError):
        return None
    return comment.removeprefix("repro-figure ") if comment.startswith("repro-figure ") else None


def _limits(data: dict, metric: str) -> tuple[float, float]:
    values = [v for lane in data["lanes"] for v in [lane["paper"][metric], lane["checkpoint"][metric],
                                                    *lane["seeds"][metric]] if v is not None]
    if not values:
        return 0.0, 100.0
    lo, hi = min(values), max(values)
    pad = max(2.0, 0.12 * (hi - lo))
    return max(0.0, lo - pad), min(100.0, hi + pad)


def _draw(data: dict, path: Path, digest: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    lanes, metrics = data["lanes"], data["metrics"]
    n = len(lanes)
    width = max(3.0 * len(metrics) + 3.4, 11.0)  # the legend and the title need about 11 inches
    fig, axes = plt.subplots(1, len(metrics), figsize=(width, 0.34 * n + 1.9), sharey=True, squeeze=False)
    ys = list(range(n))[::-1]
    for ax, metric in zip(axes[0], metrics):
        lo, hi = _limits(data, metric)
        ax.set_xlim(lo, hi)
        ax.set_ylim(-0.7, n - 0.3)
        ax.set_title(LABELS[metric], fontsize=10)
        ax.grid(axis="x", color="#dddddd", linewidth=0.6)
        for y, lane in zip(ys, lanes):
            if lane["fidelity"] == FIDELITIES[0] and y != ys[0]:
                ax.axhline(y + 0.5, color="#bbbbbb", linewidth=0.6)
            seeds, stats = lane["seeds"][metric], lane["stats"][metric] or {}
            paper, ckpt = lane["paper"][metric], lane["checkpoint"][metric]
            if paper is not None:
                ax.plot([paper], [y], marker="|", markersize=13, markeredgewidth=2.2, color="black", zorder=4)
            if ckpt is not None:
                ax.plot([ckpt], [y], marker="*", markersize=11, color="#d62728", zorder=5)
            if not seeds:
                ax.axhspan(y - 0.42, y + 0.42, color="#ececec", zorder=0)
                right = paper is None or paper < 0.5 * (lo + hi)  # the side away from the paper's bar
                ax.text(0.985 if right else 0.015, y, "pending", ha="right" if right else "left", va="center",
                        fontsize=7.5, color="#808080", style="italic", zorder=1, transform=ax.get_yaxis_transform())
                continue
            colour = _COLOURS.get(lane["fidelity"], "#2ca02c")
            offsets = [(-0.18 + 0.36 * i / max(len(seeds) - 1, 1)) if len(seeds) > 1 else -0.18
                       for i in range(len(seeds))]
            ax.scatter(seeds, [y + o for o in offsets], s=14, color=colour, alpha=0.75, zorder=3, linewidths=0)
            if stats.get("mean") is not None:
                ax.errorbar([stats["mean"]], [y + 0.16], xerr=[stats["std"] or 0.0], fmt="s", markersize=5,
                            color=colour, ecolor=colour, elinewidth=1.4, capsize=3, zorder=4)
    labels = [f"{lane['entry']} · {lane['fidelity']}" for lane in lanes]
    axes[0][0].set_yticks(ys, labels, fontsize=7.5)
    for ax in axes[0]:
        ax.tick_params(axis="x", labelsize=8)
    handles = [Line2D([], [], marker="|", markersize=11, markeredgewidth=2.2, color="black", linestyle="", label="paper"),
               Line2D([], [], marker="*", markersize=10, color="#d62728", linestyle="", label="published checkpoint"),
               *[Line2D([], [], marker="o", markersize=4, color=c, linestyle="", label=f"seeds ({fid} fidelity)")
                 for fid, c in _COLOURS.items()],
               Line2D([], [], marker="s", markersize=5, color="#555555", linestyle="-", label="mean ± std over seeds")]
    top = 1.0 - 0.62 / fig.get_figheight()  # room for the title and the legend, in inches
    fig.suptitle(f"{data['table']}: {data['title']}  (final checkpoint, percent; shaded lanes: pending)", fontsize=10,
                 y=1.0 - 0.12 / fig.get_figheight(), va="top")
    fig.legend(handles=handles, loc="upper center", ncol=5, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 1.0 - 0.38 / fig.get_figheight()))
    fig.tight_layout(rect=(0, 0, 1, top))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None, "Comment": f"repro-figure {digest}"})
    plt.close(fig)


def write_figure(path: str | Path, data: dict) -> bool:
    """Draw ``data`` (:func:`figure_data`) to ``path`` unless the file there already shows exactly it.

    Returns:
        True if the file was (re)drawn, False if it was current.
    """
    path, digest = Path(path), figure_digest(data)
    if read_digest(path) == digest:
        return False
    _draw(data, path, digest)
    return True
