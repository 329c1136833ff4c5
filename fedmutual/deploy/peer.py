"""One peer of a federation without a server: its own data and state, the algorithm's handlers, and the rounds it
coordinates.

``fedmutual peer --config X.toml --peers peers.toml --id K`` runs client K as one process. Every peer derives each
round's participants and aggregator from the seed and the round (the algorithm's ``sample`` and ``coordinator``),
so no party coordinates the federation:

- in a round it aggregates, the peer runs the algorithm's coordinator round on its own state
  (:class:`PeerRuntime`, the remote runtime whose coordinator is this client): its requests go to the other peers
  over gRPC, its requests to itself stay in memory, and when the round is over it tells every peer so;
- in every other round it answers the aggregator's requests with the algorithm's handlers on its state on disk
  (:class:`~fedmutual.deploy.node.Node`), and waits for the aggregator's word that the round is over, at most
  ``round_timeout`` seconds (no word: the aggregator is down, and the round is skipped here);
- after each round it measures its own models on its test data and writes one row to its ``metrics.jsonl``: its
  accuracies, the bytes it sent and received, and, in the rounds it aggregated, the round's statistics and faults.

``fedmutual peer-report DIRS...`` merges the peers' rows into the ``metrics.jsonl`` and ``summary.json`` that a
simulation writes (:func:`merge_reports`).

A request of round t waits until this peer has finished round t - 1, so that a peer's evaluation of a round never
sees the next round's changes. A peer restarted with the same command continues from its state on disk and its
rows; the rounds that end before it takes part again (answers a request, or aggregates) are recorded as ``absent``
in its rows, without accuracies.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from fedmutual.config import Config, validate
from fedmutual.deploy.node import Node
from fedmutual.errors import ConfigError, FedmutualError
from fedmutual.protocol import Algorithm, Ask, Replies, Round, State
from fedmutual.report.metrics import MetricsWriter, read_metrics, summarize, write_json
from fedmutual.runtimes.faults import RoundEvents, RoundPlan
from fedmutual.runtimes.inprocess import party_name
from fedmutual.runtimes.remote import Payload, Remote, as_int

#: Runtime messages between peers (not the algorithm's; their bytes are not counted).
ROUND_OVER = "peer.round_over"
PING = "peer.ping"


# ------------------------------------------------------------------ peers.toml

@dataclass
class PeerEntry:
    id: int
    address: str
    cert: Path | None
    key: Path | None


@dataclass
class Peers:
    """A ``peers.toml``: the federation's name, the CA every peer trusts, and every peer's address."""

    federation: str
    ca: Path
    peers: dict[int, PeerEntry]
    path: Path

    def check(self, cfg: Config, me: int) -> PeerEntry:
        """This peer's entry, after checking that the file describes the config's clients."""
        if sorted(self.peers) != list(range(cfg.clients)):
            raise ConfigError(f"{self.path}: the peers are {sorted(self.peers)}, but the config has {cfg.clients} clients; "
                              f"list one [[peer]] per client, ids 0..{cfg.clients - 1}")
        if me not in self.peers:
            raise ConfigError(f"--id {me}: {self.path} has no peer {me} (ids 0..{cfg.clients - 1})")
        mine = self.peers[me]
        if mine.cert is None or mine.key is None:
            raise ConfigError(f"{self.path}: peer {me} needs cert and key (its own certificate and private key)")
        return mine


def load_peers(path: str | Path) -> Peers:
    """Read ``peers.toml``; paths in it are relative to its directory."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except OSError as e:
        raise ConfigError(f"--peers {p}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--peers {p}: not valid TOML ({e})") from None
    unknown = sorted(set(raw) - {"federation", "ca", "peer"})
    if unknown:
        raise ConfigError(f"{p}: unknown keys {', '.join(unknown)} (allowed: federation, ca, [[peer]])")
    base = p.parent

    def path_of(v: Any, what: str) -> Path:
        if not isinstance(v, str) or not v:
            raise ConfigError(f"{p}: {what} must be a file path")
        q = Path(v).expanduser()
        return q if q.is_absolute() else base / q

    fed = raw.get("federation")
    if not isinstance(fed, str) or not fed or "/" in fed or fed.startswith("."):
        raise ConfigError(f"{p}: federation must name the run (one word, e.g. federation = \"dfml-fmnist\"); every peer uses the same")
    if "ca" not in raw:
        raise ConfigError(f"{p}: ca = the CA certificate every peer trusts (make test ones with scripts/peer-certs.sh)")
    entries: dict[int, PeerEntry] = {}
    peers = raw.get("peer")
    if not isinstance(peers, list) or not peers:
        raise ConfigError(f"{p}: list the peers as [[peer]] tables with id and address")
    for i, entry in enumerate(peers):
        if not isinstance(entry, dict):
            raise ConfigError(f"{p}: peer entry {i + 1} is not a table")
        bad = sorted(set(entry) - {"id", "address", "cert", "key"})
        if bad:
            raise ConfigError(f"{p}: peer entry {i + 1}: unknown keys {', '.join(bad)} (allowed: id, address, cert, key)")
        k, addr = entry.get("id"), entry.get("address")
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ConfigError(f"{p}: peer entry {i + 1}: id must be a client index (0, 1, ...)")
        if k in entries:
            raise ConfigError(f"{p}: peer {k} is listed twice")
        host, _, port = str(addr or "").rpartition(":")
        if not isinstance(addr, str) or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{p}: peer {k}: address must be HOST:PORT, got {addr!r}")
        entries[k] = PeerEntry(k, addr, path_of(entry["cert"], f"peer {k}'s cert") if "cert" in entry else None,
                               path_of(entry["key"], f"peer {k}'s key") if "key" in entry else None)
    return Peers(fed, path_of(raw["ca"], "ca"), entries, p)


