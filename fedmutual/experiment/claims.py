"""The papers' claims as sweeps, each with a verdict from the numbers: ``fedmutual reproduce``.

Every claim listed in the algorithms' specification is one or more sweeps (:mod:`fedmutual.experiment.sweep`) over
seeds, and a judgement over their runs that says, with the measured numbers, whether the claim **holds**, **does not
hold**, or **depends** (and on what). A budget sets the rounds and data of every sweep: ``full`` is the documented
budget (``BUDGETS``), ``quick`` runs the same pipeline on tiny subsets in minutes, to check the plumbing only.

The report (``claims.md``, and with ``docs`` the claims section of ``docs/results.md``) lists for each claim the
numbers, the sweep that produced them (its spec file and command), the time taken and the verdict.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from fedmutual.errors import ConfigError
from fedmutual.experiment.sweep import run_sweep, sweep_from_spec
from fedmutual.report.runs import RunRecord, find_runs, mean_sd_text, pct
from fedmutual.report.stats import mean_sd, paired_difference

BEGIN, END = "<!-- claims:begin -->", "<!-- claims:end -->"


@dataclass(frozen=True)
class Budget:
    name: str
    seeds: tuple[int, ...]
    rounds: int  # rounds of the FML table; the other sweeps scale from it
    limit_train: int | None
    limit_test: int | None
    table_models: tuple[str, ...]
    table_partitions: tuple[str, ...]
    dfml_rounds: int
    dfml_clients: int
    dmlfl_rounds: int
    dmlfl_epochs: int


BUDGETS = {
    "full": Budget("full", (0, 1, 2), 20, 12000, 2000, ("mlp", "lenet5"), ("iid", "shards:6", "shards:4", "shards:2"),
                   30, 10, 12, 10),
    "quick": Budget("quick", (0, 1, 2), 2, 300, 200, ("lenet5",), ("iid", "shards:2"), 2, 4, 2, 1),
}

MH_FACTOR = 2  # the MH and OH sweeps run the table's rounds and this many times them (CNN2 clients make them the slowest)

PARTITION_NAMES = {"iid": "IID", "shards:6": "non-IID(1)", "shards:4": "non-IID(2)", "shards:2": "non-IID(3)"}


@dataclass
class Finding:
    verdict: str  # "holds", "does not hold", "depends on ..."
    lines: list[str] = field(default_factory=list)  # markdown: the numbers behind it


@dataclass
class Claim:
    key: str
    text: str
    sweeps: Callable[[Budget], dict[str, dict[str, Any]]]
    judge: Callable[[dict[str, list[RunRecord]], Budget], Finding]
    ablation: bool = False  # an experiment that explains a claim's verdict: it has a finding, not a verdict


def _common(b: Budget, **over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"dataset": "fashion-mnist", "progress": False, "checkpoint_every": 1, "eval_every": 1}
    if b.limit_train is not None:
        base["limit_train"] = b.limit_train
    if b.limit_test is not None:
        base["limit_test"] = b.limit_test
    base.update(over)
    return base


def _by(runs: Sequence[RunRecord], *keys: str) -> dict[tuple[Any, ...], dict[str, dict[int, RunRecord]]]:
    """runs grouped by config keys, then by algorithm, then by seed."""
    out: dict[tuple[Any, ...], dict[str, dict[int, RunRecord]]] = {}
    for r in runs:
        cell = tuple(json.dumps(r.config.get(k)) for k in keys)
        out.setdefault(cell, {}).setdefault(r.algorithm, {})[r.seed] = r
    return out


def _final(r: RunRecord, key: str) -> float | None:
    v = r.summary.get(f"final_{key}")
    return None if v is None else float(v)


def _diff(a: Mapping[int, RunRecord], b: Mapping[int, RunRecord], key_a: str, key_b: str | None = None) -> str:
    seeds = sorted(s for s in set(a) & set(b) if _final(a[s], key_a) is not None and _final(b[s], key_b or key_a) is not None)
    if not seeds:
        return "—"
    d = paired_difference([_final(a[s], key_a) for s in seeds], [_final(b[s], key_b or key_a) for s in seeds])  # type: ignore[misc]
    interval = "" if d.low is None or d.high is None else f" [{100 * d.low:+.2f}, {100 * d.high:+.2f}]"
    return f"{100 * d.mean:+.2f}{interval}"


def _mean_final(runs: Mapping[int, RunRecord], key: str) -> float | None:
    vals = [v for v in (_final(r, key) for r in runs.values()) if v is not None]
    return mean_sd(vals)[0] if vals else None


# ------------------------------------------------------------------ FML, Table 1 and what it shows

def _table_sweeps(b: Budget) -> dict[str, dict[str, Any]]:
    return {"fml-table1": {"seeds": list(b.seeds), "base": _common(b, clients=5, rounds=b.rounds, local_epochs=1),
                           "grid": {"model": list(b.table_models), "partition": list(b.table_partitions),
                                    "algorithm": ["fedavg", "fedprox", "fml"]}}}


def _judge_table(sweeps: dict[str, list[RunRecord]], b: Budget) -> Finding:
    cells = _by(sweeps["fml-table1"], "model", "partition")
    lines = ["| model | partition | FedAvg | FedProx | FML | FML − FedAvg (paired, 95%) | FML ≥ FedAvg ≥ FedProx |",
             "|---|---|---|---|---|---|---|"]
    ordered = 0
    gains: dict[str, dict[str, float]] = {}
    for cell, algs in cells.items():
        model, part = (json.loads(c) for c in cell)
        m = {a: _mean_final(algs.get(a, {}), "global_acc") for a in ("fedavg", "fedprox", "fml")}
        ok = None not in m.values() and m["fml"] >= m["fedavg"] >= m["fedprox"]  # type: ignore[operator]
        ordered += bool(ok)
        if m["fml"] is not None and m["fedavg"] is not None:
            gains.setdefault(model, {})[part] = m["fml"] - m["fedavg"]
        lines.append(f"| {model} | {PARTITION_NAMES.get(part, part)} | "
                     + " | ".join(mean_sd_text([v for v in (_final(r, 'global_acc') for r in algs.get(a, {}).values()) if v is not None])
                                  for a in ("fedavg", "fedprox", "fml"))
                     + f" | {_diff(algs.get('fml', {}), algs.get('fedavg', {}), 'global_acc')} | {'yes' if ok else 'no'} |")
    largest = {model: max(g, key=lambda p: g[p]) for model, g in gains.items()}
    at3 = [p == "shards:2" and gains[m][p] > 0 for m, p in largest.items()]  # a largest "gain" below 0 is none
    lines += ["", f"The ordering holds in {ordered} of {len(cells)} cells; the largest FML gain over FedAvg is in "
              + ", ".join(f"{PARTITION_NAMES.get(p, p)} ({m})" for m, p in largest.items()) + "."]
    most = ordered > len(cells) / 2
    if most and all(at3):
        return Finding("holds", lines)
    if most or any(at3):
        return Finding("depends: " + ("the ordering holds in most cells, but the largest gain is not always in non-IID(3)" if most
                                      else "the largest gain is in non-IID(3), but the ordering fails in most cells"), lines)
    return Finding("does not hold", lines)


def _oscillation(r: RunRecord) -> float | None:
    """The standard deviation of the global accuracy over the second half of the rounds."""
    vals = [row["global_acc"] for row in r.rows if row.get("global_acc") is not None and row["round"] > len(r.rows) / 2]
    return mean_sd(vals)[1] if len(vals) > 1 else None


def _judge_oscillation(sweeps: dict[str, list[RunRecord]], b: Budget) -> Finding:
    cells = _by(sweeps["fml-table1"], "model", "partition")
    lines = ["Standard deviation of the global accuracy over the second half of the rounds (points), mean over seeds.", "",
             "| model | partition | FedAvg | FML | FML steadier |", "|---|---|---|---|---|"]
    wins = total = 0
    for cell, algs in cells.items():
        model, part = (json.loads(c) for c in cell)
        if part == "iid":
            continue
        sd = {a: [v for v in (_oscillation(r) for r in algs.get(a, {}).values()) if v is not None] for a in ("fedavg", "fml")}
        if not sd["fedavg"] or not sd["fml"]:
            continue
        fa, fm = mean_sd(sd["fedavg"])[0], mean_sd(sd["fml"])[0]
        total += 1
        wins += fm < fa
        lines.append(f"| {model} | {PARTITION_NAMES.get(part, part)} | {100 * fa:.2f} | {100 * fm:.2f} | {'yes' if fm < fa else 'no'} |")
    if not total:
        return Finding("depends: too few rounds to measure an oscillation at this budget", lines)
    lines += ["", f"FML oscillates less in {wins} of {total} non-IID cells."]
    return Finding("holds" if wins == total else "does not hold" if wins == 0 else f"depends on the cell ({wins} of {total})", lines)


def _judge_dh(sweeps: dict[str, list[RunRecord]], b: Budget) -> Finding:
    cells = _by(sweeps["fml-table1"], "model", "partition")
    lines = ["Each client's deployable model on its own validation split (mean over clients): FML's personalized models "
             "against the FedAvg global model.", "",
             "| model | partition | FedAvg global | FML personalized | difference (paired, 95%) |", "|---|---|---|---|---|"]
    wins = total = 0
    for cell, algs in cells.items():
        model, part = (json.loads(c) for c in cell)
        if part == "iid" or "fml" not in algs or "fedavg" not in algs:
            continue
        fa, fm = _mean_final(algs["fedavg"], "personal_acc_mean"), _mean_final(algs["fml"], "personal_acc_mean")
        if fa is None or fm is None:
            continue
        total += 1
        wins += fm > fa
        lines.append(f"| {model} | {PARTITION_NAMES.get(part, part)} | {pct(fa)} | {pct(fm)} | "
                     f"{_diff(algs['fml'], algs['fedavg'], 'personal_acc_mean')} |")
    if not total:
        return Finding("depends: no non-IID cell at this budget", lines)
    return Finding("holds" if wins == total else "does not hold" if wins == 0 else f"depends on the cell ({wins} of {total})", lines)


def _ablation_table_sweeps(b: Budget) -> dict[str, dict[str, Any]]:
    model, part = b.table_models[0], b.table_partitions[-1]
    base = _common(b, clients=5, rounds=b.rounds, local_epochs=1, model=model)
    return {**_table_sweeps(b),
            "fedprox-mu": {"seeds": list(b.seeds), "base": {**base, "partition": part, "algorithm": "fedprox"},
                           "grid": {"fedprox.mu": [0.1, 1.0]}},
            "fml-budget": {"seeds": list(b.seeds), "base": {**base, "partition": "iid", "rounds": 3 * b.rounds},
                           "grid": {"algorithm": ["fedavg", "fml"]}}}


def _judge_table_ablation(sweeps: dict[str, list[RunRecord]], b: Budget) -> Finding:
    model, part = b.table_models[0], b.table_partitions[-1]
    table = _by(sweeps["fml-table1"], "model", "partition")

    def cell(p: str) -> dict[str, dict[int, RunRecord]]:
        return table.get((json.dumps(model), json.dumps(p)), {})

    def acc(runs: Mapping[int, RunRecord]) -> str:
        return mean_sd_text([v for v in (_final(r, "global_acc") for r in runs.values()) if v is not None])

    fedavg = cell(part).get("fedavg", {})
    mus: dict[float, dict[int, RunRecord]] = {0.01: cell(part).get("fedprox", {})}
    for c, algs in _by(sweeps["fedprox-mu"], "fedprox.mu").items():
        mus[float(json.loads(c[0]))] = algs.get("fedprox", {})
    lines = [f"**FedProx's μ** ({model}, {PARTITION_NAMES.get(part, part)}, {b.rounds} rounds of E = 1; the table runs μ = 0.01):",
             "", "| μ | FedProx | FedProx − FedAvg (paired, 95%) |", "|---|---|---|", f"| (FedAvg) | {acc(fedavg)} | |"]
    below = []
    for mu in sorted(mus):
        lines.append(f"| {mu:g} | {acc(mus[mu])} | {_diff(mus[mu], fedavg, 'global_acc')} |")
        m_p, m_a = _mean_final(mus[mu], "global_acc"), _mean_final(fedavg, "global_acc")
        if m_p is not None and m_a is not None and m_p < m_a:
            below.append(mu)
    budget = _by(sweeps["fml-budget"]).get((), {})
    rows = [(b.rounds, cell("iid")), (3 * b.rounds, budget)]
    lines += ["", f"**The budget** ({model}, IID): FML's global model against FedAvg's as rounds grow.", "",
              "| rounds | FedAvg | FML | FML − FedAvg (paired, 95%) |", "|---|---|---|---|"]
    gaps = []
    for rounds, algs in rows:
        fa, fm = algs.get("fedavg", {}), algs.get("fml", {})
        lines.append(f"| {rounds} | {acc(fa)} | {acc(fm)} | {_diff(fm, fa, 'global_acc')} |")
        m_m, m_a = _mean_final(fm, "global_acc"), _mean_final(fa, "global_acc")
        gaps.append(None if m_m is None or m_a is None else m_m - m_a)
    prox = ("FedProx falls below FedAvg at μ = " + ", ".join(f"{m:g}" for m in below) if below
            else "FedProx does not fall below FedAvg at any μ tried")
    if gaps[0] is not None and gaps[1] is not None:
        trend = "narrows" if abs(gaps[1]) < abs(gaps[0]) else "does not narrow"
        gap = f"FML's IID gap to FedAvg {trend} with the budget ({100 * gaps[0]:+.2f} at {b.rounds} rounds, {100 * gaps[1]:+.2f} at {3 * b.rounds})"
    else:
        gap = "the budget runs are missing"
    return Finding(f"{prox}; {gap}", lines)


def _ablation_dfml_sweeps(b: Budget) -> dict[str, dict[str, Any]]:
    homo = _dfml_sweeps(b)["dfml-homo"]
    return {**_dfml_sweeps(b), "dfml-budget": {"seeds": list(b.seeds), "base": {**homo["base"], "rounds": 3 * b.dfml_rounds},
                                               "grid": {"algorithm": ["dfml", "dfedavg"]}}}


def _judge_dfml_ablation(sweeps: dict[str, list[RunRecord]], b: Budget) -> Finding:
    key = "client_acc_global_test_mean"
    rows = [(b.dfml_rounds, _by(sweeps["dfml-homo"]).get((), {})), (3 * b.dfml_rounds, _by(sweeps["dfml-budget"]).get((), {}))]
    lines = ["**The budget** (LeNet5 on every client, Dirichlet(0.1)): each round DFML trains the participants' models on "
             "one aggregator's data, while decentralized FedAvg trains every participant on its own.", "",
             "| rounds | DFML | DFedAvg (WSM) | DFML − DFedAvg (paired, 95%) |", "|---|---|---|---|"]
    gaps = []
    for rounds, algs in rows:
        d, f = algs.get("dfml", {}), algs.get("dfedavg", {})
        lines.append(f"| {rounds} | {mean_sd_text([v for v in (_final(r, key) for r in d.values()) if v is not None])} | "
                     f"{mean_sd_text([v for v in (_final(r, key) for r in f.values()) if v is not None])} | {_diff(d, f, key)} |")
        m_d, m_f = _mean_final(d, key), _mean_final(f, key)
        gaps.append(None if m_d is None or m_f is None else m_d - m_f)
    if gaps[0] is None or gaps[1] is None:
        return Finding("the budget runs are missing", lines)
    trend = "closes" if gaps[1] >= 0 > gaps[0] else "narrows" if abs(gaps[1]) < abs(gaps[0]) else "does not narrow"
    return Finding(f"DFML's gap to DFedAvg (WSM) {trend} with the budget ({100 * gaps[0]:+.2f} at {b.dfml_rounds} rounds, "
                   f"{100 * gaps[1]:+.2f} at {3 * b.dfml_rounds})", lines)


# ------------------------------------------------------------------ MH and OH: every client against itself alone

def _mh_oh_sweeps(b: Budget) -> dict[str, dict[str, Any]]:
    budgets = [b.rounds, MH_FACTOR * b.rounds]
    return {name: {"config": cfg, "seeds": list(b.seeds), "base": _common(b, local_epochs=1),
                   "grid": {"rounds": budgets, "algorithm": ["fml", "local"]}}
            for name, cfg in (("fml-mh", "fml-mh-fmnist.toml"), ("fml-oh", "fml-oh-fmnist.toml"))}


def _judge_mh_oh(sweeps: dict[str, list[RunRecord]], b: Budget) -> Finding:
    lines = ["Each client's final accuracy on its own validation split, mean over seeds: FML's personalized model against "
             "the same model trained alone.", ""]
    holds_at: dict[str, list[int]] = {}
    for name in ("fml-mh", "fml-oh"):
        lines += [f"**{name[4:].upper()}**:", "", "| rounds | client | alone | FML | improved |", "|---|---|---|---|---|"]
        for cell, algs in sorted(_by(sweeps[name], "rounds").items(), key=lambda c: int(json.loads(c[0][0]))):
            rounds = int(json.loads(cell[0]))
            fml, alone = algs.get("fml", {}), algs.get("local", {})
            if not fml or not alone:
                continue
            k_n = int(next(iter(fml.values())).config["clients"])
            models = next(iter(fml.values())).config.get("model")
            all_up = True
            for k in range(k_n):
                def last(rs: Mapping[int, RunRecord]) -> list[float]:
                    return [float(r.rows[-1]["personal_acc"][k]) for r in rs.values() if r.rows and r.rows[-1].get("personal_acc")]
                a, f = last(alone), last(fml)
                up = bool(a and f) and mean_sd(f)[0] > mean_sd(a)[0]
                all_up &= up
                label = models[k] if isinstance(models, list) else models
                lines.append(f"| {rounds} | {k} ({label}) | {mean_sd_text(a)} | {mean_sd_text(f)} | {'yes' if up else 'no'} |")
            if all_up:
                holds_at.setdefault(name, []).append(rounds)
        lines.append("")
    top = MH_FACTOR * b.rounds
    if all(top in holds_at.get(n, []) for n in ("fml-mh", "fml-oh")):
        at = {n: min(holds_at[n]) for n in holds_at}
        return Finding("holds" if all(v == b.rounds for v in at.values()) else
                       "depends on the budget: every client improves from " + ", ".join(f"{n[4:].upper()} {v} rounds" for n, v in at.items()), lines)
    if holds_at:
        return Finding("depends on the budget and the setting: every client improves only in "
                       + ", ".join(f"{n[4:].upper()} at {v} rounds" for n, v in holds_at.items()), lines)
    return Finding(f"does not hold up to {top} rounds of E = 1", lines)


# ------------------------------------------------------------------ DFML

def _dfml_sweeps(b: Budget) -> dict[str, dict[str, Any]]:
    base = _common(b, clients=b.dfml_clients, rounds=b.dfml_rounds, partition="dirichlet:0.1", batch_size=64, local_epochs=1,
                   weight_decay=0.0, dfml={"participants": max(2, b.dfml_clients // 2), "period": min(10, b.dfml_rounds)},
                   dfedavg={"participants": max(2, b.dfml_clients // 2)})
    return {
        "dfml-het": {"seeds": list(b.seeds), "base": {**base, "model": "mlp,lenet5,cnn1"}, "grid": {"algorithm": ["dfml", "local"]}},
        "dfml-homo": {"seeds": list(b.seeds), "base": {**base, "model": "lenet5", "dfedavg": {**base["dfedavg"], "wsm": True}},
                      "grid": {"algorithm": ["dfml", "dfedavg", "local"]}},
        "dfedavg-ce": {"seeds": list(b.seeds), "base": {**base, "model": "lenet5", "dfedavg": {**base["dfedavg"], "wsm": False}},
                       "grid": {"algorithm": ["dfedavg"]}},
    }


def _judge_dfml(sweeps: dict[str, list[RunRecord]], b: Budget) -> Finding:
    key = "client_acc_global_test_mean"
    methods = {"het": _by(sweeps["dfml-het"]).get((), {}), "homo": _by(sweeps["dfml-homo"]).get((), {})}
    ce = _by(sweeps["dfedavg-ce"]).get((), {}).get("dfedavg", {})
    lines = ["Global accuracy: each client's deployable model (DFML: its peak model) on the full test set, mean over clients; "
             "Dirichlet(0.1).", "", "| models | method | global accuracy | DFML − method (paired, 95%) |", "|---|---|---|---|"]
    wins, total = 0, 0
    for label, algs, others in (("mlp, lenet5, cnn1", methods["het"], {"local": methods["het"].get("local", {})}),
                                ("lenet5", methods["homo"], {"dfedavg (WSM)": methods["homo"].get("dfedavg", {}), "dfedavg (CE)": ce,
                                                             "local": methods["homo"].get("local", {})})):
        dfml = algs.get("dfml", {})
        lines.append(f"| {label} | dfml | {mean_sd_text([v for v in (_final(r, key) for r in dfml.values()) if v is not None])} | |")
        for name, runs in others.items():
            m_d, m_o = _mean_final(dfml, key), _mean_final(runs, key)
            if m_d is None or m_o is None:
                continue
            total += 1
            wins += m_d > m_o
            lines.append(f"| {label} | {name} | {mean_sd_text([v for v in (_final(r, key) for r in runs.values()) if v is not None])} | "
                         f"{_diff(dfml, runs, key)} |")
    return Finding("holds" if total and wins == total else "does not hold" if wins == 0 else
                   f"depends on the baseline and the models (DFML ahead in {wins} of {total} comparisons)", lines)


# ------------------------------------------------------------------ DML-FL

def _dmlfl_sweeps(b: Budget) -> dict[str, dict[str, Any]]:
    base = _common(b, rounds=b.dmlfl_rounds, local_epochs=b.dmlfl_epochs, dmlfl={"collab_epochs": b.dmlfl_epochs})
    base.pop("limit_train", None)  # the config's own subset: its folds need it
    base.pop("limit_test", None)
    return {"dmlfl": {"config": "dmlfl-fmnist-binary.toml", "seeds": list(b.seeds), "base": base,
                      "grid": {"algorithm": ["dmlfl", "fedavg", "asyncfl", "local"]}}}


def _judge_dmlfl(sweeps: dict[str, list[RunRecord]], b: Budget) -> Finding:
    key = "client_acc_global_test_mean"
    algs = _by(sweeps["dmlfl"]).get((), {})
    lines = ["Each client's model on the test set (mean over clients), Fashion-MNIST as a binary task, the authors' protocol.", "",
             "| method | test accuracy | DML-FL − method (paired, 95%) |", "|---|---|---|"]
    d = algs.get("dmlfl", {})
    lines.append(f"| dmlfl | {mean_sd_text([v for v in (_final(r, key) for r in d.values()) if v is not None])} | |")
    wins = total = 0
    for name in ("fedavg", "asyncfl", "local"):
        runs = algs.get(name, {})
        m_d, m_o = _mean_final(d, key), _mean_final(runs, key)
        if m_d is None or m_o is None:
            continue
        total += 1
        wins += m_d > m_o
        lines.append(f"| {name} | {mean_sd_text([v for v in (_final(r, key) for r in runs.values()) if v is not None])} | {_diff(d, runs, key)} |")
    return Finding("holds" if total and wins == total else "does not hold" if wins == 0 else
                   f"depends on the baseline (DML-FL ahead of {wins} of {total})", lines)


CLAIMS: list[Claim] = [
    Claim("table1", "FML ≥ FedAvg ≥ FedProx in most cells of Table 1, with the largest FML gain in non-IID(3).", _table_sweeps, _judge_table),
    Claim("oscillation", "FML's curves oscillate less than FedAvg's in non-IID settings.", _table_sweeps, _judge_oscillation),
    Claim("dh", "FML's personalized models beat the FedAvg global model on private validation data under non-IID.", _table_sweeps, _judge_dh),
    Claim("mh-oh", "Under MH (and OH), every personalized model beats the same model trained alone.", _mh_oh_sweeps, _judge_mh_oh),
    Claim("dfml", "DFML beats decentralized FedAvg (with and without WSM) and local training, with heterogeneous and homogeneous "
          "models, Dirichlet(0.1).", _dfml_sweeps, _judge_dfml),
    Claim("dmlfl", "DML-FL's clients beat FedAvg, asynchronous weight updating and local training.", _dmlfl_sweeps, _judge_dmlfl),
    Claim("table1-why", "Ablation for Table 1: FedProx's μ, and the budget.", _ablation_table_sweeps, _judge_table_ablation, ablation=True),
    Claim("dfml-why", "Ablation for DFML: the budget.", _ablation_dfml_sweeps, _judge_dfml_ablation, ablation=True),
]


def _toml(spec: Mapping[str, Any], name: str) -> str:
    """A sweep spec as a TOML file (for the report's commands)."""
    def value(v: Any) -> str:
        return json.dumps(v)

    out = [f'name = "{name}"']
    if spec.get("config"):
        out.append(f'config = {value(spec["config"])}')
    out.append(f"seeds = {value(spec['seeds'])}")
    for table in ("base", "grid"):
        flat: dict[str, Any] = {}

        def walk(d: Mapping[str, Any], prefix: str = "") -> None:
            for k, v in d.items():
                if isinstance(v, Mapping):
                    walk(v, f"{prefix}{k}.")
                else:
                    flat[f"{prefix}{k}"] = v
        walk(spec.get(table, {}))
        out += ["", f"[{table}]", *[f"{k} = {value(v)}" for k, v in flat.items()]]
    return "\n".join(out) + "\n"


def reproduce(budget: str = "full", out: str | Path = "runs/reproduce", workers: int = 1, docs: str | Path | None = None,
              configs_dir: str | Path | None = None, only: Sequence[str] | None = None,
              log: Callable[[str], None] | None = None) -> Path:
    """Run every claim's sweeps at ``budget`` (resumable: finished runs are kept), judge them, and write
    ``claims.md`` in ``out`` (and the claims section of ``docs``, when given); returns the report's path."""
    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    if budget not in BUDGETS:
        raise ConfigError(f"reproduce: budget {budget!r}; allowed: {', '.join(BUDGETS)}")
    b = BUDGETS[budget]
    claims = [c for c in CLAIMS if not only or c.key in only]
    if only and len(claims) != len(set(only)):
        raise ConfigError(f"reproduce --only: unknown claims {', '.join(sorted(set(only) - {c.key for c in CLAIMS}))}; "
                          f"allowed: {', '.join(c.key for c in CLAIMS)}")
    root = Path(out) / budget
    specs_dir = root / "specs"
    specs_dir.mkdir(parents=True, exist_ok=True)
    cfg_root = Path(configs_dir) if configs_dir else Path(__file__).resolve().parents[2] / "configs"
    specs: dict[str, dict[str, Any]] = {}
    for c in claims:
        specs.update(c.sweeps(b))
    runs: dict[str, list[RunRecord]] = {}
    timing_file = root / "timing.json"  # wall time spent on each sweep, summed over the invocations that ran it
    try:
        wall: dict[str, float] = {k: float(v) for k, v in json.loads(timing_file.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        wall = {}
    for name, spec in specs.items():
        spec = {**spec, "config": str(cfg_root / spec["config"])} if spec.get("config") else spec
        (specs_dir / f"{name}.toml").write_text(_toml(spec, name))
        sweep = sweep_from_spec({**spec, "name": name}, specs_dir / f"{name}.toml", out=root)
        t0, before = time.perf_counter(), wall.get(name, 0.0)

        def tick(msg: str, name: str = name, t0: float = t0, before: float = before) -> None:
            """Log, and record the sweep's wall time so far: an invocation that is killed keeps what it spent."""
            wall[name] = before + time.perf_counter() - t0
            timing_file.write_text(json.dumps(wall, indent=1) + "\n")
            say(msg)

        tick(f"fedmutual: reproduce ({budget}): sweep {name}, {len(sweep.points)} runs")
        run_sweep(sweep, workers=workers, log=tick)
        tick(f"fedmutual: reproduce ({budget}): sweep {name} done")
        runs[name] = find_runs([sweep.dir])
    text = _write(claims, b, runs, specs, wall, workers, root, specs_dir)
    report = root / "claims.md"
    report.write_text(text)
    if docs is not None:
        _update_docs(Path(docs), text)
    return report


def _run_seconds(runs: Sequence[RunRecord]) -> float:
    """The runs' own training and evaluation time (their rounds' seconds), without process start-up and data loading."""
    return sum(float(r.summary.get("total_seconds") or 0.0) for r in runs)


def _write(claims: Sequence[Claim], b: Budget, runs: dict[str, list[RunRecord]], specs: dict[str, dict[str, Any]],
           wall: Mapping[str, float], workers: int, root: Path, specs_dir: Path) -> str:
    total = sum(wall.get(n, 0.0) for n in specs)
    own = sum(_run_seconds(runs[n]) for n in specs)
    lines = [f"## Claims (budget: {b.name})", "",
             f"Regenerated by `fedmutual reproduce{' --quick' if b.name == 'quick' else ''}` (`make reproduce`): "
             f"{total / 60:.1f} min of wall time on this machine (summed over the invocations that ran the sweeps; the last with "
             f"{workers} worker{'s' if workers != 1 else ''}), of which the runs' own rounds took {own / 60:.1f} min of "
             f"run time; {len(b.seeds)} seeds ({', '.join(map(str, b.seeds))}) in every cell. Accuracies in percent, "
             "mean ± sd over seeds; paired differences by seed with a 95% t interval. Verdicts follow from the numbers as "
             "the code computes them (fedmutual/experiment/claims.py).", ""]
    if b.name == "quick":
        lines += ["**This is the quick budget: tiny subsets and a couple of rounds, to check the pipeline. Its verdicts say "
                  "nothing about the methods.**", ""]
    lines += [f"Budget: FML table {b.rounds} rounds of E = 1, {b.limit_train or 'all'} training / {b.limit_test or 'all'} test "
              f"samples; DFML {b.dfml_clients} clients, {b.dfml_rounds} rounds; DML-FL {b.dmlfl_rounds} rounds of {b.dmlfl_epochs} "
              "epochs.", ""]
    for c in claims:
        names = list(c.sweeps(b))
        finding = c.judge({n: runs[n] for n in names}, b)
        lines += [f"### {c.text}", "", f"**{'Finding' if c.ablation else 'Verdict'}: {finding.verdict}.**", "", *finding.lines, "",
                  "Runs: " + "; ".join(f"`fedmutual sweep {specs_dir.name}/{n}.toml` ({len(runs[n])} runs, {wall.get(n, 0.0) / 60:.1f} min "
                                       f"wall, {_run_seconds(runs[n]) / 60:.1f} min run time)"
                                       for n in names) + f", under `{root}`.", ""]
    return "\n".join(lines)


def _update_docs(path: Path, text: str) -> None:
    """Replace the claims section of ``path`` (between its markers), or append one."""
    old = path.read_text() if path.is_file() else "# Results\n"
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + block + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(new)
