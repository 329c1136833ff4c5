"""Sweeps: the grid × seeds expansion, refusals, and a sweep killed mid-run that resumes to the same runs and report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmutual.errors import ConfigError
from fedmutual.experiment.sweep import load_sweep, status
from fedmutual.report.metrics import read_metrics


def _spec(tmp: Path, out: Path, body: str = "") -> Path:
    p = tmp / "spec.toml"
    p.write_text(f"""name = "sw"
seeds = [0, 1]
[base]
clients = 2
rounds = 3
limit_train = 300
limit_test = 200
threads = 1
engine = "loop"
progress = false
out = "{out}"
[grid]
algorithm = ["fedavg", "fml"]
{body}""")
    return p


def test_the_grid_times_the_seeds_gives_named_points(tmp_path: Path) -> None:
    sweep = load_sweep(_spec(tmp_path, tmp_path / "runs", 'fml.alpha = [0.3, 0.5]\n'))
    assert [p.name for p in sweep.points][:3] == ["algorithm=fedavg,fml.alpha=0.3,seed=0", "algorithm=fedavg,fml.alpha=0.3,seed=1",
                                                  "algorithm=fedavg,fml.alpha=0.5,seed=0"]
    assert len(sweep.points) == 2 * 2 * 2 and sweep.dir == tmp_path / "runs" / "sw"
    p = sweep.points[-1]
    assert p.config["algorithm"] == "fml" and p.config["fml"]["alpha"]["value"] == 0.5 and p.config["seed"] == 1 and p.config["rounds"] == 3


@pytest.mark.parametrize("body, message", [
    ("model = []\n", "non-empty list"),
    ("seed = [1, 2]\n", "give seeds as seeds"),
    ("rounds = [0]\n", "point algorithm=fedavg,rounds=0,seed=0"),
])
def test_a_bad_sweep_is_refused_before_anything_runs(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_sweep(_spec(tmp_path, tmp_path / "runs", body))
    assert not (tmp_path / "runs").exists()


def _sweep(spec: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "fedmutual", "sweep", str(spec)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)


def _strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_a_killed_sweep_resumes_to_the_same_runs_and_report(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    (tmp_path / "a").mkdir()
    whole = _spec(tmp_path / "a", tmp_path / "a" / "runs")
    proc = _sweep(whole, env)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode() if proc.stderr else ""

    (tmp_path / "b").mkdir()
    spec = _spec(tmp_path / "b", tmp_path / "b" / "runs")
    sweep = load_sweep(spec)
    proc = _sweep(spec, env)
    deadline = time.monotonic() + 600
    # kill it once the second run has a checkpoint but is not complete: a run in the middle
    second = sweep.dir / sweep.points[1].name
    while status(second) != "resumable":
        assert time.monotonic() < deadline and proc.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert status(sweep.dir / sweep.points[0].name) == "completed" and status(second) == "resumable"
    assert status(sweep.dir / sweep.points[-1].name) == "new"
    proc = _sweep(spec, env)
    assert proc.wait(timeout=600) == 0
    log = proc.stderr.read().decode() if proc.stderr else ""
    assert "1 already complete, 3 to run" in log and "(resumable)" in log

    a, b = tmp_path / "a" / "runs" / "sw", sweep.dir
    names = sorted(p.name for p in a.iterdir() if p.is_dir() and p.name != "report")
    assert names == sorted(p.name for p in b.iterdir() if p.is_dir() and p.name != "report") == sorted(p.name for p in sweep.points)
    for n in names:
        assert _strip(read_metrics(a / n / "metrics.jsonl")) == _strip(read_metrics(b / n / "metrics.jsonl")), n
    assert (a / "report" / "report.md").read_text() == (b / "report" / "report.md").read_text()
    assert json.loads((b / sweep.points[1].name / "summary.json").read_text())["status"] == "completed"