# ------------------------------------------------------------------ what a peer knows of the rounds

class RoundBook:
    """Which rounds this peer has finished, and what it has heard of the others (shared by its threads)."""

    def __init__(self, done: int):
        self.cond = threading.Condition()
        self.done = done  # the last round this peer finished (recorded)
        self.seen = -1  # the highest round of any request or word received
        self.over: set[int] = set()  # rounds whose aggregator said they are over
        self.handled: set[int] = set()  # rounds in which this peer answered a request or aggregated

    def heard(self, t: int, over: bool = False, handled: bool = False) -> None:
        with self.cond:
            self.seen = max(self.seen, t)
            if over:
                self.over.add(t)
            if handled:
                self.handled.add(t)
            self.cond.notify_all()

    def finish(self, t: int) -> None:
        with self.cond:
            self.done = max(self.done, t)
            self.cond.notify_all()

    def wait_over(self, t: int, timeout: float) -> bool:
        """Until round t is over (its aggregator said so, or a later round began); False after ``timeout`` s."""
        with self.cond:
            return self.cond.wait_for(lambda: t in self.over or self.seen > t, timeout)

    def wait_ready(self, t: int, timeout: float) -> bool:
        """Until this peer has finished round t - 1."""
        with self.cond:
            return self.cond.wait_for(lambda: self.done >= t - 1, timeout)


# ------------------------------------------------------------------ the runtime of the rounds it aggregates

