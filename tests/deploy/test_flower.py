"""The server-based methods over a real Flower deployment on localhost: a SuperLink and 3 SuperNodes, with TLS
and SuperNode authentication on, started as separate processes by :class:`tests.deploy.cluster.Federation`.

FML's metrics must equal the in-process run's with the same config and seed on the loop engine, exactly: each
SuperNode runs the same kernels on the same data in the same order as the in-process runtime (one job per
cohort), on this same machine, and the messages are the same safetensors bytes.
"""

from __future__ import annotations

import json
import re
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr")

from fedmutual import Config  # noqa: E402
from fedmutual.deploy.app import write_app  # noqa: E402
from fedmutual.experiment.runner import prepare_run, run  # noqa: E402
from fedmutual.report.metrics import read_metrics  # noqa: E402
from fedmutual.runtimes.inprocess import InProcess  # noqa: E402

from .cluster import Federation  # noqa: E402

pytestmark = pytest.mark.deploy


def _raw(tmp: Path, **over: Any) -> dict[str, Any]:
    return {"algorithm": "fml", "clients": 3, "rounds": 2, "limit_train": 600, "limit_test": 300, "engine": "loop",
            "threads": 1, "out": str(tmp / "runs"), "progress": False, **over}


def _start(fed: Federation, tmp: Path) -> None:
    fed.start_superlink()
    fed.start_supernodes({i: _node_config(tmp, i) for i in range(fed.nodes)})


def _node_config(tmp: Path, i: int) -> dict[str, str | int | float]:
    return {"partition-id": i, "num-partitions": 3, "state-dir": str(tmp / f"state{i}")}


def _strip(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_fml_on_flower_equals_the_in_process_run(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    app = write_app(Config(**raw), tmp_path / "app", root_certificates=str(tmp_path / "unused-ca.crt"))
    with Federation(tmp_path / "fed", nodes=3) as fed:  # TLS and SuperNode authentication are on by default
        _start(fed, tmp_path)
        run_id = fed.submit(app, {"name": "flower", "timeout": 120.0, "wait": 60.0})
        fed.wait(run_id, timeout=480)
        node_log = fed.log("supernode1")
    far = read_metrics(tmp_path / "runs" / "flower" / "metrics.jsonl")
    near = run(Config(**{**raw, "name": "in-process"}), quiet=True).metrics
    assert len(far) == 2 and _strip(far) == _strip(near)
    assert "client 1: train.mutual (round 2) from its state of round 1 (session 0)" in node_log
    assert (tmp_path / "runs" / "flower" / "summary.json").is_file()


def test_dmlfl_on_flower_sends_predictions_only_with_the_simulation_s_bytes(tmp_path: Path) -> None:
    raw = _raw(tmp_path, algorithm="dmlfl")
    app = write_app(Config(**raw), tmp_path / "app", root_certificates=str(tmp_path / "unused-ca.crt"))
    with Federation(tmp_path / "fed", nodes=3) as fed:
        _start(fed, tmp_path)
        run_id = fed.submit(app, {"name": "flower", "timeout": 120.0, "wait": 60.0, "record-messages": True})
        fed.wait(run_id, timeout=480)
    far_dir = tmp_path / "runs" / "flower"
    near = run(Config(**{**raw, "name": "in-process"}), quiet=True, runtime=partial(InProcess, record=True))
    rows = [json.loads(line) for line in (far_dir / "messages.jsonl").read_text().splitlines()]
    sim = [json.loads(line) for line in (near.run_dir / "messages.jsonl").read_text().splitlines()]
    key = lambda m: (m["round"], m["kind"], m["src"], m["dst"])  # noqa: E731
    assert sorted(map(key, rows)) == sorted(map(key, sim))
    assert {key(m): (m["bytes"], m["tensors"]) for m in rows} == {key(m): (m["bytes"], m["tensors"]) for m in sim}
    n_public = len(prepare_run(Config(**raw)).alg.run.public_set(0)[1])
    after_setup = [m for m in rows if m["tensors"] and m["kind"] != "init.model"]
    assert after_setup, "no message after initialization was recorded"
    for m in after_setup:  # predictions on the public set: one [public size, classes] tensor, never a layer's weights
        assert all(shape == [n_public, 10] for _, shape in m["tensors"].values()), m
    far = read_metrics(far_dir / "metrics.jsonl")
    assert sum(m["bytes"] for m in rows) == sum(r["bytes_up"] + r["bytes_down"] for r in far)
    assert _strip(far) == _strip(near.metrics)


def test_a_killed_supernode_is_a_recorded_fault_and_rejoins_from_its_disk(tmp_path: Path) -> None:
    raw = _raw(tmp_path, rounds=4)
    app = write_app(Config(**raw), tmp_path / "app", root_certificates=str(tmp_path / "unused-ca.crt"))
    metrics = tmp_path / "runs" / "flower" / "metrics.jsonl"
    with Federation(tmp_path / "fed", nodes=3) as fed:
        _start(fed, tmp_path)
        run_id = fed.submit(app, {"name": "flower", "timeout": 40.0, "wait": 60.0})
        deadline = time.monotonic() + 300
        while not (metrics.is_file() and read_metrics(metrics)):
            assert time.monotonic() < deadline and fed.status(run_id)["state"] != "finished", fed.report(run_id, "no round 1")
            time.sleep(1.0)
        fed.kill_supernode(2)  # mid-run: round 2 is under way
        fed.start_supernode(2, _node_config(tmp_path, 2))  # once the link counts it offline (about 60 s)
        fed.wait(run_id, timeout=600)
        node_log = fed.log("supernode2").split("harness: SIGKILLed", 1)[1]
    rows = read_metrics(metrics)
    assert len(rows) == 4
    r2 = rows[1]
    faults = r2["faults"]
    assert 2 in faults["late"] + faults["crashed"] + faults["dropped"] and not faults["skipped"]
    assert r2["personal_acc"][2] is None and r2["personal_acc"][0] is not None and r2["bytes_up_per_client"][2] == 0
    # after its restart the node went on from its personalized model of round 1, the last round it answered
    back = [int(t) for t in re.findall(r"client 2: train\.mutual \(round (\d+)\) from its state of round 1 \(session 0\)", node_log)]
    assert back and min(back) >= 3, node_log[-3000:]
    assert rows[-1]["personal_acc"][2] is not None and rows[-1]["bytes_up_per_client"][2] > 0
