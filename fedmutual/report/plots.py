"""Accuracy curves as PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CURVES = (
    ("global_acc", "global model, test set"),
    ("client_acc_global_test_mean", "client models, test set (mean)"),
    ("current_acc_global_test_mean", "current client models, test set (mean)"),
    ("personal_acc_mean", "client models, own validation (mean)"),
)


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [100.0 * p[1] for p in pts]


def plot_run(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> None:
    """Accuracy per round of one run."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in CURVES:
        xs, ys = _series(rows, key)
        if xs:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    alphas = [(r["round"], r["alpha"]) for r in rows if r.get("alpha") is not None]
    if alphas and len({a for _, a in alphas}) > 1:  # a moving loss weight (e.g. DFML's cyclic alpha)
        ax2 = ax.twinx()
        (line,) = ax2.plot([a[0] for a in alphas], [a[1] for a in alphas], color="gray", ls="--", lw=1)
        ax2.set_ylabel("alpha")
        ax2.set_ylim(0, 1.05)
        handles, labels = handles + [line], labels + ["alpha (right axis)"]
    ax.legend(handles, labels, loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_compare(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, title: str = "") -> None:
    """Overlay of several runs: the global model where there is one, else the clients' mean."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in runs.items():
        key = "global_acc" if any(r.get("global_acc") is not None for r in rows) else "client_acc_global_test_mean"
        xs, ys = _series(rows, key)
        ax.plot(xs, ys, label=f"{name} ({'global' if key == 'global_acc' else 'client mean'})")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
