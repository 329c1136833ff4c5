"""Reports over many runs: tidy CSV files, mean ± sd over seeds, paired differences between methods, bands.

``fedmutual report DIRS...`` finds every run directory under the given paths (a directory with ``config.json`` and
``metrics.jsonl``), groups the runs that differ only in their seed into one *cell*, and writes to ``--out``:

- ``rounds.csv``: one row per run × round; ``clients.csv``: one row per run × round × client;
- ``report.md``: per cell, the number of seeds and mean ± sd of the final accuracies; per *setting* (a cell without
  its algorithm), the paired differences between every two methods over the seeds both ran, with a 95% t interval;
- ``curves.png`` and ``curves.pdf``: per setting, each method's mean accuracy per round with a band of ± one sd.

``load_runs(paths)`` gives the runs' summaries joined with their configs as a pandas DataFrame.
"""

from __future__ import annotations

import csv
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from fedmutual.errors import ConfigError
from fedmutual.report.metrics import read_metrics, summarize
from fedmutual.report.stats import mean_sd, paired_difference

#: Config keys that never make two runs different experiments.
IGNORED = ("out", "name", "progress", "threads", "device", "engine", "seed", "checkpoint_every", "checkpoint_keep")
#: Per-round scalar metrics written to rounds.csv (when a run has them).
ROUND_KEYS = ("global_acc", "client_acc_global_test_mean", "personal_acc_mean", "current_acc_global_test_mean",
              "meme_acc_global_test_mean", "train_loss", "train_loss_local", "train_loss_meme", "bytes_up", "bytes_down", "seconds")
#: Summary metrics in the tables: (summary key, column title).
TABLE_KEYS = (("final_global_acc", "global final"), ("final_client_acc_global_test_mean", "clients test final"),
              ("final_personal_acc_mean", "personal val final"), ("best_global_acc", "global best"))


@dataclass
class RunRecord:
    dir: Path
    config: dict[str, Any]  # flattened: dotted keys
    rows: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def algorithm(self) -> str:
        return str(self.config.get("algorithm"))


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables as dotted keys."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def find_runs(paths: Iterable[str | Path]) -> list[RunRecord]:
    """Every run directory under ``paths`` (sorted by path); a peer's own directory is not a run."""
    found: dict[Path, RunRecord] = {}
    for path in map(Path, paths):
        if not path.exists():
            raise ConfigError(f"report: {path} does not exist")
        candidates = [path] if (path / "config.json").is_file() else []
        candidates += [c.parent for c in sorted(path.rglob("config.json"))]
        for d in candidates:
            if d in found or not (d / "metrics.jsonl").is_file() or (d / "peer.json").is_file():
                continue
            try:
                config = flatten(json.loads((d / "config.json").read_text()))
                rows = read_metrics(d / "metrics.jsonl")
            except (OSError, ValueError) as e:
                raise ConfigError(f"report: {d} cannot be read ({e})") from None
            summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").is_file() else summarize(rows, "unknown")
            found[d] = RunRecord(d, config, rows, summary)
    if not found:
        raise ConfigError(f"report: no run directories (config.json and metrics.jsonl) under {', '.join(map(str, paths))}")
    return [found[d] for d in sorted(found)]


def varying(runs: Sequence[RunRecord], ignore: Sequence[str] = IGNORED) -> list[str]:
    """The config keys whose values differ between runs (besides the ignored ones), in a stable order."""
    keys = sorted({k for r in runs for k in r.config} - set(ignore))
    return [k for k in keys if len({json.dumps(r.config.get(k), sort_keys=True) for r in runs}) > 1]


def _key(run: RunRecord, keys: Sequence[str]) -> tuple[str, ...]:
    return tuple(json.dumps(run.config.get(k), sort_keys=True) for k in keys)


def _label(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "all runs"


def _run_label(run: RunRecord, root: Path | None) -> str:
    try:
        return str(run.dir.relative_to(root)) if root is not None else str(run.dir)
    except ValueError:
        return str(run.dir)


def write_tidy(runs: Sequence[RunRecord], out: Path, root: Path | None = None) -> tuple[Path, Path]:
    """rounds.csv (run × round) and clients.csv (run × round × client)."""
    keys = [k for k in varying(runs) if k != "algorithm"]
    out.mkdir(parents=True, exist_ok=True)
    present = [k for k in ROUND_KEYS if any(k in row for r in runs for row in r.rows)]
    rounds_path, clients_path = out / "rounds.csv", out / "clients.csv"
    with open(rounds_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "algorithm", "seed", *keys, "round", *present])
        for r in runs:
            for row in r.rows:
                w.writerow([_run_label(r, root), r.algorithm, r.seed, *[r.config.get(k) for k in keys], row["round"],
                            *[_csv(row.get(k)) for k in present]])
    per_client = (("client_acc_global_test", "test_acc"), ("personal_acc", "personal_val_acc"),
                  ("bytes_up_per_client", "bytes_up"), ("bytes_down_per_client", "bytes_down"))
    with open(clients_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "algorithm", "seed", *keys, "round", "client", *[name for _, name in per_client]])
        for r in runs:
            n = int(r.config.get("clients", 0))
            for row in r.rows:
                for k in range(n):
                    vals = [(row.get(src) or [None] * n)[k] if isinstance(row.get(src), list) else None for src, _ in per_client]
                    w.writerow([_run_label(r, root), r.algorithm, r.seed, *[r.config.get(c) for c in keys], row["round"], k,
                                *[_csv(v) for v in vals]])
    return rounds_path, clients_path


def _csv(v: Any) -> Any:
    return "" if v is None else v


