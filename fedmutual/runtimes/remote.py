"""A runtime whose clients live elsewhere: the server's round in this process, each client's state on its own node.

:class:`Remote` is the in-process runtime with the clients taken out. The coordinator's round runs here exactly as
in simulation; each :class:`~fedmutual.protocol.Ask` becomes one request per addressed client, sent through a
:class:`Transport` (Flower's grid, :mod:`fedmutual.runtimes.flower`) to the node that hosts it, and the node runs the
algorithm's own handler on its own state (:class:`fedmutual.deploy.node.Node`). Messages travel as the same
safetensors bytes as in simulation, so they are counted byte for byte alike, and every reply passes the same
validation (:func:`fedmutual.protocol.validation.receive`).

Faults are real here: a client whose node is not connected is *dropped*; a node that answers with an error (it
crashed, or refused the request) is *crashed*; a node with no answer by the exchange's deadline is *late*. A round
then continues with the replies that arrived, and ``faults.min_replies`` holds as in simulation.

A request is a flat record (:data:`Payload`) of plain values, which any transport can carry:

- ``data``: the message's safetensors bytes (empty for a bare request, which costs nothing);
- ``round``: the round (0-based; -1 for the one-off setup), ``session``: how many times the run was resumed,
  ``run``: the run's id, so that a node keeps its state per run and per round and can rejoin after a restart.

A reply carries ``data``, and, when the node trained, ``steps`` and ``loss`` (training telemetry, not part of the
algorithm's message), or ``error``: why the node could not answer.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any, Callable, Mapping, Protocol, Sequence, Union

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedmutual.engine.cohort import JobResult, accuracy
from fedmutual.errors import ConfigError, FedmutualError
from fedmutual.protocol import Algorithm, Ask, ClientData, ClientEnv, Message, Replies, State
from fedmutual.protocol.messages import encode
from fedmutual.protocol.state import dump, load
from fedmutual.protocol.validation import MessageRejected, receive
from fedmutual.runtimes.inprocess import InProcess, party_name

#: A request or a reply: plain values only (what a Flower ConfigRecord holds).
Value = Union[int, float, str, bytes, bool, list[float]]
Payload = dict[str, Value]

#: Message types of the runtime itself (every other type is an algorithm's handler).
HELLO = "query.fedmutual_hello"
EVALUATE = "evaluate.fedmutual"


class Transport(Protocol):
    """How the server reaches the nodes."""

    def nodes(self) -> list[int]:
        """The ids of the nodes connected now."""

    def exchange(self, kind: str, requests: Mapping[int, Payload], timeout: float) -> dict[int, Payload | str]:
        """Send each node its request as message type ``kind``; wait at most ``timeout`` seconds for the replies.

        Returns each node's reply, or a string saying why its answer is an error; a node with no answer by the
        deadline is absent."""


class Remote(InProcess):
    """The in-process runtime with every client on a node reached through ``transport``.

    ``timeout`` is the deadline of one exchange in seconds; ``wait`` how long the first exchange waits for every
    client's node to connect (the run then goes on with the nodes it has, if at least ``faults.min_replies``).
    """

    def __init__(self, alg: Algorithm, envs: Sequence[ClientEnv], log: Callable[[str], None] | None = None,
                 engine: str | None = None, record: bool = False, *, transport: Transport, timeout: float = 600.0,
                 wait: float = 600.0, hello_timeout: float = 60.0):
        cfg = alg.cfg
        f = cfg.faults
        simulated = [name for name, on in (("faults.dropout", f.dropout), ("faults.crash", f.crash), ("faults.straggler", f.straggler),
                                           ("faults.deadline", f.deadline is not None), ("attack", cfg.attack.kind != "none")) if on]
        if simulated:
            raise ConfigError(f"{', '.join(simulated)}: simulated faults and attacks are for the in-process runtime; "
                              "on real nodes the faults are real (set the exchange deadline with the runtime's timeout)")
        if not timeout > 0 or not math.isfinite(timeout):
            raise ConfigError(f"timeout: {timeout}; give the deadline of one exchange in seconds (> 0)")
        self.transport, self.timeout, self.wait, self.hello_timeout = transport, float(timeout), float(wait), float(hello_timeout)
        self.me_name = "server"  # the coordinator's name in byte counts
        self.run_id = uuid.uuid4().hex
        self.session = 0
        self.node_of: dict[int, int] = {}  # client -> node id
        self.client_of: dict[int, int] = {}  # node id -> client
        self._tag = -1
        self._waited = False
        self._quiet: dict[int, float] = {}  # node id -> when to ask it again which client it hosts
        self._send_server: bool | None = None  # whether evaluating a client needs the server's state (learnt once)
        super().__init__(alg, envs, log, engine, record)

    # ------------------------------------------------------------------ states

    def _init_client(self, env: ClientEnv) -> State:
        return State()  # a client's state lives on its node

    def client_state(self, k: int) -> State:
        raise FedmutualError(f"client {k}'s state lives on its node, not with the server")

    def dump(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The server's state, and the run's id and session (the clients keep their states on their nodes)."""
        tensors, tree = dump(self.server_state(), "server/")
        return tensors, {"server": tree, "remote": {"run": self.run_id, "session": self.session}}

    def load(self, tensors: dict[str, torch.Tensor], tree: dict[str, Any]) -> None:
        """Restore the server; the run keeps its id, in a new session, so that nodes go back to the matching round."""
        load(self.server, tensors, tree["server"], self.alg.run.new_model, "server/")
        meta = tree.get("remote")
        if not isinstance(meta, dict):
            raise FedmutualError("the checkpoint was written by the in-process runtime; its clients' states are in it, "
                                 "not on nodes: resume it in process")
        self.run_id, self.session = str(meta["run"]), int(meta["session"]) + 1

    def count_steps(self, t: int, participants: Sequence[int]) -> int:
        return 0  # the nodes train; the server sees no steps

    # ------------------------------------------------------------------ rounds

    def setup(self) -> None:
        self._tag = -1
        super().setup()

    def run_round(self, t: int, participants: list[int], plan: Any) -> dict[str, float]:
        self._tag = t
        return super().run_round(t, participants, plan)

    def _request(self, data: bytes = b"", **extra: Value) -> Payload:
        return {"data": data, "round": self._tag, "session": self.session, "run": self.run_id, **extra}

    def _exchange(self, ask: Ask) -> Replies:
        if self.coord is not None:
            raise FedmutualError(f"{self.alg.name}: client {self.coord} coordinates round {self.round + 1}; a method "
                                 "without a server runs on the peer-to-peer runtime (fedmutual peer)")
        return self._quorum(ask, None, *self._send(ask))

    def _send(self, ask: Ask) -> tuple[Replies, int]:
        """One ask's requests to the clients' nodes: the valid replies, and how many requests went out."""
        nodes = self._connected()
        self.traffic.kind = ask.kind
        requests: dict[int, Payload] = {}
        order: list[tuple[int, int]] = []
        for k, msg in ask.to.items():
            if not 0 <= k < len(self.envs):
                raise FedmutualError(f"{self.alg.name}: round {self.round + 1} asks client {k} ({ask.kind}), "
                                     f"but the run has clients 0..{len(self.envs) - 1}")
            node = nodes.get(k)
            if node is None:
                if k not in self.events.dropped:
                    self.events.dropped.append(k)
                continue
            data = b"" if msg.empty else encode(msg)
            if data:
                self.traffic.add(self.me_name, party_name(k), len(data), msg.meta, msg.tensors)
            requests[node] = self._request(data)
            order.append((k, node))
        got = self.transport.exchange(ask.kind, requests, self.timeout) if requests else {}
        replies = Replies()
        for k, node in order:
            r = self._answer(k, got.get(node))
            if r is None:
                continue
            if "steps" in r:
                loss = r.get("loss", [])
                replies.trained[k] = JobResult(k, as_int(r, "steps"), [float(v) for v in loss] if isinstance(loss, list) else [])
            data = as_bytes(r, "data")
            if not data:
                replies[k] = Message()
                continue
            try:
                msg = receive(data, ask.like, self.max_bytes)
            except MessageRejected as e:
                self.traffic.add(party_name(k), self.me_name, len(data), {})
                self.events.rejected.append({"client": k, "reason": e.reason})
                self.log(f"fedmutual: round {self.round + 1}: rejected the message from {party_name(k)} to {self.me_name}: {e.reason}")
                continue
            self.traffic.add(party_name(k), self.me_name, len(data), msg.meta, msg.tensors)
            device = self.alg.run.device
            if device.type != "cpu":
                msg.tensors = {n: v.to(device) for n, v in msg.tensors.items()}
            replies[k] = msg
        return replies, len(order)

    def _answer(self, k: int, r: Payload | str | None) -> Payload | None:
        """A node's answer, or None after recording why there is none (late, or crashed)."""
        if r is None:
            if k not in self.events.late:
                self.events.late.append(k)
            self.log(f"fedmutual: round {self.round + 1}: client {k} sent no reply within the deadline ({self.timeout:g} s)")
            return None
        if isinstance(r, str) or "error" in r:
            reason = r if isinstance(r, str) else str(r["error"])
            if k not in self.events.crashed:
                self.events.crashed.append(k)
            self.log(f"fedmutual: round {self.round + 1}: client {k}'s node failed: {reason}; its reply is lost")
            return None
        return r

    # ------------------------------------------------------------------ nodes

    def _connected(self) -> dict[int, int]:
        """Client -> node id of the nodes connected now; new nodes are asked which client they host.

        The first call waits up to ``wait`` seconds for every client's node."""
        deadline = time.monotonic() + (0.0 if self._waited else self.wait)
        while True:
            self._discover()
            if len(self.node_of) == len(self.envs) or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        if not self._waited:
            self._waited = True
            missing = [k for k in range(len(self.envs)) if k not in self.node_of]
            if len(self.node_of) < min(self.cfg.faults.min_replies, len(self.envs)):
                raise FedmutualError(f"only {len(self.node_of)} of {len(self.envs)} clients' nodes connected within {self.wait:g} s "
                                     f"(missing clients {_listed(missing)}); start their SuperNodes with partition-id set")
            if missing:
                self.log(f"fedmutual: clients {_listed(missing)} have no node connected; the run goes on without them")
        return dict(self.node_of)

    def _discover(self) -> None:
        now = set(self.transport.nodes())
        for node in set(self.client_of) - now:
            k = self.client_of.pop(node)
            if self.node_of.get(k) == node:
                del self.node_of[k]
        clock = time.monotonic()
        new = sorted(n for n in now - set(self.client_of) if self._quiet.get(n, 0.0) <= clock)
        if not new:
            return
        answers = self.transport.exchange(HELLO, {n: self._request() for n in new}, self.hello_timeout)
        for node in new:
            r = answers.get(node)
            if not isinstance(r, dict) or "error" in r:
                # A node that cannot answer (its process died but the link still lists it) would otherwise cost
                # every exchange a hello deadline; it is asked again after the next exchange deadline has passed.
                why = "no answer" if r is None else (r if isinstance(r, str) else str(r["error"]))
                self._quiet[node] = time.monotonic() + max(self.timeout, self.hello_timeout)
                self.log(f"fedmutual: node {node} did not say which client it hosts ({why}); it is asked again in "
                         f"{max(self.timeout, self.hello_timeout):g} s")
                continue
            self._quiet.pop(node, None)
            k, n = as_int(r, "client"), as_int(r, "clients")
            if n != len(self.envs) or not 0 <= k < n:
                raise FedmutualError(f"node {node} hosts client {k} of {n} (its partition-id and num-partitions), but the run "
                                     f"has {len(self.envs)} clients; set num-partitions = {len(self.envs)} and partition-id in 0..{len(self.envs) - 1}")
            old = self.node_of.get(k)
            if old is not None and old != node:
                self.client_of.pop(old, None)
                self.log(f"fedmutual: client {k} is now on node {node} (it was on node {old})")
            self.node_of[k], self.client_of[node] = node, k

    # ------------------------------------------------------------------ evaluation

    def client_accuracies(self, server: State) -> list[dict[str, Any]]:
        """Each client's accuracies, measured on its node from its own state after the current round.

        A client's deployable model may be the server's (FedAvg's clients deploy the global model); the first
        evaluation learns whether the nodes need the server's state, and from then on sends it with every request
        that needs it. These requests are the experiment's view of the run, not the algorithm's messages, so their
        bytes are not counted."""
        nodes = self._connected()
        order = [(k, nodes[k]) for k in range(len(self.envs)) if k in nodes]
        got = self._evaluate(order, self._send_server is True, server)
        if self._send_server is None:
            need = [(k, n) for k, n in order if isinstance(got.get(n), dict) and got[n].get("needs_server")]  # type: ignore[union-attr]
            self._send_server = bool(need)
            if need:
                got.update(self._evaluate(need, True, server))
        out: list[dict[str, Any]] = []
        for k in range(len(self.envs)):
            r = got.get(nodes[k]) if k in nodes else None
            if not isinstance(r, dict) or "error" in r or r.get("needs_server"):
                why = "not connected" if k not in nodes else ("no answer" if r is None else (r if isinstance(r, str) else str(r.get("error", "no server state"))))
                self.log(f"fedmutual: round {self.round + 1}: client {k} was not evaluated ({why})")
                out.append({"test": None, "val": None, "extra": {}})
                continue
            extra = {name.removeprefix("extra:"): _acc(v) for name, v in r.items() if name.startswith("extra:")}
            out.append({"test": _acc(r["test"]), "val": _acc(r["val"]), "extra": extra})
        return out

    def _evaluate(self, order: list[tuple[int, int]], with_server: bool, server: State) -> dict[int, Payload | str]:
        extra: dict[str, Value] = {}
        if with_server:
            tensors, tree = dump(server)
            extra = {"server": st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}), "tree": json.dumps(tree)}
        requests = {n: {**self._request(), **extra} for _, n in order}
        return self.transport.exchange(EVALUATE, requests, self.timeout) if requests else {}


