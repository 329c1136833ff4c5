"""DFML and DFedAvg as separate peer processes on localhost, with mutual TLS and no server.

The merged metrics must equal the in-process run's with the same config and seed on the loop engine, exactly:
every peer runs the same kernels on the same data in the same order as the in-process runtime (the aggregator's
cohort is one job, as the loop engine trains it), on this same machine, and the messages are the same
safetensors bytes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("grpc")

from fedmutual import Config  # noqa: E402
from fedmutual.algorithms.dfml import draw_round  # noqa: E402
from fedmutual.deploy.peer import merge_reports  # noqa: E402
from fedmutual.experiment.runner import run  # noqa: E402
from fedmutual.report.metrics import read_metrics  # noqa: E402

from .peers import PeerCluster  # noqa: E402

pytestmark = pytest.mark.deploy


def _raw(tmp: Path, **over: Any) -> dict[str, Any]:
    return {"algorithm": "dfml", "clients": 4, "rounds": 3, "model": "mlp,lenet5,cnn1", "limit_train": 800, "limit_test": 300,
            "engine": "loop", "threads": 1, "out": str(tmp / "runs"), "progress": False, **over}


def _strip(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_heterogeneous_dfml_over_peers_equals_the_in_process_run_and_models_reach_only_the_aggregator(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    with PeerCluster(tmp_path / "peers", raw, n=4) as peers:
        for k in range(4):
            peers.start(k)
        codes = [peers.wait(k, 420) for k in range(4)]
        assert codes == [0, 0, 0, 0], "\n".join(peers.tail(k) for k in range(4))
        dirs = [peers.dir(k) for k in range(4)]
    merged = merge_reports(dirs, tmp_path / "merged")
    far = read_metrics(merged / "metrics.jsonl")
    near = run(Config(**{**raw, "name": "in-process"}), quiet=True).metrics
    assert len(far) == 3 and _strip(far) == _strip(near)  # bytes per peer included: bytes_up/down_per_client
    assert json.loads((merged / "summary.json").read_text())["status"] == "completed"

    # privacy, from every peer's own transport log: a model only ever travels between its owner and the round's aggregator
    models = 0
    for k in range(4):
        for m in map(json.loads, (dirs[k] / "transport.jsonl").read_text().splitlines()):
            if not m["tensors"] or m["kind"].startswith("peer."):
                continue
            models += 1
            a = draw_round(raw.get("seed", 0), m["round"], 4, 4)[1]
            assert a in (m["src"], m["dst"]), m  # every message with tensors has the aggregator at one end
            owner = int(m["meta"]["owner"])
            assert owner in (m["src"], m["dst"]) and {m["src"], m["dst"]} == {owner, a}, m
    assert models == 2 * 3 * 3 * 2  # per round: 3 peers' models to the aggregator and back, each logged by both ends


def test_dfedavg_over_peers_equals_the_in_process_run(tmp_path: Path) -> None:
    raw = _raw(tmp_path, algorithm="dfedavg", model="lenet5")
    with PeerCluster(tmp_path / "peers", raw, n=4) as peers:
        for k in range(4):
            peers.start(k)
        codes = [peers.wait(k, 420) for k in range(4)]
        assert codes == [0, 0, 0, 0], "\n".join(peers.tail(k) for k in range(4))
        dirs = [peers.dir(k) for k in range(4)]
    far = read_metrics(merge_reports(dirs, tmp_path / "merged") / "metrics.jsonl")
    near = run(Config(**{**raw, "name": "in-process"}), quiet=True).metrics
    assert len(far) == 3 and _strip(far) == _strip(near)


def _schedule(clients: int, rounds: int) -> tuple[int, int, int]:
    """A seed, a peer to kill after round 1 and the aggregator of round 3 to kill, such that neither aggregates
    round 2, the killed peer aggregates nothing later, and the killed aggregator aggregates nothing after round 3."""
    for seed in range(200):
        agg = [draw_round(seed, t, clients, clients)[1] for t in range(rounds)]
        x, a3 = next((k for k in range(clients) if k not in agg[1:] ), None), agg[2]
        if x is not None and x != a3 and agg[1] not in (x, a3) and a3 not in agg[3:] and agg[0] != x:
            return seed, x, a3
    raise AssertionError("no seed fits the schedule")


def test_a_killed_peer_is_a_late_reply_a_killed_aggregator_skips_its_round_and_a_restarted_peer_rejoins(tmp_path: Path) -> None:
    seed, x, a3 = _schedule(4, 5)
    raw = _raw(tmp_path, rounds=5, seed=seed, model="lenet5")
    with PeerCluster(tmp_path / "peers", raw, n=4, timeout=10.0, round_timeout=25.0) as peers:
        for k in range(4):
            peers.start(k)
        peers.wait_rows(x, 1, 300)
        peers.kill(x)  # not an aggregator: round 2 goes on without its model
        peers.wait_rows(a3, 2, 300)
        peers.kill(a3)  # round 3's aggregator: round 3 is skipped, the federation goes on
        peers.start(x)  # back with its state on disk
        for k in range(4):
            if k != a3:
                assert peers.wait(k, 420) == 0, peers.tail(k)
        dirs = [peers.dir(k) for k in range(4)]
        before_kill, log_x = peers.log(x).split("===== SIGKILLed", 1)
    rows = read_metrics(merge_reports(dirs, tmp_path / "merged") / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5]
    r2, r3 = rows[1], rows[2]
    assert x in r2["faults"]["late"] and not r2["faults"]["skipped"] and r2["bytes_up_per_client"][x] == 0
    assert r2["personal_acc"][x] is None and sum(v is not None for v in r2["personal_acc"]) == 3
    assert r3["faults"]["skipped"] and r3["faults"]["aggregator_down"] == a3
    mine = {r["round"]: r for r in read_metrics(dirs[x] / "metrics.jsonl")}
    assert mine[2]["absent"] and mine[3]["absent"]  # rounds the federation finished while it was down
    assert rows[-1]["personal_acc"][x] is not None and rows[-1]["bytes_up_per_client"][x] > 0
    assert a3 in rows[-1]["faults"]["late"]
    # it went on from the state it last wrote before it was killed (after round 1, or round 2's request if it came first)
    last = max(int(r) for r in re.findall(rf"client {x}: \S+ \(round (\d+)\)", before_kill))
    assert re.search(rf"client {x}: query\.model \(round [45]\) from its state of round {last} \(session 0\)", log_x), log_x
