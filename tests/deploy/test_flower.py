"""FML over a real Flower deployment on localhost: a SuperLink and 3 SuperNodes, TLS and node authentication on.

The metrics must equal the in-process run's with the same config and seed on the loop engine, exactly: each
SuperNode runs the same kernels on the same data in the same order as the in-process runtime (one job per
cohort), on this same machine, and the messages are the same safetensors bytes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("flwr")

from fedmutual import Config  # noqa: E402
from fedmutual.deploy.app import write_app  # noqa: E402
from fedmutual.experiment.runner import run  # noqa: E402

from .cluster import Federation  # noqa: E402


def test_fml_on_flower_equals_the_in_process_run(tmp_path: Path) -> None:
    raw = {"algorithm": "fml", "clients": 3, "rounds": 2, "limit_train": 600, "limit_test": 300, "engine": "loop",
           "threads": 1, "out": str(tmp_path / "runs"), "progress": False}
    app = write_app(Config(**raw), tmp_path / "app", root_certificates=str(tmp_path / "unused-ca.crt"))
    with Federation(tmp_path / "fed", nodes=3) as fed:  # TLS and SuperNode authentication are on by default
        fed.start_superlink()
        for i in range(3):
            fed.start_supernode(i, {"partition-id": i, "num-partitions": 3, "state-dir": str(tmp_path / f"state{i}")})
        run_id = fed.submit(app, {"name": "flower", "timeout": 120.0, "wait": 60.0})
        fed.wait(run_id, timeout=480)
        node_log = fed.log("supernode1")
    from fedmutual.report.metrics import read_metrics

    far = read_metrics(tmp_path / "runs" / "flower" / "metrics.jsonl")
    near = run(Config(**{**raw, "name": "in-process"}), quiet=True).metrics
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert len(far) == 2 and strip(far) == strip(near)
    assert "client 1: train.mutual (round 2) from its state of round 1 (session 0)" in node_log
    assert (tmp_path / "runs" / "flower" / "summary.json").is_file()
