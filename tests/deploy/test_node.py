"""The remote runtime with its clients on nodes, over a transport in this process (no Flower).

The server's round runs on :class:`~fedmutual.runtimes.remote.Remote`, each client on a
:class:`~fedmutual.deploy.node.Node` that rebuilds its state from disk for every request (as a Flower
ClientApp process does), and requests and replies cross as plain records. Both runtimes run the same kernels
in the same order on the same data in one process, so the metrics must be identical (apart from ``seconds``),
whatever the CPU: the loop engine trains each client's job alone in both.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Mapping

import pytest
import torch

from fedmutual import Config
from fedmutual.deploy.node import Node
from fedmutual.deploy.store import StateStore, StoreError
from fedmutual.errors import ConfigError, FedmutualError
from fedmutual.experiment.runner import prepare_run, resume, run
from fedmutual.runtimes.inprocess import InProcess
from fedmutual.runtimes.remote import HELLO, Payload, Remote

from .loopback import Loopback

SERVER_BASED = ["fml", "fedavg", "fedprox", "local", "dmlfl", "asyncfl"]


def _cfg(tmp: Path, **over: Any) -> dict[str, Any]:
    return {"clients": 3, "rounds": 2, "limit_train": 600, "limit_test": 300, "engine": "loop", "threads": 1,
            "out": str(tmp / "runs"), "progress": False, **over}


def _nodes(cfg: Config, state: Path, ids: Mapping[int, int] | None = None) -> dict[int, Node]:
    ids = ids or {k: 100 + k for k in range(cfg.clients)}
    return {node: Node(cfg, k, cfg.clients, state, log=lambda m: None) for k, node in ids.items()}


def _remote(transport: Any, **kw: Any) -> Any:
    return functools.partial(Remote, transport=transport, timeout=5.0, wait=0.0, **kw)


def _strip(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.mark.parametrize("algorithm", SERVER_BASED)
def test_remote_runtime_equals_in_process(algorithm: str, tmp_path: Path) -> None:
    raw = _cfg(tmp_path, algorithm=algorithm)
    cfg = Config(**raw)
    far = run(Config(**{**raw, "name": "remote"}), quiet=True, runtime=_remote(Loopback(_nodes(cfg, tmp_path / "state"))))
    near = run(Config(**{**raw, "name": "in-process"}), quiet=True)
    assert _strip(far.metrics) == _strip(near.metrics)
    assert far.metrics[-1]["personal_acc"] and None not in far.metrics[-1]["personal_acc"]


def test_dmlfl_sends_predictions_only_after_setup_and_the_same_bytes(tmp_path: Path) -> None:
    raw = _cfg(tmp_path, algorithm="dmlfl", rounds=2)
    cfg = Config(**raw)
    far = run(Config(**{**raw, "name": "remote"}), quiet=True,
              runtime=_remote(Loopback(_nodes(cfg, tmp_path / "state")), record=True))
    near = run(Config(**{**raw, "name": "in-process"}), quiet=True, runtime=functools.partial(InProcess, record=True))
    rows = [json.loads(line) for line in (far.run_dir / "messages.jsonl").read_text().splitlines()]
    sim = [json.loads(line) for line in (near.run_dir / "messages.jsonl").read_text().splitlines()]
    key = lambda m: (m["round"], m["kind"], m["src"], m["dst"])  # noqa: E731
    assert sorted(map(key, rows)) == sorted(map(key, sim))
    assert {key(m): (m["bytes"], m["tensors"]) for m in rows} == {key(m): (m["bytes"], m["tensors"]) for m in sim}
    n_public = len(prepare_run(cfg).alg.run.public_set(0)[1])
    after_setup = [m for m in rows if m["tensors"] and m["kind"] != "init.model"]
    assert after_setup, "no message after initialization was recorded"
    for m in after_setup:  # predictions on the public set: one [public size, classes] tensor, never a layer's weights
        assert all(shape == [n_public, 10] for _, shape in m["tensors"].values()), m
    assert sum(m["bytes"] for m in rows) == sum(r["bytes_up"] + r["bytes_down"] for r in far.metrics)


def test_a_node_that_goes_down_is_a_late_reply_and_rejoins_from_its_disk_state(tmp_path: Path) -> None:
    raw = _cfg(tmp_path, algorithm="fml", rounds=4, name="down")
    cfg = Config(**raw)
    state = tmp_path / "state"
    tr = _DownInRound(_nodes(cfg, state), node=101, rounds={1})
    far = run(Config(**raw), quiet=True, runtime=_remote(tr))
    r2 = far.metrics[1]
    assert r2["faults"]["late"] == [1] and r2["personal_acc"][1] is None and r2["bytes_up_per_client"][1] == 0
    assert far.metrics[2]["faults"]["late"] == [] and far.metrics[2]["bytes_up_per_client"][1] > 0
    # the node of client 1 was rebuilt for every request from its disk: after round 2 it continued from round 1
    assert ("train.mutual", 101, 2) in [(k, n, r) for k, n, r in tr.handled]
    # the same run with client 1 absent from round 2 in process: the in-process runtime's drop-out of that round
    alone = run(Config(**{**raw, "name": "dropped"}), quiet=True, runtime=functools.partial(_DropInRound, client=1, t=1))
    a, b = _strip(far.metrics), _strip(alone.metrics)
    for ra, rb in zip(a, b):
        ra["faults"], rb["faults"] = {}, {}
    assert a[0] == b[0] and a[2:] == b[2:]  # rounds 3 and 4: client 1 went on from its own state of round 1
    # round 2: the same training and global model; the down node was not evaluated and its request went out unanswered
    assert {k: a[1][k] for k in ("global_acc", "train_loss_local", "train_loss_meme", "bytes_up")} == \
        {k: b[1][k] for k in ("global_acc", "train_loss_local", "train_loss_meme", "bytes_up")}


def test_a_listed_node_that_never_says_hello_is_not_asked_at_every_exchange(tmp_path: Path) -> None:
    raw = _cfg(tmp_path, algorithm="fedavg", rounds=2)
    cfg = Config(**raw)
    nodes = _nodes(cfg, tmp_path / "state")
    tr = Loopback(nodes)
    tr.live[999] = nodes[100]  # listed by the link, but its process is gone: it answers nothing
    tr.down = {999}
    tr.nodes = lambda: sorted(tr.live)  # type: ignore[method-assign]
    far = run(Config(**raw), quiet=True, runtime=functools.partial(Remote, transport=tr, timeout=600.0, wait=0.0))
    hellos = [n for kind, n, _ in tr.sent if kind == HELLO and n == 999]
    exchanges = sum(1 for kind, _, _ in tr.sent if kind != HELLO)
    assert hellos == [999] and exchanges > 3  # asked once: it is asked again only after a deadline (600 s) has passed
    assert all(None not in r["personal_acc"] for r in far.metrics)


def test_fewer_replies_than_min_replies_skip_the_round(tmp_path: Path) -> None:
    raw = _cfg(tmp_path, algorithm="fedavg", rounds=1, faults={"min_replies": 3})
    cfg = Config(**raw)
    tr = _DownInRound(_nodes(cfg, tmp_path / "state"), node=100, rounds={0})
    far = run(Config(**raw), quiet=True, runtime=_remote(tr))
    assert far.metrics[0]["faults"]["skipped"] and far.metrics[0]["faults"]["late"] == [0]


def test_resume_after_the_server_stopped_mid_round_goes_back_to_the_checkpoint(tmp_path: Path) -> None:
    raw = _cfg(tmp_path, algorithm="fml", rounds=3, name="stopped")
    cfg = Config(**raw)
    state = tmp_path / "state"
    with pytest.raises(KeyboardInterrupt):  # the server stops after the nodes trained round 3, before their replies count
        run(Config(**raw), quiet=True, runtime=_remote(_StopAfter(_nodes(cfg, state), t=2)))
    stopped = tmp_path / "runs" / "stopped"
    assert len((stopped / "metrics.jsonl").read_text().splitlines()) == 2
    assert any(p.name.startswith("r2-s0") for p in (state.glob("*/client0/*")))  # round 3's state, which the resume must drop
    done = resume(stopped, quiet=True, runtime=_remote(Loopback(_nodes(cfg, state))))
    near = run(Config(**{**raw, "name": "in-process"}), quiet=True)
    assert _strip(done.metrics) == _strip(near.metrics)


def test_simulated_faults_are_refused_on_real_nodes(tmp_path: Path) -> None:
    raw = _cfg(tmp_path, algorithm="fedavg", faults={"crash": 0.5})
    with pytest.raises(ConfigError, match="simulated faults"):
        run(Config(**raw), quiet=True, runtime=_remote(Loopback({})))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_node_of_another_run_shape_is_refused(tmp_path: Path) -> None:
    cfg = Config(**_cfg(tmp_path, algorithm="fedavg"))
    with pytest.raises(ConfigError, match="num-partitions = 4"):
        Node(cfg, 0, 4, tmp_path, log=lambda m: None)
    with pytest.raises(ConfigError, match="partition-id = 3"):
        Node(cfg, 3, 3, tmp_path, log=lambda m: None)


def test_too_few_nodes_within_the_wait_is_a_plain_error(tmp_path: Path) -> None:
    raw = _cfg(tmp_path, algorithm="fedavg", faults={"min_replies": 2})
    cfg = Config(**raw)
    nodes = _nodes(cfg, tmp_path / "state", {0: 100})
    with pytest.raises(FedmutualError, match="only 1 of 3 clients' nodes connected"):
        run(Config(**raw), quiet=True, runtime=_remote(Loopback(nodes)))


def test_a_node_with_data_of_its_own_reads_its_directory(tmp_path: Path) -> None:
    cfg = Config(**_cfg(tmp_path, algorithm="fml"))
    node = Node(cfg, 1, 3, tmp_path / "state", data_dir="/usr/share/datasets/fashion-mnist", log=lambda m: None)
    assert node.data.n == 60000 and node.env.k == 1
    with pytest.raises(ConfigError, match="carves its public set"):
        Node(Config(**_cfg(tmp_path, algorithm="dmlfl")), 0, 3, tmp_path / "s", data_dir="/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------------- the node's store


def _tensors(v: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2,), v)}


def test_store_continues_a_round_then_from_the_newest_earlier_round(tmp_path: Path) -> None:
    s = StateStore(tmp_path, keep=3)
    assert s.find(0, 0) is None  # nothing stored: the initial state
    s.write(-1, 0, _tensors(-1), {"x": 1})
    s.write(0, 0, _tensors(0), {})
    s.write(1, 0, _tensors(1), {})
    assert s.find(1, 0) == (1, 0)  # a second request in round 1
    assert s.find(3, 0) == (1, 0)  # missed round 2: from round 1
    tensors, tree = s.read((-1, 0))
    assert torch.equal(tensors["w"], torch.full((2,), -1.0)) and tree == {"x": 1}


def test_store_a_new_session_drops_the_abandoned_rounds(tmp_path: Path) -> None:
    s = StateStore(tmp_path, keep=5)
    for t in range(4):
        s.write(t, 0, _tensors(t), {})
    assert s.find(2, 1) == (1, 0)  # resumed after round 2: rounds 3 and 4 of session 0 are gone
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["r0-s0.json", "r1-s0.json"]
    s.write(2, 1, _tensors(9), {})
    assert s.find(3, 1) == (2, 1)


def test_store_keeps_only_the_rounds_a_resume_can_need(tmp_path: Path) -> None:
    s = StateStore(tmp_path, keep=2)
    for t in range(6):
        s.write(t, 0, _tensors(t), {})
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["r3-s0.json", "r4-s0.json", "r5-s0.json"]


def test_store_refuses_a_state_that_does_not_match_its_digest(tmp_path: Path) -> None:
    s = StateStore(tmp_path)
    s.write(0, 0, _tensors(0), {})
    (tmp_path / "r0-s0.safetensors").write_bytes(b"garbage")
    with pytest.raises(StoreError, match="does not match its digest"):
        s.read((0, 0))


# ---------------------------------------------------------------------- transports with faults


class _DownInRound(Loopback):
    """Node ``node`` answers nothing in the given rounds (a killed node), and is rebuilt when it comes back."""

    def __init__(self, nodes: Mapping[int, Node], node: int, rounds: set[int]):
        super().__init__(nodes)
        self.node, self.rounds = node, rounds
        self.handled: list[tuple[str, int, int]] = []

    def exchange(self, kind: str, requests: Mapping[int, Payload], timeout: float) -> dict[int, Payload | str]:
        t = next((int(r["round"]) for r in requests.values()), None)  # type: ignore[arg-type]
        self.down = {self.node} if t in self.rounds and kind != HELLO else set()
        out = {n: r for n, r in super().exchange(kind, {n: q for n, q in requests.items() if n not in self.down}, timeout).items()}
        self.handled += [(kind, n, int(requests[n]["round"])) for n in out]  # type: ignore[arg-type]
        return out

    def nodes(self) -> list[int]:
        return sorted(self.live)  # still listed: its requests go out and time out


class _DropInRound(InProcess):
    """The in-process runtime with ``client`` offline in round ``t``."""

    def __init__(self, *args: Any, client: int, t: int, **kw: Any):
        super().__init__(*args, **kw)
        self.client_down, self.t_down = client, t

    def run_round(self, t: int, participants: list[int], plan: Any) -> dict[str, float]:
        if t == self.t_down:
            plan.dropped = [self.client_down]
        return super().run_round(t, participants, plan)

    def client_accuracies(self, server: Any) -> list[dict[str, Any]] | None:
        return None


class _StopAfter(Loopback):
    """The server stops (as at Ctrl-C) after the nodes handled the first exchange of round ``t``."""

    def __init__(self, nodes: Mapping[int, Node], t: int):
        super().__init__(nodes)
        self.t = t

    def exchange(self, kind: str, requests: Mapping[int, Payload], timeout: float) -> dict[int, Payload | str]:
        out = super().exchange(kind, requests, timeout)
        if any(int(r["round"]) == self.t for r in requests.values()):  # type: ignore[arg-type]
            raise KeyboardInterrupt
        return out
