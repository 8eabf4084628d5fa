"""Evaluation figures: qualitative rows (image | ground truth | prediction | depth) and the
confusion matrix heatmap, as in the qualitative figures of STEGO (Hamilton et al., ICLR
2022, Fig. 5) and DepthG (Sick et al., CVPR 2024, Fig. 4).

Figures are drawn on a bare :class:`matplotlib.figure.Figure` with the Agg canvas (no
pyplot, no global backend switch, safe in worker processes) and written atomically.

Colours: class ``k`` always has ``class_palette(K)[k]``; ignored pixels (ground truth
outside ``[0, K)``, e.g. ``-1`` or ``255``) and unmatched predictions (``-1``) are black.
The panels of the qualitative figure are placed pixel for pixel (no resampling), so the
prediction panel holds exactly the palette colours of the predicted classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from repro.utils.files import atomic_path

__all__ = [
    "IGNORE_COLOR",
    "class_palette",
    "colorize_depth",
    "colorize_labels",
    "confusion_fractions",
    "save_confusion_figure",
    "save_qualitative_figure",
]

IGNORE_COLOR = (0, 0, 0)

_DPI = 100
_MARGIN = 10  # px
_GAP = 6  # px between panels
_TITLE_H = 30  # px
_HEADER_H = 22  # px
_LEGEND_ROW_H = 18  # px per legend entry at font size 9
_FONT = 9


def class_palette(num_classes: int) -> np.ndarray:
    """A fixed, distinct colour per class.

    The first 60 colours are matplotlib's ``tab10`` (the strong half of ``tab20``), the
    light half of ``tab20``, then ``tab20b`` and ``tab20c``; further classes get evenly
    spread hues. No colour is black (black marks ignored pixels) and no two are equal.

    Args:
        num_classes: Number ``K >= 1`` of classes.

    Returns:
        ``np.uint8`` array of shape ``(K, 3)``, RGB.

    Raises:
        ValueError: If ``K < 1``.
    """
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    tab20 = colormaps["tab20"].colors
    colors = [tab20[i] for i in range(0, 20, 2)] + [tab20[i] for i in range(1, 20, 2)]
    colors += list(colormaps["tab20b"].colors) + list(colormaps["tab20c"].colors)
    out: list[tuple[int, int, int]] = []
    for rgb in colors:
        c = tuple(int(round(255 * v)) for v in rgb[:3])
        if c not in out and c != IGNORE_COLOR:
            out.append(c)
    i = 0
    while len(out) < num_classes:
        # golden-ratio hue steps, alternating brightness; never black
        hue = (i * 0.618033988749895) % 1.0
        value = 0.95 if i % 2 == 0 else 0.7
        c = tuple(int(round(255 * v)) for v in _hsv_to_rgb(hue, 0.75, value))
        if c not in out:
            out.append(c)
        i += 1
    return np.asarray(out[:num_classes], dtype=np.uint8)


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    i = int(h * 6.0) % 6
    f = h * 6.0 - int(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


def colorize_labels(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Paint a class map with a palette.

    Args:
        label: Integer array of shape ``(H, W)``; values in ``[0, K)`` are classes, any
            other value (``-1``, ``255``) is painted black.
        palette: ``(K, 3)`` uint8 colours, e.g. :func:`class_palette`.

    Returns:
        ``np.uint8`` array of shape ``(H, W, 3)``.

    Raises:
        ValueError: If ``label`` is not 2-D or not integer.
    """
    label = np.asarray(label)
    if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"a class map must be a 2-D integer array, got shape {label.shape} dtype {label.dtype}")
    palette = np.asarray(palette, dtype=np.uint8)
    out = np.zeros(label.shape + (3,), dtype=np.uint8)
    valid = (label >= 0) & (label < len(palette))
    out[valid] = palette[label[valid]]
    return out