class PeerRuntime(Remote):
    """The remote runtime with this peer as the coordinator: its own requests run on its own state in memory."""

    def __init__(self, node: Node, transport: Any, run_id: str, timeout: float, log: Callable[[str], None]):
        super().__init__(node.alg, [node.env] * node.cfg.clients, log, None, False, transport=transport,
                         timeout=timeout, wait=0.0)
        self.node, self.me = node, node.k
        self.me_name = party_name(node.k)
        self.run_id = run_id
        self._own: State | None = None
        self.lock = threading.Lock()  # one handler at a time on this peer's state

    def _connected(self) -> dict[int, int]:
        return {k: k for k in range(len(self.envs)) if k != self.me}  # every peer is addressed; a down one is late

    def _request(self, data: bytes = b"", **extra: Any) -> Payload:
        return {"data": data, "round": self._tag, "session": 0, "run": self.run_id, **extra}

    def _coordinate(self, gen_of: Callable[[State], Round]) -> dict[str, float]:
        if self.coord != self.me:
            return self._drive(gen_of(self.server))  # a setup with nothing to ask
        with self.lock:
            t = self.round
            self._own = self.node.load_state(self._request(), t, f"coordinating round {t + 1}")
            try:
                return self._drive(gen_of(self._own))
            finally:
                self.node.save_state(self._request(), t, self._own)
                self._own = None

    def _exchange(self, ask: Ask) -> Replies:
        if self.coord != self.me:
            raise FedmutualError(f"{self.alg.name}: its {'setup' if self.coord is None else 'round'} asks the clients "
                                 f"({ask.kind}) from a server; a method with a server runs in process or on Flower")
        others = {k: m for k, m in ask.to.items() if k != self.me}
        replies, attempted = self._send(replace(ask, to=others)) if others else (Replies(), 0)
        if self.me in ask.to and self._own is not None:  # its message to itself stays in memory
            msg, result = self.node.apply(ask.kind, self._own, ask.to[self.me], self.round)
            replies[self.me] = msg
            if result is not None:
                replies.trained[self.me] = result
        return self._quorum(ask, self.me, replies, attempted)

    def count_bytes(self, src: int, dst: int, data: bytes) -> None:
        """A message this peer's handler received or sent, counted as the in-process runtime counts it."""
        if data:
            self.traffic.add(party_name(src), party_name(dst), len(data), {})


# ------------------------------------------------------------------ the peer process

