"""Plain-text and markdown tables of results."""

from __future__ import annotations

from typing import Any, Mapping, Sequence


def pct(v: float | None) -> str:
    return "–" if v is None else f"{100.0 * v:.2f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-style markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
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
