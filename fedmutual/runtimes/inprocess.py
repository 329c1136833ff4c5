"""The in-process runtime: every party of an algorithm in one process, at the stacked engine's speed.

It steps the coordinator's round, delivers each :class:`~fedmutual.protocol.Ask` to its addressees' handlers,
trains all the :class:`~fedmutual.protocol.Work` of one ask as one cohort (stacked where the models allow),
and carries every message between parties through serialization, byte counting and validation. Faults and
attacks act here, drawn from the run seed (:mod:`fedmutual.runtimes.faults`), so that an algorithm only ever
sees the replies that arrived:

- a **dropped** client takes no part in the round;
- a **crashing** client's first training of the round raises half-way (what it changed stays changed); from then
  on it is down for the round: nothing is delivered to it and nothing it would send leaves it;
- a **late** client's messages miss the deadline and are discarded (an empty acknowledgement carries nothing
  and is never late);
- a **hostile** client corrupts every message it sends before it is serialized and counted;
- a message that fails validation is rejected and logged; from the server (a trusted party) it is a bug.

A party's message to itself (a peer coordinator asking its own handler) stays in memory: it crosses no network,
so it is neither counted nor checked.
"""

from __future__ import annotations

import sys
from functools import partial
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from fedmutual.engine.cohort import ClientJob, JobResult, count_steps, run_cohort, train_job
from fedmutual.engine.phases import phase
from fedmutual.errors import ConfigError, FedmutualError
from fedmutual.protocol import Algorithm, Ask, ClientData, ClientEnv, Message, Replies, Round, State, Work
from fedmutual.protocol.messages import encode
from fedmutual.protocol.state import dump, load
from fedmutual.protocol.validation import MessageRejected, receive
from fedmutual.runtimes.faults import RoundEvents, RoundPlan, attackers, corrupt

Schema = Mapping[str, torch.Tensor]


def _apply(handler: Callable[[State, Message, ClientEnv], Message | Work], msg: Message, env: ClientEnv, me: State) -> Message | Work:
    return handler(me, msg, env)


def _reply(work: Work, result: JobResult, me: State) -> Message:
    return work.reply(result)


class ClientCrash(Exception):
    """A simulated exception in a client's update."""


def party_name(k: int | None) -> str:
    """The name of a party in counts and logs: ``"server"`` or ``"client<k>"``."""
    return "server" if k is None else f"client{k}"