class PeerProcess:
    """Client ``me`` of ``cfg`` as a peer of the federation in ``peers``."""

    def __init__(self, cfg: Config, peers: Peers, me: int, data_dir: str | None = None, *, timeout: float = 120.0,
                 round_timeout: float = 600.0, wait: float = 120.0, log: Callable[[str], None] | None = None):
        from fedmutual.runtimes.grpc_peer import Credentials, PeerClient, PeerServer, TransportLog

        entry = peers.check(cfg, me)
        if cfg.algorithm_class().coordinator is Algorithm.coordinator:
            raise ConfigError(f"algorithm {cfg.algorithm}: its rounds are coordinated by a server; run it in process "
                              "(fedmutual run) or on Flower (fedmutual flower app); peers run the methods without a server (dfml, dfedavg)")
        for name, v in (("timeout", timeout), ("round-timeout", round_timeout), ("wait", wait)):
            if not v > 0:
                raise ConfigError(f"--{name}: {v}; give seconds (> 0)")
        self.cfg, self.peers, self.me = cfg, peers, me
        self.timeout, self.round_timeout, self.wait = float(timeout), float(round_timeout), float(wait)
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        assert entry.cert is not None and entry.key is not None
        creds = Credentials(peers.ca, entry.cert, entry.key)  # refused before any data is read or file written
        self.dir = Path(cfg.out) / peers.federation / f"peer{me}"
        self.resumed = (self.dir / "peer.json").is_file()
        if self.resumed:
            self._check_same_run()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rows = read_metrics(self.dir / "metrics.jsonl") if (self.dir / "metrics.jsonl").is_file() else []
        self.node = Node(cfg, me, cfg.clients, self.dir / "state", data_dir, log=self.log)
        max_bytes = int(cfg.max_message_mb * 2**20) + 2**16
        tlog = TransportLog(self.dir / "transport.jsonl", me)
        self.client = PeerClient(me, {k: e.address for k, e in peers.peers.items()}, creds, max_bytes, tlog)
        self.rt = PeerRuntime(self.node, self.client, peers.federation, self.timeout, self.log)
        self.book = RoundBook(done=self.rows[-1]["round"] - 1 if self.rows else -1)
        self.server = PeerServer(_listen_address(entry.address), me, creds, self.serve, max_bytes, tlog)
        self._notices: list[threading.Thread] = []
        if not self.resumed:
            write_json(self.dir / "peer.json", {"peer": me, "federation": peers.federation, "config": cfg.to_dict()})
            write_json(self.dir / "config.json", cfg.to_dict())

    def _check_same_run(self) -> None:
        theirs = json.loads((self.dir / "peer.json").read_text())
        ours = self.cfg.to_dict()
        changed = sorted(k for k in set(theirs["config"]) | set(ours) if theirs["config"].get(k) != ours.get(k))
        if changed:
            raise ConfigError(f"{self.dir} holds peer {self.me} of a run with another config (it differs in {', '.join(changed)}); "
                              "restart the peer with the run's own config, or name another federation in peers.toml")

    # -------------------------------------------------------------- answering other peers

    def serve(self, kind: str, req: Payload, caller: int) -> Payload:
        """A request from another peer (its identity from its certificate)."""
        if kind == PING:
            return {"peer": self.me}
        t = as_int(req, "round")
        if kind == ROUND_OVER:
            self.book.heard(t, over=True)
            return {}
        if caller != self.cfg_coordinator(t):
            return {"error": f"peer {caller} is not round {t + 1}'s aggregator"}
        self.book.heard(t)
        if not self.book.wait_ready(t, self.round_timeout):
            return {"error": f"peer {self.me} has not finished round {t} yet"}
        if t <= self.book.done:
            return {"error": f"round {t + 1} is over at peer {self.me}"}
        with self.rt.lock:
            req = {**req, "session": 0, "run": self.peers.federation}
            data = req.get("data", b"")
            assert isinstance(data, bytes)
            self.rt.count_bytes(caller, self.me, data)
            reply = self.node.handle(kind, req)
            out = reply.get("data", b"")
            if "error" not in reply and isinstance(out, bytes):
                self.rt.count_bytes(self.me, caller, out)
                self.book.heard(t, handled=True)
        return reply

    def cfg_coordinator(self, t: int) -> int | None:
        return self.node.alg.coordinator(t)

    # -------------------------------------------------------------- the rounds

    def run(self) -> Path:
        """Take part in every round left; return this peer's run directory."""
        cfg = self.cfg
        self.server.start()
        self.log(f"fedmutual: peer {self.me} of {self.peers.federation} listening on {self.server.address}; "
                 f"{cfg.algorithm}, {cfg.clients} peers, {cfg.rounds} rounds" + (f", from round {self.book.done + 2}" if self.resumed else ""))
        writer = MetricsWriter(self.dir / "metrics.jsonl")
        writer.rows = list(self.rows)
        status = "completed"
        try:
            if not self.resumed:
                self._meet()
            for t in range(self.book.done + 1, cfg.rounds):
                writer.write(self._round(t))
                self.book.finish(t)
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        except BaseException:
            status = "failed"
            raise
        finally:
            for th in self._notices:
                th.join(timeout=self.timeout)
            tested = [r for r in writer.rows if r.get("test") is not None]
            write_json(self.dir / "summary.json", {
                "status": status, "peer": self.me, "rounds_completed": len(writer.rows),
                "final_test_acc": tested[-1]["test"] if tested else None, "final_val_acc": tested[-1]["val"] if tested else None,
                "total_bytes_up": sum(r["bytes_up"] for r in writer.rows), "total_bytes_down": sum(r["bytes_down"] for r in writer.rows),
                "rounds_aggregated": sum(1 for r in writer.rows if r["aggregator"] == self.me),
                "note": f"this peer's own view; merge the peers with `fedmutual peer-report {self.dir.parent}/peer*`"})
            self.server.stop(grace=2.0)
            self.client.close()
        return self.dir

    def _meet(self) -> None:
        """Wait (at most ``wait`` s) until every other peer answers, so that round 1 starts with all of them."""
        deadline = time.monotonic() + self.wait
        missing = [k for k in self.peers.peers if k != self.me]
        while missing and time.monotonic() < deadline:
            got = self.client.exchange(PING, {k: {"round": -1} for k in missing}, min(5.0, max(0.1, deadline - time.monotonic())))
            missing = [k for k in missing if not isinstance(got.get(k), dict)]
        if missing:
            self.log(f"fedmutual: peer {self.me}: peers {', '.join(map(str, missing))} did not answer within {self.wait:g} s; "
                     "the rounds go on without them until they come")

    def _round(self, t: int) -> dict[str, Any]:
        cfg, alg, rt = self.cfg, self.node.alg, self.rt
        start = time.perf_counter()
        participants = alg.sample(t)
        a = alg.coordinator(t)
        row: dict[str, Any] = {"round": t + 1, "peer": self.me, "aggregator": a, "participants": participants}
        stats: dict[str, float] = {}
        if a == self.me:
            self.book.heard(t, handled=True)
            stats = rt.run_round(t, participants, RoundPlan())
            row.update({"stats": {k: float(v) for k, v in stats.items()}, "faults": rt.events.as_row()})
            self._tell_round_over(t)
        else:
            rt.events = RoundEvents()
            heard = self.book.wait_over(t, self.round_timeout)
            if not heard:
                self.log(f"fedmutual: peer {self.me}: round {t + 1}: no word from its aggregator, peer {a}, within "
                         f"{self.round_timeout:g} s; the round is skipped here")
            row["heard_round_over"] = heard
        # a restarted peer has missed the rounds before it takes part again (the federation finished them without it)
        absent = self.resumed and not self.book.handled
        row["absent"] = absent
        if ((t + 1) % cfg.eval_every == 0 or t + 1 == cfg.rounds) and not absent:
            with rt.lock:
                accs = self.node.handle("evaluate.fedmutual", {"round": t, "session": 0, "run": self.peers.federation})
            if "error" in accs:
                raise FedmutualError(f"peer {self.me}: round {t + 1}: cannot evaluate its models: {accs['error']!r}")
            row["test"], row["val"] = _acc(accs.get("test")), _acc(accs.get("val"))
            row["extra"] = {n.removeprefix("extra:"): _acc(v) for n, v in accs.items() if n.startswith("extra:")}
        sent, received = rt.traffic.reset()
        row["bytes_up"], row["bytes_down"] = sent.get(rt.me_name, 0), received.get(rt.me_name, 0)
        row["seconds"] = time.perf_counter() - start
        self.log(f"fedmutual: peer {self.me}: round {t + 1}/{cfg.rounds}" + (" (aggregator)" if a == self.me else "")
                 + (f": test {row['test']:.4f}" if row.get("test") is not None else "")
                 + f", {row['bytes_up']} bytes sent, {row['bytes_down']} received, {row['seconds']:.1f} s")
        return row

    def _tell_round_over(self, t: int) -> None:
        """Tell every other peer that round t is over (in the background: a down peer costs no one its deadline)."""
        others = {k: {"round": t} for k in self.peers.peers if k != self.me}
        th = threading.Thread(target=self.client.exchange, args=(ROUND_OVER, others, min(self.timeout, 30.0)), daemon=True)
        th.start()
        self._notices = [x for x in self._notices if x.is_alive()] + [th]


