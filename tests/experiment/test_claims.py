"""The claims' judgements on runs with hand-chosen numbers, the docs section they rewrite, and the quick pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedmutual.experiment.claims import (
    BEGIN, BUDGETS, END, _judge_dfml, _judge_dfml_ablation, _judge_dh, _judge_oscillation, _judge_table, _judge_table_ablation,
    _update_docs, reproduce,
)
from fedmutual.report.runs import RunRecord

QUICK = BUDGETS["quick"]


def _rec(algorithm: str, seed: int, final: float, personal: float = 0.5, curve: list[float] | None = None, **config: Any) -> RunRecord:
    curve = curve or [final]
    rows = [{"round": t + 1, "global_acc": v} for t, v in enumerate(curve)]
    summary = {"final_global_acc": final, "final_personal_acc_mean": personal, "final_client_acc_global_test_mean": final}
    return RunRecord(Path(f"/x/{algorithm}-{seed}"), {"algorithm": algorithm, "seed": seed, **config}, rows, summary)


def _table(values: dict[tuple[str, str], dict[str, float]]) -> list[RunRecord]:
    return [_rec(a, s, v + 0.001 * s, model=m, partition=p) for (m, p), algs in values.items() for a, v in algs.items() for s in range(3)]


def test_table1_holds_when_the_ordering_holds_and_the_largest_gain_is_in_non_iid3() -> None:
    runs = _table({("lenet5", "iid"): {"fedavg": 0.80, "fedprox": 0.79, "fml": 0.81},
                   ("lenet5", "shards:2"): {"fedavg": 0.60, "fedprox": 0.55, "fml": 0.70}})
    f = _judge_table({"fml-table1": runs}, QUICK)
    assert f.verdict == "holds"
    assert any("| lenet5 | non-IID(3) | 60.10 ± 0.10 | 55.10 ± 0.10 | 70.10 ± 0.10 | +10.00 [+10.00, +10.00] | yes |" in line for line in f.lines)


def test_table1_depends_or_fails_by_the_numbers() -> None:
    flipped = _table({("lenet5", "iid"): {"fedavg": 0.80, "fedprox": 0.79, "fml": 0.90},
                      ("lenet5", "shards:2"): {"fedavg": 0.60, "fedprox": 0.55, "fml": 0.62}})
    assert _judge_table({"fml-table1": flipped}, QUICK).verdict.startswith("depends")  # ordering holds, gain largest in IID
    worse = _table({("lenet5", "iid"): {"fedavg": 0.80, "fedprox": 0.85, "fml": 0.70},
                    ("lenet5", "shards:2"): {"fedavg": 0.60, "fedprox": 0.65, "fml": 0.50}})
    assert _judge_table({"fml-table1": worse}, QUICK).verdict == "does not hold"


def test_oscillation_is_the_spread_of_the_second_half() -> None:
    calm, wild = [0.1, 0.5, 0.6, 0.6, 0.6, 0.6], [0.1, 0.5, 0.3, 0.7, 0.3, 0.7]
    runs = [_rec("fml", s, 0.6, curve=calm, model="m", partition="shards:2") for s in range(3)]
    runs += [_rec("fedavg", s, 0.7, curve=wild, model="m", partition="shards:2") for s in range(3)]
    f = _judge_oscillation({"fml-table1": runs}, QUICK)
    # FedAvg's rounds 4-6: 0.7, 0.3, 0.7 -> sd = sqrt(((0.1333)^2 * 2 + (0.2667)^2) / 2) = 0.2309 -> 23.09 points
    assert f.verdict == "holds" and any("| m | non-IID(3) | 23.09 | 0.00 | yes |" in line for line in f.lines)


def test_dh_compares_the_personalized_models_with_the_fedavg_global_model_on_private_data() -> None:
    runs = [_rec("fml", s, 0.6, personal=0.9, model="m", partition="shards:2") for s in range(3)]
    runs += [_rec("fedavg", s, 0.7, personal=0.7, model="m", partition="shards:2") for s in range(3)]
    assert _judge_dh({"fml-table1": runs}, QUICK).verdict == "holds"
    runs = [_rec(r.algorithm, r.seed, 0.6, personal=0.5 if r.algorithm == "fml" else 0.7, model="m", partition="shards:2") for r in runs]
    assert _judge_dh({"fml-table1": runs}, QUICK).verdict == "does not hold"


def test_dfml_depends_on_the_baseline_when_it_beats_only_some() -> None:
    het = [_rec("dfml", s, 0.6) for s in range(3)] + [_rec("local", s, 0.5) for s in range(3)]
    homo = [_rec("dfml", s, 0.6) for s in range(3)] + [_rec("dfedavg", s, 0.7) for s in range(3)] + [_rec("local", s, 0.5) for s in range(3)]
    ce = [_rec("dfedavg", s, 0.55) for s in range(3)]
    f = _judge_dfml({"dfml-het": het, "dfml-homo": homo, "dfedavg-ce": ce}, QUICK)
    assert f.verdict.startswith("depends") and "3 of 4" in f.verdict


def test_the_table_ablation_reads_fedprox_mu_and_the_budget_from_the_runs() -> None:
    # QUICK: model lenet5, last partition shards:2, 2 rounds (the budget sweep runs 6)
    table = _table({("lenet5", "shards:2"): {"fedavg": 0.60, "fedprox": 0.61}, ("lenet5", "iid"): {"fedavg": 0.80, "fml": 0.74}})
    mu = [_rec("fedprox", s, v + 0.001 * s, model="lenet5", partition="shards:2", **{"fedprox.mu": m})
          for m, v in ((0.1, 0.59), (1.0, 0.50)) for s in range(3)]
    budget = [_rec(a, s, v + 0.001 * s, model="lenet5", partition="iid") for a, v in (("fedavg", 0.85), ("fml", 0.84)) for s in range(3)]
    f = _judge_table_ablation({"fml-table1": table, "fedprox-mu": mu, "fml-budget": budget}, QUICK)
    assert f.verdict == ("FedProx falls below FedAvg at μ = 0.1, 1; FML's IID gap to FedAvg narrows with the budget "
                         "(-6.00 at 2 rounds, -1.00 at 6)")
    assert "| 0.01 | 61.10 ± 0.10 | +1.00 [+1.00, +1.00] |" in f.lines and "| 1 | 50.10 ± 0.10 | -10.00 [-10.00, -10.00] |" in f.lines
    assert "| 6 | 85.10 ± 0.10 | 84.10 ± 0.10 | -1.00 [-1.00, -1.00] |" in f.lines


def test_the_dfml_ablation_says_whether_the_gap_closes_with_rounds() -> None:
    homo = [_rec("dfml", s, 0.30 + 0.01 * s) for s in range(3)] + [_rec("dfedavg", s, 0.45) for s in range(3)]
    longer = [_rec("dfml", s, 0.50 + 0.01 * s) for s in range(3)] + [_rec("dfedavg", s, 0.48) for s in range(3)]
    f = _judge_dfml_ablation({"dfml-homo": homo, "dfml-budget": longer}, QUICK)
    assert f.verdict == "DFML's gap to DFedAvg (WSM) closes with the budget (-14.00 at 2 rounds, +3.00 at 6)"
    assert _judge_dfml_ablation({"dfml-homo": homo, "dfml-budget": []}, QUICK).verdict == "the budget runs are missing"


def test_the_docs_section_is_replaced_between_its_markers(tmp_path: Path) -> None:
    doc = tmp_path / "results.md"
    doc.write_text(f"# Results\n\nintro\n\n{BEGIN}\nold\n{END}\n\n## Later\n")
    _update_docs(doc, "new claims")
    text = doc.read_text()
    assert "old" not in text and f"{BEGIN}\nnew claims\n{END}" in text and text.startswith("# Results\n\nintro") and "## Later" in text


@pytest.mark.pipeline
def test_the_quick_pipeline_runs_every_claim_end_to_end(tmp_path: Path) -> None:
    report = reproduce("quick", tmp_path / "out", docs=tmp_path / "results.md", log=lambda m: None)
    text = report.read_text()
    assert text.count("**Verdict: ") == 6 and text.count("**Finding: ") == 2 and "quick budget" in text
    assert (tmp_path / "results.md").read_text().count(BEGIN) == 1
    spec = (tmp_path / "out" / "quick" / "specs" / "fml-table1.toml").read_text()
    assert "seeds = [0, 1, 2]" in spec
    done = [json.loads(p.read_text())["status"] for p in (tmp_path / "out" / "quick").rglob("summary.json")]
    assert done and set(done) == {"completed"}
    # judged again with every run complete: the wall time reported is still the time the sweeps took, not this call's
    wall = json.loads((tmp_path / "out" / "quick" / "timing.json").read_text())
    assert set(wall) == {"fml-table1", "fml-mh", "fml-oh", "dfml-het", "dfml-homo", "dfedavg-ce", "dmlfl", "fedprox-mu", "fml-budget", "dfml-budget"} and min(wall.values()) > 0
    again = reproduce("quick", tmp_path / "out", log=lambda m: None).read_text()
    later = json.loads((tmp_path / "out" / "quick" / "timing.json").read_text())
    assert all(later[n] >= wall[n] for n in wall)
    assert f"{sum(later.values()) / 60:.1f} min of wall time" in again