def colorize_depth(depth: np.ndarray, cmap: str = "magma") -> np.ndarray:
    """Paint a normalised depth map with a colour map.

    Args:
        depth: Float array of shape ``(H, W)``, normalised depth in ``[0, 1]`` (values
            outside are clipped; NaN/inf are painted black).
        cmap: Name of a matplotlib colour map.

    Returns:
        ``np.uint8`` array of shape ``(H, W, 3)``.

    Raises:
        ValueError: If ``depth`` is not 2-D.
    """
    depth = np.asarray(depth, dtype=np.float64)
    if depth.ndim != 2:
        raise ValueError(f"a depth map must be 2-D (H, W), got shape {depth.shape}")
    finite = np.isfinite(depth)
    rgba = colormaps[cmap](np.clip(np.where(finite, depth, 0.0), 0.0, 1.0), bytes=True)
    rgb = np.ascontiguousarray(rgba[..., :3])
    rgb[~finite] = 0
    return rgb


def _save_atomic(fig: Figure, path: str | Path, **kwargs) -> Path:
    """Render ``fig`` with Agg into a temporary file next to ``path``, then rename it."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, format=fmt, **kwargs)
    return path


def _check_image(i: int, image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"images[{i}] must be a (H, W, 3) uint8 array, got shape {image.shape} dtype {image.dtype}")
    return image


def save_qualitative_figure(
    path: str | Path,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    predictions: Sequence[np.ndarray],
    depths: Sequence[np.ndarray] | None,
    class_names: Sequence[str],
    title: str = "",
    *,
    max_panel_width: int = 640,
) -> Path:
    """Write a qualitative figure: one row per image, columns image | ground truth |
    prediction | depth, and a legend of the class colours.

    Panels are drawn unresampled, one array pixel per figure pixel; an image wider than
    ``max_panel_width`` is subsampled by the smallest integer step that fits (nearest
    neighbour, so class maps keep exact colours).

    Source: the qualitative comparisons of STEGO (ICLR 2022, Fig. 5) and DepthG (CVPR
    2024, Fig. 4).

    Args:
        path: Output file (``.png`` recommended; the suffix selects the format). Parent
            folders are created; the file is written atomically.
        images: ``N`` RGB images, each ``(H_i, W_i, 3)`` uint8.
        labels: ``N`` ground-truth maps ``(H_i, W_i)``, int; ``-1`` (or any value outside
            ``[0, K)``) is ignore and painted black.
        predictions: ``N`` predicted class maps ``(H_i, W_i)``, int in ``[0, K)``, already
            mapped to classes (e.g. cluster ids through the Hungarian ``assignment`` of
            :class:`repro.evaluate.metrics.SegmentationMetrics`); ``-1`` (an unmatched
            cluster) is painted black.
        depths: ``N`` depth maps ``(H_i, W_i)``, float, normalised to ``[0, 1]``, or
            ``None`` to leave the depth column out.
        class_names: ``K`` class names, index = class id.
        title: Figure title (omitted when empty).
        max_panel_width: Widest panel in pixels.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: On empty input, lists of different lengths, shape mismatches, wrong
            dtypes, or a prediction outside ``[-1, K)``.
    """
    n = len(images)
    if n == 0:
        raise ValueError("save_qualitative_figure needs at least one image")
    if len(labels) != n or len(predictions) != n or (depths is not None and len(depths) != n):
        raise ValueError(
            f"images, labels, predictions and depths must have the same length, got {n}, {len(labels)}, "
            f"{len(predictions)}, {None if depths is None else len(depths)}"
        )
    num_classes = len(class_names)
    if num_classes < 1:
        raise ValueError("class_names must not be empty")
    if int(max_panel_width) < 1:
        raise ValueError(f"max_panel_width must be >= 1, got {max_panel_width}")
    palette = class_palette(num_classes)

    rows: list[list[np.ndarray]] = []
    for i in range(n):
        image = _check_image(i, images[i])
        h, w = image.shape[:2]
        label, pred = np.asarray(labels[i]), np.asarray(predictions[i])
        maps = [("labels", label), ("predictions", pred)]
        if depths is not None:
            maps.append(("depths", np.asarray(depths[i])))
        for name, arr in maps:
            if arr.shape != (h, w):
                raise ValueError(f"{name}[{i}] has shape {arr.shape}, expected {(h, w)} like images[{i}]")
        if not np.issubdtype(pred.dtype, np.integer):
            raise ValueError(f"predictions[{i}] must hold integer class ids, got dtype {pred.dtype}")
        if pred.size and (pred.min() < -1 or pred.max() >= num_classes):
            raise ValueError(
                f"predictions[{i}] holds ids in [{pred.min()}, {pred.max()}]; expected classes in [0, {num_classes}) "
                "or -1 (unmatched); map cluster ids to classes first"
            )
        step = max(1, math.ceil(w / int(max_panel_width)))
        panels = [image, colorize_labels(label, palette), colorize_labels(pred, palette)]
        if depths is not None:
            panels.append(colorize_depth(maps[2][1]))
        rows.append([np.ascontiguousarray(p[::step, ::step]) for p in panels])

    headers = ["image", "ground truth", "prediction"] + (["depth"] if depths is not None else [])
    cell_w = max(p.shape[1] for row in rows for p in row)
    cell_h = max(p.shape[0] for row in rows for p in row)
    title_h = _TITLE_H if title else 0
    grid_h = _MARGIN + title_h + _HEADER_H + n * (cell_h + _GAP) - _GAP + _MARGIN
    legend_names = list(class_names) + ["ignore / unmatched"]
    per_col = max(1, (grid_h - title_h - 2 * _MARGIN) // _LEGEND_ROW_H)
    legend_cols = math.ceil(len(legend_names) / per_col)
    col_w = 36 + 7 * max(len(str(s)) for s in legend_names)
    legend_w = legend_cols * col_w + 10
    fig_w = _MARGIN + len(headers) * (cell_w + _GAP) + legend_w + _MARGIN
    fig_h = grid_h

    # +0.01 px: Agg truncates the pixel size, so keep it from rounding down
    fig = Figure(figsize=((fig_w + 0.01) / _DPI, (fig_h + 0.01) / _DPI), dpi=_DPI, facecolor="white")
    if title:
        fig.text(0.5, 1 - (_MARGIN + title_h / 2) / fig_h, title, ha="center", va="center", fontsize=_FONT + 3)
    top0 = _MARGIN + title_h + _HEADER_H
    for c, header in enumerate(headers):
        x = _MARGIN + c * (cell_w + _GAP)
        fig.text((x + cell_w / 2) / fig_w, 1 - (top0 - _HEADER_H / 2) / fig_h, header,
                 ha="center", va="center", fontsize=_FONT + 1)
        for r, row in enumerate(rows):
            panel = row[c]
            top = top0 + r * (cell_h + _GAP)
            fig.figimage(panel, xo=x, yo=fig_h - top - panel.shape[0], origin="upper", resize=False)
    handles = [Patch(facecolor=palette[k] / 255.0, edgecolor="none", label=str(name))
               for k, name in enumerate(class_names)]
    handles.append(Patch(facecolor=np.asarray(IGNORE_COLOR) / 255.0, edgecolor="none", label=legend_names[-1]))
    legend_x = _MARGIN + len(headers) * (cell_w + _GAP) + 4
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(legend_x / fig_w, 1 - (top0 - 4) / fig_h),
               ncol=legend_cols, frameon=False, fontsize=_FONT, handlelength=1.2, handleheight=1.0,
               borderaxespad=0.0, columnspacing=1.0)
    return _save_atomic(fig, path, dpi=_DPI)


def confusion_fractions(matrix: np.ndarray) -> np.ndarray:
    """Normalise confusion counts per ground-truth class (the values the heatmap shows).

    Args:
        matrix: Counts of shape ``(K_pred, K)``, rows = predictions (mapped to classes),
            columns = ground truth, as in :mod:`repro.evaluate.metrics`.

    Returns:
        ``float64`` array of shape ``(K, K_pred)`` (transposed: one row per ground-truth
        class); row ``k`` is the fraction of class ``k``'s pixels predicted as each class
        and sums to 1, or is all ``NaN`` when class ``k`` has no pixels.

    Raises:
        ValueError: If ``matrix`` is not 2-D or holds negative or non-finite values.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] < 1 or m.shape[1] < 1:
        raise ValueError(f"matrix must be 2-D (K_pred, K) and non-empty, got shape {m.shape}")
    if not np.all(np.isfinite(m)) or (m < 0).any():
        raise ValueError("matrix must hold finite, non-negative counts")
    per_class = m.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(per_class[:, None] > 0, m.T / per_class[:, None], np.nan)