def _acc(v: Any) -> float | None:
    return None if v is None or v == "none" else float(v)


def _listen_address(address: str) -> str:
    """Where a peer listens for its peers.toml address: every interface, on its port."""
    return f"[::]:{address.rpartition(':')[2]}"


def run_peer(cfg: Config, peers_path: str | Path, me: int, data_dir: str | None = None, **kw: Any) -> Path:
    """``fedmutual peer``: take part in the federation as client ``me``; return this peer's run directory."""
    return PeerProcess(cfg, load_peers(peers_path), me, data_dir, **kw).run()


# ------------------------------------------------------------------ the report

def merge_reports(dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """Merge the peers' run directories into one ``metrics.jsonl`` and ``summary.json`` as a simulation writes them.

    A round's statistics and faults are its aggregator's; a round whose aggregator wrote nothing was skipped.
    Each client's accuracies and bytes are its own peer's (None and 0 where it was down or absent)."""
    from fedmutual.experiment.runner import assemble_accuracies
    from fedmutual.report.plots import plot_run

    peers: dict[int, list[dict[str, Any]]] = {}
    cfg_dict: dict[str, Any] | None = None
    fed = None
    for d in map(Path, dirs):
        meta_path = d / "peer.json"
        if not meta_path.is_file():
            raise ConfigError(f"{d}: not a peer's run directory (no peer.json)")
        meta = json.loads(meta_path.read_text())
        if cfg_dict is None:
            cfg_dict, fed = meta["config"], meta["federation"]
        elif meta["config"] != cfg_dict or meta["federation"] != fed:
            raise ConfigError(f"{d}: peer {meta['peer']} ran another federation or config than {dirs[0]}")
        if meta["peer"] in peers:
            raise ConfigError(f"{d}: peer {meta['peer']} is given twice")
        rows = read_metrics(d / "metrics.jsonl") if (d / "metrics.jsonl").is_file() else []
        peers[int(meta["peer"])] = rows
    if cfg_dict is None:
        raise ConfigError("peer-report: give the peers' run directories")
    cfg = validate(cfg_dict)
    by_round = {k: {r["round"]: r for r in rows} for k, rows in peers.items()}
    last = max((r for rows in by_round.values() for r in rows), default=0)
    merged: list[dict[str, Any]] = []
    for r in range(1, last + 1):
        mine = [by_round.get(k, {}).get(r) for k in range(cfg.clients)]
        present = [m for m in mine if m is not None]
        a = present[0]["aggregator"] if present else None
        agg = mine[a] if a is not None else None
        row: dict[str, Any] = {"round": r, "participants": present[0]["participants"] if present else []}
        if r % cfg.eval_every == 0 or r == cfg.rounds:
            per_client = [{"test": m.get("test"), "val": m.get("val"), "extra": m.get("extra", {})}
                          if m is not None and not m.get("absent") else {"test": None, "val": None, "extra": {}} for m in mine]
            row.update(assemble_accuracies(None, per_client))
        else:
            row.update({"global_acc": None, "client_acc_global_test": None, "personal_acc": None, "evaluated_clients": 0})
        up = [m["bytes_up"] if m is not None else 0 for m in mine]
        down = [m["bytes_down"] if m is not None else 0 for m in mine]
        row.update({"bytes_up": sum(up), "bytes_down": sum(down), "bytes_up_per_client": up, "bytes_down_per_client": down})
        if agg is not None and "stats" in agg:
            row.update(agg["stats"])
            row["faults"] = agg["faults"]
        else:
            row["faults"] = {"dropped": [], "crashed": [], "late": [], "rejected": [], "skipped": True, "aggregator_down": a}
        row["seconds"] = max((m["seconds"] for m in present), default=0.0)
        merged.append(row)
    target = Path(out) if out is not None else Path(dirs[0]).parent
    target.mkdir(parents=True, exist_ok=True)
    (target / "metrics.jsonl").unlink(missing_ok=True)
    writer = MetricsWriter(target / "metrics.jsonl")
    for row in merged:
        writer.write(row)
    status = "completed" if len(merged) == cfg.rounds and len(peers) == cfg.clients else "partial"
    write_json(target / "config.json", cfg.to_dict())
    write_json(target / "summary.json", {**summarize(writer.rows, status), "peers": sorted(peers)})
    if writer.rows:
        plot_run(writer.rows, target / "accuracy.png", f"{cfg.algorithm} · peers · {cfg.partition} · {cfg.model_label}")
    return target
