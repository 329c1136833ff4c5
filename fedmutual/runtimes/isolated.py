"""An isolation runtime, for tests: the in-process runtime with nothing shared between parties.

Every party has its own :class:`~fedmutual.protocol.Algorithm` instance (built from its own copy of the config)
and keeps its state only in serialized form (safetensors bytes plus a JSON tree) between calls: before each
handler call or coordinator step the state is rebuilt from those bytes onto a freshly initialized state, and
afterwards it is serialized again. Every message, even a party's message to itself, is serialized. If an
algorithm reached into another party's memory, or kept state outside its parties' states, its metrics here
would differ from the in-process runtime's; equal metrics show it can run where parties are separate machines.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedmutual.protocol import Algorithm, Ask, ClientEnv, Message, Replies, Round, State
from fedmutual.protocol.messages import decode, encode
from fedmutual.protocol.state import dump, load
from fedmutual.runtimes.inprocess import InProcess

Frozen = tuple[bytes, str]  # safetensors bytes, JSON tree


class Isolated(InProcess):
    """:class:`InProcess` with every party's state serialized between calls and one algorithm object per party."""

    def __init__(self, alg: Algorithm, envs: Sequence[ClientEnv], log: Callable[[str], None] | None = None,
                 engine: str | None = None, record: bool = False):
        cls = type(alg)
        self._parties: dict[str, Algorithm] = {}
        for name in ["server", *(f"client{e.k}" for e in envs)]:
            run = replace(alg.run, cfg=alg.cfg.model_copy(deep=True))
            self._parties[name] = cls(run)
        self._frozen: dict[str, Frozen] = {}
        self._open: dict[int, State] = {}
        envs = [replace(e, run=self._parties[f"client{e.k}"].run) for e in envs]
        super().__init__(alg, envs, log, engine, record)

    # ------------------------------------------------------------------ serialized states

    @staticmethod
    def _freeze(state: State) -> Frozen:
        tensors, tree = dump(state)
        return st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}), json.dumps(tree)

    def _thaw(self, name: str, fresh: State) -> State:
        data, tree = self._frozen[name]
        tensors = {k: v.to(self._parties[name].run.device) for k, v in st_load(data).items()}
        load(fresh, tensors, json.loads(tree), self._parties[name].run.new_model)
        return fresh

    def _fresh(self, name: str) -> State:
        alg = self._parties[name]
        if name == "server":
            return alg.init_server()
        k = int(name.removeprefix("client"))
        return alg.init_client(self.envs[k])

    def _init_server(self) -> State:
        self._frozen["server"] = self._freeze(self._parties["server"].init_server())
        return State()

    def _init_client(self, env: ClientEnv) -> State:
        self._frozen[f"client{env.k}"] = self._freeze(self._parties[f"client{env.k}"].init_client(env))
        return State()

    def server_state(self) -> State:
        return self._thaw("server", self._fresh("server"))

    def client_state(self, k: int) -> State:
        return self._thaw(f"client{k}", self._fresh(f"client{k}"))

    def load(self, tensors: dict[str, torch.Tensor], tree: dict[str, Any]) -> None:
        for name in self._frozen:
            state = self._fresh(name)
            load(state, tensors, tree[name], self._parties[name].run.new_model, f"{name}/")
            self._frozen[name] = self._freeze(state)

    # ------------------------------------------------------------------ calls

    def _handle(self, k: int, fn: Callable[[State], Any]) -> Any:
        state = self.client_state(k)
        out = fn(state)
        if isinstance(out, Message):
            self._frozen[f"client{k}"] = self._freeze(state)
        else:  # work: the state stays open until the runtime has trained it and built the reply
            self._open[k] = state
        return out

    def _finish(self, k: int, fn: Callable[[State], Any] | None) -> Any:
        state = self._open.pop(k)
        out = fn(state) if fn is not None else None
        self._frozen[f"client{k}"] = self._freeze(state)
        return out

    def _coordinate(self, gen_of: Callable[[State], Round]) -> dict[str, float]:
        name = "server" if self.coord is None else f"client{self.coord}"
        self._coord_name = name
        self._coord_state = self._thaw(name, self._fresh(name))
        alg = self._parties[name]
        self._coord_alg = alg
        gen = self._make(gen_of, alg)
        out = self._drive(gen)
        self._frozen[name] = self._freeze(self._coord_state)
        return out

    def _make(self, gen_of: Callable[[State], Round], alg: Algorithm) -> Round:
        # the generator must be the coordinator's own algorithm object's, not the shared one
        real = self.alg
        self.alg = alg
        try:
            return gen_of(self._coord_state)
        finally:
            self.alg = real

    def _ask(self, ask: Ask) -> Replies:
        """Serialize the coordinator's state and every request; rebuild the state from its bytes afterwards."""
        name, state = self._coord_name, self._coord_state
        self._frozen[name] = self._freeze(state)
        # messages between parties are serialized by the runtime already; a party's message to itself is too here
        me = self.coord
        ask = replace(ask, to={k: _copy(m) if k == me else m for k, m in ask.to.items()})
        replies = self._exchange(ask)
        rebuilt = self._thaw(name, self._fresh(name))
        state.__dict__.clear()
        state.__dict__.update(rebuilt.__dict__)
        return Replies({k: _copy(m) if k == me else m for k, m in replies.items()}, replies.trained)

    def _exchange(self, ask: Ask) -> Replies:
        # handlers run on each client's own algorithm object
        real = self.alg
        try:
            self.alg = _PerClient(self._parties, real)  # type: ignore[assignment]
            return super()._exchange(ask)
        finally:
            self.alg = real


def _copy(msg: Message) -> Message:
    """The message as its receiver would parse it from the wire."""
    return decode(encode(msg)) if not msg.empty else Message()


class _PerClient:
    """Dispatches ``handler(kind)`` to the algorithm object of the client being called."""

    def __init__(self, parties: dict[str, Algorithm], shared: Algorithm):
        self._parties, self._shared = parties, shared

    def handler(self, kind: str) -> Callable[[State, Message, ClientEnv], Any]:
        def call(me: State, msg: Message, env: ClientEnv) -> Any:
            return self._parties[f"client{env.k}"].handler(kind)(me, msg, env)

        return call

    def __getattr__(self, name: str) -> Any:
        return getattr(self._shared, name)
