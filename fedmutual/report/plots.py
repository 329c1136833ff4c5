"""Accuracy curves as PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CURVES = (
    ("global_acc", "global model, test set"),
    ("client_acc_global_test_mean", "client models, test set (mean)"),
    ("current_acc_global_test_mean", "current client models, test set (mean)"),
    ("meme_acc_global_test_mean", "global encoder + each client's head, own task's test set (mean)"),
    ("personal_acc_mean", "client models, own validation (mean)"),
)


#: Distinct line styles and markers, so that no curve hides another of the same colour or under it.
STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ("-", "v"), ("--", "P"), (":", "X"), ("-.", "*"))


def _integer_rounds(ax: Any) -> None:
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))


def save(fig: Any, path: str | Path, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Save a figure as PNG (for screens) and PDF (vector, for papers); returns the files written."""
    base = Path(path)
    base = base.with_suffix("") if base.suffix in (".png", ".pdf", ".svg") else base
    out = []
    for fmt in formats:
        target = base.with_suffix(f".{fmt}")
        fig.savefig(target, dpi=150 if fmt == "png" else None)
        out.append(target)
    plt.close(fig)
    return out


def band_plot(panels: Mapping[str, Mapping[str, Sequence[Sequence[Mapping[str, Any]]]]], path: str | Path) -> list[Path]:
    """Small multiples, one panel per setting: each method's mean accuracy per round over its runs (seeds), with a
    band of ± one standard deviation. The global model where a method has one, else the clients' mean."""
    import numpy as np

    n = max(1, len(panels))
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    methods = sorted({m for p in panels.values() for m in p})
    for ax, (title, by_method) in zip(axes.flat, panels.items()):
        for name, runs in sorted(by_method.items()):
            i = methods.index(name)
            key = "global_acc" if any(r.get("global_acc") is not None for rs in runs for r in rs) else "client_acc_global_test_mean"
            rounds = sorted({r["round"] for rs in runs for r in rs if r.get(key) is not None})
            if not rounds:
                continue
            vals = [[next((100.0 * r[key] for r in rs if r["round"] == t and r.get(key) is not None), np.nan) for rs in runs] for t in rounds]
            arr = np.array(vals, dtype=float)
            mean = np.nanmean(arr, axis=1)
            sd = np.nanstd(arr, axis=1, ddof=1) if arr.shape[1] > 1 else np.zeros(len(rounds))
            ls, marker = STYLES[i % len(STYLES)]
            line, = ax.plot(rounds, mean, ls=ls, marker=marker, ms=3, markevery=max(1, len(rounds) // 10),
                            label=f"{name} ({'global' if key == 'global_acc' else 'clients'}, n={arr.shape[1]})")
            ax.fill_between(rounds, mean - sd, mean + sd, color=line.get_color(), alpha=0.18, lw=0)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (%)")
        _integer_rounds(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    return save(fig, path)


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [100.0 * p[1] for p in pts]


def plot_run(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> list[Path]:
    """Accuracy per round of one run (PNG and PDF)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (key, label) in enumerate(CURVES):
        xs, ys = _series(rows, key)
        if xs:
            ls, marker = STYLES[i % len(STYLES)]
            ax.plot(xs, ys, ls=ls, marker=marker, ms=3, markevery=max(1, len(xs) // 15), label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _integer_rounds(ax)
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
    return save(fig, path)


def plot_compare(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, title: str = "") -> list[Path]:
    """Several runs side by side: the test accuracy (the global model where there is one, else the clients' mean)
    and the personalized accuracy (each client's model on its own validation split, mean); PNG and PDF.
    Every method has its own line style and marker, so that no curve hides another."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (name, rows) in enumerate(runs.items()):
        ls, marker = STYLES[i % len(STYLES)]
        key = "global_acc" if any(r.get("global_acc") is not None for r in rows) else "client_acc_global_test_mean"
        xs, ys = _series(rows, key)
        every = max(1, len(xs) // 15)
        ax.plot(xs, ys, ls=ls, marker=marker, ms=4, markevery=every, label=f"{name} ({'global' if key == 'global_acc' else 'client mean'})")
        xs, ys = _series(rows, "personal_acc_mean")
        if xs:
            ax2.plot(xs, ys, ls=ls, marker=marker, ms=4, markevery=every, label=name)
    for a, ylabel, sub in ((ax, "test accuracy (%)", "test set"), (ax2, "personalized accuracy (%)", "each client's own validation split (mean)")):
        a.set_xlabel("round")
        a.set_ylabel(ylabel)
        a.set_title(sub, fontsize=9)
        a.grid(alpha=0.3)
        _integer_rounds(a)
        a.legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def plot_clients(
    fml: Sequence[Mapping[str, Any]],
    baseline: Sequence[Mapping[str, Any]],
    path: str | Path,
    labels: Sequence[str],
    key: str = "personal_acc",
    style: str = "best",
    title: str = "",
) -> list[Path]:
    """Each client's accuracy per round under FML (solid) against the same model trained alone (dashed).

    ``style="best"`` draws the baseline as a horizontal line at its best accuracy (the FML paper's
    Fig. 5); ``style="curve"`` draws its whole curve (Fig. 6). Up to 8 clients share one panel, one colour
    each; more get one small panel each, so that the figure stays readable. PNG and PDF.
    """
    n = len(labels)
    single = n <= 8
    cols = 1 if single else min(5, n)
    nrows = 1 if single else (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(7, 4.5) if single else (2.6 * cols, 2.1 * nrows), squeeze=False, sharey=not single)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, label in enumerate(labels):
        ax = axes[0][0] if single else axes.flat[k]
        color = colors[k % len(colors)] if single else colors[0]
        pts = [(r["round"], 100.0 * r[key][k]) for r in fml if r.get(key) is not None and r[key][k] is not None]
        base = [(r["round"], 100.0 * r[key][k]) for r in baseline if r.get(key) is not None and r[key][k] is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, lw=1.5, label=f"{label}, FML" if single else "FML")
        base_color = color if single else colors[1]
        if base and style == "best":
            ax.axhline(max(b[1] for b in base), color=base_color, ls="--", lw=1, label=f"{label}, alone (best)" if single else "alone (best)")
        elif base:
            ax.plot([b[0] for b in base], [b[1] for b in base], color=base_color, ls="--", lw=1, label=f"{label}, alone" if single else "alone")
        if not single:
            ax.set_title(label, fontsize=7)
            ax.tick_params(labelsize=6)
            ax.grid(alpha=0.3)
            _integer_rounds(ax)
    if single:
        ax = axes[0][0]
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy (%), " + ("own validation split" if key == "personal_acc" else "test set"))
        _integer_rounds(ax)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=7, ncol=2)
    else:
        for ax in list(axes.flat)[n:]:
            ax.set_visible(False)
        axes.flat[0].legend(fontsize=6, loc="lower right")
        fig.supxlabel("round", fontsize=8)
        fig.supylabel("accuracy (%), " + ("own validation split" if key == "personal_acc" else "test set"), fontsize=8)
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save(fig, path)