def as_int(p: Mapping[str, Value], name: str) -> int:
    """An integer field of a payload (a refusal names the field)."""
    v = p.get(name)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise FedmutualError(f"a reply's {name!r} is {type(v).__name__}, not a number")
    return int(v)


def as_bytes(p: Mapping[str, Value], name: str) -> bytes:
    """A bytes field of a payload (absent: empty)."""
    v = p.get(name, b"")
    if not isinstance(v, bytes):
        raise FedmutualError(f"a payload's {name!r} is {type(v).__name__}, not bytes")
    return v


def _acc(v: Value | None) -> float | None:
    """An accuracy from a reply (``"none"``: the client has no such split)."""
    return None if v is None or v == "none" else float(v)  # type: ignore[arg-type]


def _listed(ks: Sequence[int]) -> str:
    return ", ".join(map(str, ks)) if len(ks) <= 12 else ", ".join(map(str, ks[:12])) + f" and {len(ks) - 12} more"


def server_from(payload: Mapping[str, Value], alg: Algorithm) -> State:
    """The server's state a request carries for evaluation (an empty state when it carries none)."""
    if "server" not in payload:
        return State()
    state = alg.init_server()
    load(state, st_load(as_bytes(payload, "server")), json.loads(str(payload["tree"])), alg.run.new_model)
    return state


def client_accuracies(alg: Algorithm, server: State, me: State, d: ClientData, batch_size: int) -> Payload:
    """One client's accuracies as the in-process evaluation measures them (on the loop engine's path).

    ``test``: its deployable model on its test set; ``val``: on its validation split (``"none"`` when it has
    none); ``extra:<name>``: the method's further models on the test set. ``needs_server`` when the client's
    models are the server's and ``server`` is empty."""
    try:
        model = alg.client_model(server, me)
        extras = alg.extra_models(server, me)
    except AttributeError:
        if not vars(server):
            return {"needs_server": True}
        raise
    assert d.test_x is not None and d.test_y is not None
    out: Payload = {"test": accuracy(model, d.test_x, d.test_y, batch_size)}
    out["val"] = accuracy(model, d.val_x, d.val_y, batch_size) if d.val_y.numel() else "none"
    for name, m in extras.items():
        out[f"extra:{name}"] = accuracy(m, d.test_x, d.test_y, batch_size)
    return out
