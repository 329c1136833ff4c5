"""Plain-text and markdown tables of results."""

from __future__ import annotations

from typing import Any, Mapping, Sequence


def pct(v: float | None) -> str:
    return "–" if v is None else f"{100.0 * v:.2f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-style markdown table; a ``|`` inside a cell (e.g. a ``groups:`` task) is escaped."""
    cell = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_rows(summaries: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """One row per run: final and best accuracies (%), bytes and time."""
    header = ["method", "global final", "global best", "clients test final", "personal val final",
              "personal val best", "MB up", "seconds"]
    rows = []
    for name, s in summaries.items():
        rows.append([
            name, pct(s.get("final_global_acc")), pct(s.get("best_global_acc")),
            pct(s.get("final_client_acc_global_test_mean")), pct(s.get("final_personal_acc_mean")),
            pct(s.get("best_personal_acc_mean")), f"{s.get('total_bytes_up', 0) / 1e6:.1f}",
            f"{s.get('total_seconds', 0.0):.0f}",
        ])
    return header, rows


def client_series(rows: Sequence[Mapping[str, Any]], key: str, k: int) -> list[float]:
    """Client k's values of a per-client metric (e.g. ``personal_acc``) over the evaluated rounds."""
    return [r[key][k] for r in rows if r.get(key) is not None and r[key][k] is not None]


def client_rows(
    fml: Sequence[Mapping[str, Any]], baseline: Sequence[Mapping[str, Any]], key: str, labels: Sequence[str]
) -> tuple[list[str], list[list[str]]]:
    """One row per client: best and final of ``key`` under FML and under the baseline (%), and the gains.

    ``labels`` name each client (e.g. its model and task). Best is the maximum over rounds: optimistic.
    """
    header = ["client", "FML best", "FML final", "alone best", "alone final", "gain best", "gain final"]
    out = []
    for k, label in enumerate(labels):
        a, b = client_series(fml, key, k), client_series(baseline, key, k)
        if not a or not b:
            out.append([label, "–", "–", "–", "–", "–", "–"])
            continue
        gain = lambda x, y: f"{100.0 * (x - y):+.2f}"  # noqa: E731
        out.append([label, pct(max(a)), pct(a[-1]), pct(max(b)), pct(b[-1]), gain(max(a), max(b)), gain(a[-1], b[-1])])
    return header, out
