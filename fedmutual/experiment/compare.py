"""Several algorithms on the same data, partition and seed, side by side."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Sequence

import numpy as np

from fedmutual.config import Config, validate
from fedmutual.data import ArrayDataset
from fedmutual.errors import ConfigError
from fedmutual.experiment.data import prepare_data
from fedmutual.experiment.runner import RunResult, run
from fedmutual.registry import ALGORITHMS
from fedmutual.report.plots import plot_clients, plot_compare
from fedmutual.report.tables import client_rows, markdown_table, summary_rows


@dataclass
class CompareResult:
    out_dir: Path
    runs: dict[str, RunResult]
    table: str


def compare(cfg: Config, algorithms: Sequence[str], quiet: bool = False, data: ArrayDataset | None = None,
            partition: Sequence[np.ndarray] | None = None) -> CompareResult:
    """Run each algorithm with ``cfg`` (only the algorithm changes) and write ``compare.md`` and ``compare.png``.

    Every run gets the same data and partition: the config's, or ``data`` (e.g. from_arrays) and ``partition``
    (each client's training indices) given from Python.
    """
    bad = [a for a in algorithms if a not in ALGORITHMS]
    if bad or not algorithms:
        raise ConfigError(f"--algorithms: unknown {', '.join(bad) or '(none given)'}; allowed: {', '.join(ALGORITHMS.names())}, "
                          "or import strings such as mypackage.module:Name")
    configs = {a: validate({**cfg.to_dict(all_tables=True), "algorithm": a}) for a in algorithms}  # each checked before anything runs
    out_dir = Path(cfg.out) / (cfg.name or f"compare-{cfg.dataset}-{cfg.partition.replace(':', '')}-{cfg.model_label}-s{cfg.seed}-{datetime.now():%Y%m%d-%H%M%S}")
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, RunResult] = {}
    prepared = prepare_data(cfg, data, partition, cfg.resolved_val_source())  # one partition for every algorithm
    for a, acfg in configs.items():
        if not quiet:
            print(f"== {a} ==", file=sys.stderr, flush=True)
        name = a.rsplit(":", 1)[-1] if ":" in a else a
        runs[a] = run(validate({**acfg.to_dict(), "out": str(out_dir), "name": name}), quiet=quiet, data=prepared)
    header, rows = summary_rows({a: r.summary for a, r in runs.items()})
    title = f"{cfg.dataset}, {cfg.partition}, {cfg.clients} clients, {cfg.model_label}, {cfg.rounds} rounds, E={cfg.local_epochs}, seed {cfg.seed}"
    table = f"Top-1 accuracy (%) — {title}\n\n" + markdown_table(header, rows) + "\n\n" \
        "best = maximum over rounds (optimistic); final = last round. global = the global model on the full test set; " \
        "clients test = each client's deployable model on the full test set (mean); personal val = the same on its own validation split.\n"
    # each client's personalized model against the same model trained alone (FML's Fig. 5 and 6)
    baseline = next((a for a in runs if ALGORITHMS.get(a).alone), None)
    personal = next((a for a in runs if ALGORITHMS.get(a).personalized), None)
    if personal is not None and baseline is not None:
        table += "\n" + per_client_report(cfg, runs[personal].metrics, runs[baseline].metrics, out_dir, title)
    (out_dir / "compare.md").write_text(table)
    plot_compare({a: r.metrics for a, r in runs.items()}, out_dir / "compare.png", title)
    if not quiet:
        print(table)
        print(f"compare directory: {out_dir}")
    return CompareResult(out_dir, runs, table)


def client_labels(cfg: Config) -> list[str]:
    """A short name per client: its index, personalized architecture and, where clients differ, task."""
    tasks = cfg.task_specs()
    if len(set(tasks)) == 1:
        return [f"{k}: {name}" for k, name in enumerate(cfg.model_names())]
    return [f"{k}: {name}, {task}" for k, (name, task) in enumerate(zip(cfg.model_names(), tasks))]


def per_client_report(cfg: Config, fml: list, baseline: list, out_dir: Path, title: str) -> str:
    """Each personalized model under FML against the same model trained alone: tables (markdown,
    returned) and the figures ``clients.png`` (the FML paper's Fig. 5 style: the baseline's best as a
    dashed line) and ``clients-curves.png`` (Fig. 6 style: the baseline's curve), on the clients' own
    validation splits."""
    labels = client_labels(cfg)
    parts = []
    for key, what in (("personal_acc", "own validation split"), ("client_acc_global_test", "test set under the client's task")):
        header, rows = client_rows(fml, baseline, key, labels)
        parts.append(f"Personalized models, FML against the same model trained alone: {what}, top-1 (%); "
                     f"gain = FML - alone, in points\n\n" + markdown_table(header, rows) + "\n")
    plot_clients(fml, baseline, out_dir / "clients.png", labels, "personal_acc", "best", title)
    plot_clients(fml, baseline, out_dir / "clients-curves.png", labels, "personal_acc", "curve", title)
    return "\n".join(parts)
