"""Several algorithms on the same data, partition and seed, side by side."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Sequence

from fedmutual.config import Config
from fedmutual.engine.runner import RunResult, prepare_data, run
from fedmutual.errors import ConfigError
from fedmutual.report.plots import plot_compare
from fedmutual.report.tables import markdown_table, summary_rows


@dataclass
class CompareResult:
    out_dir: Path
    runs: dict[str, RunResult]
    table: str


def compare(cfg: Config, algorithms: Sequence[str], quiet: bool = False) -> CompareResult:
    """Run each algorithm with ``cfg`` (only the algorithm changes) and write ``compare.md`` and ``compare.png``."""
    from fedmutual.config import ALGORITHMS

    bad = [a for a in algorithms if a not in ALGORITHMS]
    if bad or not algorithms:
        raise ConfigError(f"--algorithms: unknown {', '.join(bad) or '(none given)'}; allowed: {', '.join(ALGORITHMS)}")
    out_dir = Path(cfg.out) / (cfg.name or f"compare-{cfg.dataset}-{cfg.partition.replace(':', '')}-{cfg.model_label}-s{cfg.seed}-{datetime.now():%Y%m%d-%H%M%S}")
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, RunResult] = {}
    data = prepare_data(cfg)  # one partition for every algorithm
    for a in algorithms:
        if not quiet:
            print(f"== {a} ==", file=sys.stderr, flush=True)
        runs[a] = run(cfg.model_copy(update={"algorithm": a, "out": str(out_dir), "name": a}), quiet=quiet, data=data)
    header, rows = summary_rows({a: r.summary for a, r in runs.items()})
    title = f"{cfg.dataset}, {cfg.partition}, {cfg.clients} clients, {cfg.model_label}, {cfg.rounds} rounds, E={cfg.local_epochs}, seed {cfg.seed}"
    table = f"Top-1 accuracy (%) — {title}\n\n" + markdown_table(header, rows) + "\n\n" \
        "best = maximum over rounds (optimistic); final = last round. global = the global model on the full test set; " \
        "clients test = each client's deployable model on the full test set (mean); personal val = the same on its own validation split.\n"
    (out_dir / "compare.md").write_text(table)
    plot_compare({a: r.metrics for a, r in runs.items()}, out_dir / "compare.png", title)
    if not quiet:
        print(table)
        print(f"compare directory: {out_dir}")
    return CompareResult(out_dir, runs, table)
