"""Run files: ``metrics.jsonl`` (one object per round) and ``summary.json``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

# Metrics summarized as final and best; "best" is the maximum over rounds and therefore optimistic.
SUMMARY_KEYS = ("global_acc", "client_acc_global_test_mean", "personal_acc_mean")


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, list):
        return [_clean(x) for x in v]
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    return v


class MetricsWriter:
    """Appends one JSON line per round and flushes it to disk at once, so a crash loses nothing written."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []

    def write(self, row: dict[str, Any]) -> None:
        row = _clean(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(row)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a ``metrics.jsonl``."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(rows: Iterable[dict[str, Any]], status: str = "completed") -> dict[str, Any]:
    """Final and best value of each accuracy metric (best = max over rounds, an optimistic figure)."""
    rows = list(rows)
    out: dict[str, Any] = {"status": status, "rounds_completed": len(rows)}
    extra = sorted({k for r in rows for k in r if k.endswith("_acc_global_test_mean")} - set(SUMMARY_KEYS))
    for key in (*SUMMARY_KEYS, *extra):
        series = [(r["round"], r.get(key)) for r in rows if r.get(key) is not None]
        out[f"final_{key}"] = series[-1][1] if series else None
        if series:
            best_round, best = max(series, key=lambda s: (s[1], -s[0]))
            out[f"best_{key}"], out[f"best_{key}_round"] = best, best_round
        else:
            out[f"best_{key}"], out[f"best_{key}_round"] = None, None
    out["total_bytes_up"] = sum(r.get("bytes_up", 0) for r in rows)
    out["total_bytes_down"] = sum(r.get("bytes_down", 0) for r in rows)
    out["total_seconds"] = sum(r.get("seconds", 0.0) for r in rows)
    out["note"] = "best_* is the maximum over rounds, an optimistic estimate; final_* is the last evaluated round"
    return out


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(data), indent=2) + "\n")
    os.replace(tmp, path)
