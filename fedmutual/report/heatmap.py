"""A heat map of the label distribution over clients, as a PNG file.

Shows at a glance what a partition did: clients on the y axis, classes on
the x axis, the colour the number of training samples of that class on that
client (with the counts written in the cells when the table is small enough
to read them).
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedmutual.errors import DataError  # noqa: E402

__all__ = ["save_label_heatmap", "ANNOTATE_MAX_CELLS"]

#: Counts are written into the cells when clients * classes is at most this.
ANNOTATE_MAX_CELLS = 400


def save_label_heatmap(
    table: np.ndarray,
    path: str | os.PathLike,
    classes: list[str] | None = None,
    title: str | None = None,
) -> None:
    """Draw ``table`` (int ``[clients, classes]`` counts) as a heat map and save it as a PNG."""
    t = np.asarray(table)
    if t.ndim != 2 or t.size == 0:
        raise DataError(
            f"a label table must be a non-empty 2-D array [clients, classes], got shape {t.shape}."
        )
    k, c = t.shape
    if classes is not None and len(classes) != c:
        raise DataError(f"{len(classes)} class names given for a table with {c} classes.")
    fig, ax = plt.subplots(figsize=(min(2.0 + 0.6 * c, 24.0), min(1.5 + 0.35 * k, 24.0)))
    try:
        image = ax.imshow(t, aspect="auto", cmap="viridis", interpolation="nearest")
        fig.colorbar(image, ax=ax, label="training samples")
        ax.set_xlabel("class")
        ax.set_ylabel("client")
        if c <= 100:
            ax.set_xticks(range(c))
            ax.set_xticklabels(list(classes) if classes is not None else [str(j) for j in range(c)],
                               rotation=45 if classes is not None else 0, ha="right" if classes is not None else "center")
        if k <= 50:
            ax.set_yticks(range(k))
            ax.set_yticklabels([str(i) for i in range(k)])
        if k * c <= ANNOTATE_MAX_CELLS:
            threshold = (float(t.max()) + float(t.min())) / 2
            size = 8 if k * c <= 100 else 6
            for i in range(k):
                for j in range(c):
                    v = t[i, j]
                    ax.text(j, i, str(int(v)), ha="center", va="center", fontsize=size,
                            color="black" if v > threshold else "white")
        if title:
            ax.set_title(title)
        fig.tight_layout()
        fig.savefig(Path(path), format="png", dpi=100)
    finally:
        plt.close(fig)
