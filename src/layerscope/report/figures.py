"""Figures drawn from saved tables and images (matplotlib, headless): heatmaps and labelled image grids.

Every function returns a matplotlib Figure; :func:`png_bytes` renders it for the HTML report or a file.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: reports are built on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def png_bytes(fig: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes (closed afterwards)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def heatmaps(
    panels: Sequence[tuple[str, np.ndarray]],
    rows: Sequence[str],
    cols: Sequence[str],
    *,
    title: str = "",
    vmin: float = 0.0,
    vmax: float = 1.0,
    cmap: str = "viridis",
    row_notes: Sequence[str] | None = None,
    cbar_label: str = "",
) -> Figure:
    """Side-by-side heatmaps (one per panel, e.g. per step window) of a rows x cols matrix, values annotated.

    NaN cells are drawn grey. ``row_notes`` are appended to the row labels of the last panel (e.g. a layer's label).
    """
    n = len(panels)
    height = max(2.5, 0.26 * len(rows) + 1.2)
    width = 1.2 + n * (0.55 * len(cols) + 0.6) + (1.6 if row_notes else 0)
    fig, axes = plt.subplots(1, n, figsize=(width, height), squeeze=False, sharey=True)
    cm = plt.get_cmap(cmap).with_extremes(bad="#d0d0d0")
    im = None
    for k, (name, mat) in enumerate(panels):
        ax = axes[0, k]
        m = np.ma.masked_invalid(np.asarray(mat, dtype=float))
        im = ax.imshow(m, vmin=vmin, vmax=vmax, cmap=cm, aspect="auto", interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels(cols, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(rows, fontsize=7)
        if len(rows) * len(cols) <= 160:  # beyond that the numbers are too small to read
            for (i, j), v in np.ndenumerate(np.asarray(mat, dtype=float)):
                if not np.isnan(v):
                    ax.text(
                        j,
                        i,
                        f"{v:.2f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if v < (vmin + vmax) / 2 else "black",
                    )
        if row_notes is not None and k == n - 1:
            ax2 = ax.twinx()
            ax2.set_ylim(ax.get_ylim())
            ax2.set_yticks(range(len(rows)))
            ax2.set_yticklabels(row_notes, fontsize=7)
    if im is not None:
        cb = fig.colorbar(im, ax=axes[0, :].tolist(), fraction=0.03, pad=0.12 if row_notes else 0.02)
        cb.set_label(cbar_label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def image_grid(
    rows: Sequence[tuple[str, np.ndarray]], col_labels: Sequence[str], *, title: str = "", cell: float = 0.62
) -> Figure:
    """A grid of images: one row per (label, uint8 array (k, 3, H, W)), columns labelled (e.g. O, E, layers)."""
    ncol = max(len(imgs) for _, imgs in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(0.8 + cell * ncol, 0.35 + cell * len(rows) + 1.0), squeeze=False)
    for r, (name, imgs) in enumerate(rows):
        for c in range(ncol):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if c < len(imgs):
                ax.imshow(np.asarray(imgs[c]).transpose(1, 2, 0), interpolation="nearest")
            if r == 0 and c < len(col_labels):
                ax.set_title(col_labels[c], fontsize=6, rotation=70, ha="left", va="bottom", rotation_mode="anchor")
            if c == 0:
                ax.set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    fig.subplots_adjust(wspace=0.05, hspace=0.05)
    if title:
        fig.suptitle(title, fontsize=10, y=1.0 + 0.9 / (cell * len(rows) + 1.4))
    return fig