def save_confusion_figure(
    path: str | Path,
    matrix: np.ndarray,
    class_names: Sequence[str],
    title: str = "",
) -> Path:
    """Write a confusion-matrix heatmap, normalised per ground-truth class.

    Orientation of the input follows :mod:`repro.evaluate.metrics`: ``matrix[p, k]``
    counts pixels predicted as class ``p`` (rows, predictions already mapped to classes,
    e.g. :attr:`SegmentationMetrics.confusion`) whose ground truth is ``k`` (columns).
    The figure shows it transposed: one row per ground-truth class, holding the fraction
    of that class's pixels predicted as each class, so every non-empty row sums to 1
    (the diagonal is the per-class recall). Ground-truth classes without pixels are grey.

    Source: evaluation protocol of STEGO (ICLR 2022, Sec. 4) / DepthG (CVPR 2024, Sec. 4).

    Args:
        path: Output file (``.png`` recommended); parent folders are created; written
            atomically.
        matrix: Non-negative counts of shape ``(K_pred, K)``. Rows ``p >= K`` (extra
            clusters) are labelled ``extra <p>``.
        class_names: ``K`` class names (the columns of ``matrix``).
        title: Figure title (omitted when empty).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: If ``matrix`` is not 2-D, has negative or non-finite entries, or its
            number of columns differs from ``len(class_names)``.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] < 1 or m.shape[1] < 1:
        raise ValueError(f"matrix must be 2-D (K_pred, K) and non-empty, got shape {m.shape}")
    num_pred, num_classes = m.shape
    if len(class_names) != num_classes:
        raise ValueError(f"matrix has {num_classes} ground-truth columns but {len(class_names)} class names")
    shown = confusion_fractions(m)  # (K, K_pred)
    pred_names = [str(class_names[p]) if p < num_classes else f"extra {p}" for p in range(num_pred)]

    side = 2.5 + 0.32 * max(num_classes, num_pred)
    fig = Figure(figsize=(side + 1.5, side + (0.4 if title else 0.0)), dpi=_DPI, facecolor="white")
    ax = fig.add_subplot(1, 1, 1)
    cmap = colormaps["Blues"].with_extremes(bad="0.85")
    im = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(num_pred), pred_names, rotation=90, fontsize=_FONT)
    ax.set_yticks(range(num_classes), [str(s) for s in class_names], fontsize=_FONT)
    ax.set_xlabel("prediction (mapped to classes)")
    ax.set_ylabel("ground truth")
    if num_classes * num_pred <= 400:
        for k in range(num_classes):
            for p in range(num_pred):
                v = shown[k, p]
                if np.isfinite(v) and v >= 0.005:
                    ax.text(p, k, f"{100 * v:.0f}", ha="center", va="center", fontsize=_FONT - 2,
                            color="white" if v > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of ground-truth pixels")
    if title:
        ax.set_title(title, fontsize=_FONT + 2)
    fig.tight_layout()
    return _save_atomic(fig, path, dpi=_DPI)
