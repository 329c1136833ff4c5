"""The report over run directories: found runs, tidy CSVs, mean ± sd per cell, paired differences, load_runs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
import pytest

from fedmutual.cli import main
from fedmutual.report.runs import find_runs, load_runs, report_tables, write_report


def _run(root: Path, name: str, algorithm: str, seed: int, finals: list[float], personal: float, model: str = "lenet5") -> Path:
    d = root / name
    d.mkdir(parents=True)
    config = {"algorithm": algorithm, "seed": seed, "model": model, "clients": 2, "rounds": len(finals), "out": str(root),
              "name": name, "fml": {"alpha": 0.5}}
    rows = [{"round": t + 1, "global_acc": acc, "client_acc_global_test_mean": acc, "personal_acc_mean": personal,
             "client_acc_global_test": [acc, acc], "personal_acc": [personal, personal], "bytes_up": 10, "bytes_down": 20,
             "bytes_up_per_client": [4, 6], "bytes_down_per_client": [10, 10], "seconds": 1.0} for t, acc in enumerate(finals)]
    (d / "config.json").write_text(json.dumps(config))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "summary.json").write_text(json.dumps({"status": "completed", "final_global_acc": finals[-1], "best_global_acc": max(finals),
                                                "final_client_acc_global_test_mean": finals[-1], "final_personal_acc_mean": personal}))
    return d


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    for seed, (a, b) in enumerate([(0.80, 0.60), (0.70, 0.65), (0.90, 0.70)]):
        _run(root, f"fml-s{seed}", "fml", seed, [0.5, a], 0.9)
        _run(root, f"fedavg-s{seed}", "fedavg", seed, [0.4, b], 0.5)
    (root / "fml-s0" / "peer.json").write_text("{}")  # a peer's own directory is never a run
    return root


def test_cells_hold_the_seeds_and_the_table_is_mean_and_sd(runs: Path) -> None:
    found = find_runs([runs])
    assert len(found) == 5  # fml-s0 is a peer directory
    text = report_tables(found)
    # fedavg final global over seeds 0.60, 0.65, 0.70: mean 65.00, sd 5.00 (points)
    assert "| fedavg | 3 | 65.00 ± 5.00 |" in text
    assert "| fml | 2 | 80.00 ± 14.14 |" in text  # 0.70, 0.90: sd = 0.1 * sqrt(2)


def test_paired_differences_are_over_the_shared_seeds(tmp_path: Path, runs: Path) -> None:
    (runs / "fml-s0" / "peer.json").unlink()
    text = report_tables(find_runs([runs]))
    # fedavg - fml per seed: -0.20, -0.05, -0.20 -> mean -15.00 points, half-width 4.302653 * 0.0866025 / sqrt(3)
    half = 100 * 4.302653 * math.sqrt(0.015 / 2) / math.sqrt(3)
    assert f"| all runs | fedavg − fml | 3 | -15.00 | [{-15 - half:+.2f}, {-15 + half:+.2f}] |" in text
    # personal: 0.5 - 0.9 on every seed: no spread, so the interval is the point itself
    assert "| all runs | fedavg − fml | 3 | -40.00 | [-40.00, -40.00] |" in text


def test_tidy_files_have_one_row_per_run_round_and_client(tmp_path: Path, runs: Path) -> None:
    out = write_report([runs], tmp_path / "report")
    with open(out / "rounds.csv") as f:
        rounds = list(csv.DictReader(f))
    with open(out / "clients.csv") as f:
        clients = list(csv.DictReader(f))
    assert len(rounds) == 5 * 2 and len(clients) == 5 * 2 * 2
    first = next(r for r in rounds if r["run"] == "fedavg-s1" and r["round"] == "2")
    assert first["algorithm"] == "fedavg" and first["seed"] == "1" and float(first["global_acc"]) == 0.65
    c = next(r for r in clients if r["run"] == "fedavg-s1" and r["round"] == "2" and r["client"] == "1")
    assert float(c["test_acc"]) == 0.65 and c["bytes_up"] == "6"
    assert (out / "curves.png").is_file() and (out / "curves.pdf").is_file() and (out / "report.md").is_file()


def test_load_runs_joins_summaries_and_configs(runs: Path) -> None:
    pytest.importorskip("pandas")
    df = load_runs([runs])
    assert len(df) == 5 and set(df["config.algorithm"]) == {"fml", "fedavg"}
    assert df.loc[df["run_dir"].str.endswith("fedavg-s2"), "final_global_acc"].item() == 0.70
    assert "config.fml.alpha" in df.columns


def test_the_report_command_refuses_a_directory_without_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no run directories" in err[0]