@dataclass
class Traffic:
    """Bytes sent and received per party since the last :meth:`reset`."""

    sent: dict[str, int] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)
    record: bool = False
    log: list[tuple[str, str, int, dict[str, str]]] = field(default_factory=list)  # (src, dst, bytes, meta) when recording
    contents: list[dict[str, list[Any]]] = field(default_factory=list)  # per logged message: tensor name -> [dtype, shape]
    kinds: list[str] = field(default_factory=list)  # per logged message: the message type of its exchange
    kind: str = ""  # the message type of the exchange being carried

    def add(self, src: str, dst: str, n: int, meta: Mapping[str, str], tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        self.sent[src] = self.sent.get(src, 0) + n
        self.received[dst] = self.received.get(dst, 0) + n
        if self.record:
            self.log.append((src, dst, n, dict(meta)))
            self.contents.append({k: [str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in (tensors or {}).items()})
            self.kinds.append(self.kind)

    def take(self) -> list[dict[str, Any]]:
        """The recorded messages since the last call, as JSON rows (kind, src, dst, bytes, meta, tensors), and start again."""
        rows = [{"kind": k, "src": s, "dst": d, "bytes": n, "meta": m, "tensors": c}
                for (s, d, n, m), c, k in zip(self.log, self.contents, self.kinds)]
        self.log.clear()
        self.contents.clear()
        self.kinds.clear()
        return rows

    def reset(self) -> tuple[dict[str, int], dict[str, int]]:
        """Return (sent, received) since the last reset, and start again."""
        out = (dict(self.sent), dict(self.received))
        self.sent.clear()
        self.received.clear()
        return out


class InProcess:
    """Runs ``alg`` with every party's state in this process.

    ``envs`` are the clients' environments (their data); ``engine`` chooses how cohorts train (``auto``,
    ``stacked``, ``loop``); ``on_step`` is called after every client optimizer step (progress bars).
    """

    def __init__(self, alg: Algorithm, envs: Sequence[ClientEnv], log: Callable[[str], None] | None = None,
                 engine: str | None = None, record: bool = False):
        self.alg, self.cfg = alg, alg.cfg
        self.envs = list(envs)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.engine = engine or self.cfg.engine
        self.on_step: Callable[[], None] | None = None
        self.traffic = Traffic(record=record)
        self.max_bytes = int(self.cfg.max_message_mb * 2**20)
        a = self.cfg.attack
        if a.kind == "constant_label" and a.label >= alg.run.num_classes:
            raise ConfigError(f"attack.label: {a.label}, but the task has {alg.run.num_classes} classes (labels 0..{alg.run.num_classes - 1})")
        self.hostile = attackers(self.cfg)
        self.round = 0
        self.plan = RoundPlan()
        self.events = RoundEvents()
        self.down: set[int] = set()
        self.coord: int | None = None
        self.server = self._init_server()
        self.clients = [self._init_client(env) for env in self.envs]

    # ------------------------------------------------------------------ states (the isolation runtime overrides these)

    def _init_server(self) -> State:
        return self.alg.init_server()

    def _init_client(self, env: ClientEnv) -> State:
        return self.alg.init_client(env)

    def server_state(self) -> State:
        """The server's state (for evaluation and checkpoints)."""
        return self.server

    def client_state(self, k: int) -> State:
        """Client k's state (for evaluation and checkpoints)."""
        return self.clients[k]

    def _handle(self, k: int, fn: Callable[[State], Any]) -> Any:
        """Run a handler ``fn`` on client k's state."""
        return fn(self.clients[k])

    def _finish(self, k: int, fn: Callable[[State], Any] | None) -> Any:
        """Build client k's reply to its work with ``fn`` (None: the work crashed, nothing is built)."""
        return fn(self.clients[k]) if fn is not None else None

    def _coordinate(self, gen_of: Callable[[State], Round]) -> dict[str, float]:
        """Drive a round generator made from the coordinator's state."""
        state = self.server if self.coord is None else self.clients[self.coord]
        return self._drive(gen_of(state))

    def _ask(self, ask: Ask) -> Replies:
        """One exchange of the coordinator's round."""
        return self._exchange(ask)

    def client_accuracies(self, server: State) -> list[dict[str, Any]] | None:
        """Each client's accuracies measured where its state lives (see :func:`fedmutual.runtimes.remote.client_accuracies`),
        or None when the caller can evaluate the clients' states itself, as here."""
        return None

    def dump(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Every party's state as (tensors, JSON tree) for a checkpoint."""
        tensors, tree = dump(self.server_state(), "server/")
        parties: dict[str, Any] = {"server": tree}
        for k in range(len(self.envs)):
            t, tr = dump(self.client_state(k), f"client{k}/")
            tensors.update(t)
            parties[f"client{k}"] = tr
        return tensors, parties

    def load(self, tensors: dict[str, torch.Tensor], tree: dict[str, Any]) -> None:
        """Restore every party's state from :meth:`dump`'s output."""
        load(self.server, tensors, tree["server"], self.alg.run.new_model, "server/")
        for k in range(len(self.envs)):
            load(self.clients[k], tensors, tree[f"client{k}"], self.alg.run.new_model, f"client{k}/")

    # ------------------------------------------------------------------ rounds

    def setup(self) -> None:
        """The algorithm's one-off setup (e.g. a common initialization), with no faults, before round 1."""
        self.round, self.plan, self.events, self.down, self.coord = 0, RoundPlan(), RoundEvents(), set(), None
        self._coordinate(lambda state: self.alg.setup(state, list(range(len(self.envs)))))

    def count_steps(self, t: int, participants: Sequence[int]) -> int:
        """An estimate of round t's client steps, for progress bars (one local pass per participant)."""
        return count_steps([ClientJob(k, [], *self._local(k, t), self.cfg.local_epochs, self.cfg.batch_size, 0)
                            for k in participants])

    def _local(self, k: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        env = self.envs[k]
        env.round = t
        return env.local_data()

    def run_round(self, t: int, participants: list[int], plan: RoundPlan) -> dict[str, float]:
        """Round t with the participants that did not drop out and the round's drawn faults."""
        self.round, self.plan = t, plan
        self.events = RoundEvents(dropped=list(plan.dropped))
        self.down = set()
        self.coord = self.alg.coordinator(t)
        for env in self.envs:
            env.round = t
        return self._coordinate(lambda state: self.alg.round(t, state, participants))

    def _drive(self, gen: Round) -> dict[str, float]:
        try:
            ask = next(gen)
            while True:
                ask = gen.send(self._ask(ask))
        except StopIteration as stop:
            return dict(stop.value or {})

    def _exchange(self, ask: Ask) -> Replies:
        """Deliver one ask, run its handlers and their work, and carry the replies back."""
        src = self.coord
        self.traffic.kind = ask.kind
        if src is not None and src in self.down:
            return Replies()  # the coordinator is down: nothing leaves it
        expect = ask.expect or {}
        delivered: list[tuple[int, Message]] = []
        for k, msg in ask.to.items():
            if not 0 <= k < len(self.envs):
                raise FedmutualError(f"{self.alg.name}: round {self.round + 1} asks client {k} ({ask.kind}), "
                                     f"but the run has clients 0..{len(self.envs) - 1}")
            if k in self.down or k in self.plan.dropped:  # offline: nothing reaches it
                continue
            got = self._carry(src, k, msg, expect.get(k), "weights")
            if got is not None:
                delivered.append((k, got))
        outs: list[tuple[int, Message | Work]] = []
        for k, msg in delivered:
            handler = self.alg.handler(ask.kind)
            env = self.envs[k]
            outs.append((k, self._handle(k, partial(_apply, handler, msg, env))))
        works = [o for _, o in outs if isinstance(o, Work)]
        results = dict(zip(map(id, works), self._train([w.job for w in works])))
        trained: dict[int, JobResult] = {}
        answers: list[tuple[int, Message]] = []
        for k, out in outs:
            if isinstance(out, Work):
                result = results[id(out)]
                if k in self.down:  # it crashed in this work: its reply is lost
                    self._finish(k, None)
                    continue
                trained[k] = result
                answers.append((k, self._finish(k, partial(_reply, out, result))))
            else:
                answers.append((k, out))
        replies = Replies(trained=trained)
        for k, reply in answers:
            got = self._carry(k, src, reply, ask.like, ask.content)
            if got is not None:
                replies[k] = got
        return self._quorum(ask, src, replies, sum(1 for k, _ in delivered if k != src))

    def _quorum(self, ask: Ask, src: int | None, replies: Replies, attempted: int) -> Replies:
        """The replies, or none (the round skipped) when a gathering ask got fewer than ``faults.min_replies``."""
        if ask.gather and (src is None or src not in self.down):
            others = [k for k in replies if k != src]
            need = self.cfg.faults.min_replies
            if len(others) < need:
                self.events.skipped = True
                self.log(f"fedmutual: round {self.round + 1}: {len(others)} valid replies of {attempted} reached "
                         f"{party_name(src)}, fewer than faults.min_replies = {need}; the round is skipped")
                return Replies(trained=replies.trained)
        return replies

    def _carry(self, src: int | None, dst: int | None, msg: Message, like: Schema | None, content: str) -> Message | None:
        """One message from ``src`` to ``dst`` (None: the server): what the receiver accepted, or None."""
        if src == dst:
            return msg  # a party's message to itself stays in memory
        if src is not None and src in self.down:
            return None
        if dst is not None and dst in self.down:
            return None
        if msg.empty:
            return Message()
        if src is not None and src in self.plan.late:
            if src not in self.events.late:
                self.events.late.append(src)
                self.log(f"fedmutual: round {self.round + 1}: client {src} missed the deadline "
                         f"({self.plan.delay[src]:.2f} > {self.cfg.faults.deadline}); its messages are discarded")
            return None
        schema = like if like is not None else {n: v.detach() for n, v in msg.tensors.items()}
        tensors = msg.tensors
        if src is not None and src in self.hostile:
            tensors = corrupt(self.cfg, tensors, like, content, self.round, src, party_name(dst))
        try:
            with phase("messages"):  # serialization, byte counting and validation
                data = encode(Message(dict(tensors), dict(msg.meta)))
                self.traffic.add(party_name(src), party_name(dst), len(data), msg.meta, tensors)
                out = receive(data, schema, self.max_bytes)
        except MessageRejected as e:
            if src is None:  # a trusted party (the server) produced an invalid message: a bug, not a fault
                raise FedmutualError(f"round {self.round + 1}: the message from server to {party_name(dst)} is invalid: {e.reason}") from None
            self.events.rejected.append({"client": src, "reason": e.reason})
            self.log(f"fedmutual: round {self.round + 1}: rejected the message from {party_name(src)} to {party_name(dst)}: {e.reason}")
            return None
        device = self.alg.run.device
        if device.type != "cpu":
            out.tensors = {k: v.to(device) for k, v in out.tensors.items()}
        return out

    # ------------------------------------------------------------------ training

    def _train(self, jobs: list[ClientJob]) -> list[JobResult]:
        """Train one ask's jobs as one cohort; a client drawn to crash raises half-way through its first job."""
        crashing = [j for j in jobs if j.client in self.plan.crash and j.client not in self.events.crashed]
        healthy = [j for j in jobs if all(j is not c for c in crashing)]
        done = dict(zip(map(id, healthy), run_cohort(healthy, self.round, self.on_step, self.engine) if healthy else []))
        for job in crashing:
            done[id(job)] = self._crash(job)
        return [done[id(j)] for j in jobs]

    def _crash(self, job: ClientJob) -> JobResult:
        at, steps = max(1, count_steps([job]) // 2), [0]

        def step() -> None:
            steps[0] += 1
            if self.on_step is not None:
                self.on_step()
            if steps[0] == at:
                raise ClientCrash(f"client {job.client} crashed in its update (simulated) after {at} steps")

        try:
            train_job(job, self.round, step)
        except ClientCrash as e:
            self.events.crashed.append(job.client)
            self.down.add(job.client)
            self.log(f"fedmutual: round {self.round + 1}: {e}; its reply is lost")
        return JobResult(job.client)


def client_envs(alg: Algorithm, data: Sequence[ClientData]) -> list[ClientEnv]:
    """Each client's environment over its own data."""
    return [ClientEnv(k, d, alg.run, carve=alg.carves_public) for k, d in enumerate(data)]