def pct(v: float | None) -> str:
    """A fraction in percent with two decimals (— for none)."""
    return "—" if v is None else f"{100 * v:.2f}"


def mean_sd_text(values: Sequence[float]) -> str:
    """``mean ± sd`` over seeds, in percent (the mean alone for one value; — for none)."""
    if not values:
        return "—"
    m, sd = mean_sd(values)
    return f"{100 * m:.2f}" if sd is None else f"{100 * m:.2f} ± {100 * sd:.2f}"


def report_tables(runs: Sequence[RunRecord]) -> str:
    """report.md's text: mean ± sd per cell, and paired differences between methods per setting."""
    keys = varying(runs)
    cell_keys = keys
    setting_keys = [k for k in keys if k != "algorithm"]
    lines = ["# Report", "", f"{len(runs)} runs; cells differ in {', '.join(keys) or 'nothing but the seed'}.",
             "Accuracies in percent: mean ± sample standard deviation over seeds (n seeds).", "",
             "## Mean ± sd per cell", ""]
    present = [(k, t) for k, t in TABLE_KEYS if any(r.summary.get(k) is not None for r in runs)]
    lines.append("| " + " | ".join([*cell_keys, "n", *[t for _, t in present]]) + " |")
    lines.append("|" + "---|" * (len(cell_keys) + 1 + len(present)))
    cells: dict[tuple[str, ...], list[RunRecord]] = {}
    for r in runs:
        cells.setdefault(_key(r, cell_keys), []).append(r)
    for key, members in cells.items():
        vals = [str(members[0].config.get(k)) for k in cell_keys]
        stats = [mean_sd_text([m.summary[k] for m in members if m.summary.get(k) is not None]) for k, _ in present]
        lines.append("| " + " | ".join([*vals, str(len(members)), *stats]) + " |")
    lines += ["", "## Paired differences between methods", "",
              "Per setting, method A − method B over the seeds both ran (paired by seed), in points, with a 95% t interval. "
              "An interval that holds 0 does not tell the two apart at these seeds.", ""]
    settings: dict[tuple[str, ...], list[RunRecord]] = {}
    for r in runs:
        settings.setdefault(_key(r, setting_keys), []).append(r)
    any_rows = False
    for metric, title, fallback in (("final_global_acc", "the final global model on the test set", "final_client_acc_global_test_mean"),
                                    ("final_personal_acc_mean", "the final client models on their own validation splits (mean)", None)):
        rows = []
        for members in settings.values():
            by_alg: dict[str, dict[int, float]] = {}
            for m in members:
                v = m.summary.get(metric)
                if v is None and fallback is not None:
                    v = m.summary.get(fallback)
                if v is not None:
                    by_alg.setdefault(m.algorithm, {})[m.seed] = float(v)
            label = _label({k: members[0].config.get(k) for k in setting_keys})
            for a, b in itertools.combinations(sorted(by_alg), 2):
                seeds = sorted(set(by_alg[a]) & set(by_alg[b]))
                if not seeds:
                    continue
                d = paired_difference([by_alg[a][s] for s in seeds], [by_alg[b][s] for s in seeds])
                interval = "—" if d.low is None or d.high is None else f"[{100 * d.low:+.2f}, {100 * d.high:+.2f}]"
                rows.append(f"| {label} | {a} − {b} | {d.n} | {100 * d.mean:+.2f} | {interval} |")
        if rows:
            any_rows = True
            note = f" (the clients' mean where a method has no global model)" if fallback else ""
            lines += [f"**{title}**{note}:", "", "| setting | difference | n | mean | 95% interval |", "|---|---|---|---|---|", *rows, ""]
    if not any_rows:
        lines.append("No two methods share a setting and a seed.")
    return "\n".join(lines) + "\n"


def curves(runs: Sequence[RunRecord], path: Path) -> list[Path]:
    """Per setting, each method's mean accuracy per round over seeds with a ± sd band; PNG and PDF."""
    from fedmutual.report.plots import band_plot

    keys = varying(runs)
    setting_keys = [k for k in keys if k != "algorithm"]
    panels: dict[str, dict[str, list[list[dict[str, Any]]]]] = {}
    for r in runs:
        label = _label({k: r.config.get(k) for k in setting_keys})
        panels.setdefault(label, {}).setdefault(r.algorithm, []).append(r.rows)
    return band_plot(panels, path)


def write_report(paths: Sequence[str | Path], out: str | Path) -> Path:
    """``fedmutual report``: the tidy CSVs, report.md and the curves for every run under ``paths``."""
    runs = find_runs(paths)
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    root = Path(paths[0]) if len(paths) == 1 and Path(paths[0]).is_dir() else None
    write_tidy(runs, target, root)
    (target / "report.md").write_text(report_tables(runs))
    curves(runs, target / "curves")
    return target


def load_runs(paths: Iterable[str | Path]) -> Any:
    """The runs under ``paths`` as a pandas DataFrame: one row per run, its summary joined with its config
    (dotted keys), plus ``run_dir``. Needs pandas (``pip install "fedmutual[report]"``)."""
    try:
        import pandas as pd
    except ImportError:
        raise ConfigError('load_runs needs pandas: pip install "fedmutual[report]"') from None
    records = []
    for r in find_runs(paths):
        rec: dict[str, Any] = {"run_dir": str(r.dir)}
        rec.update({f"config.{k}": (json.dumps(v) if isinstance(v, list) else v) for k, v in r.config.items()})
        rec.update({k: v for k, v in r.summary.items() if not isinstance(v, (list, dict))})
        records.append(rec)
    return pd.DataFrame.from_records(records)
