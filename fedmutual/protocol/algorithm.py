"""The shape of every algorithm: a coordinator's round plus client handlers, over explicit party states.

An :class:`Algorithm` holds no party's state. It says how to build each party's state
(:meth:`~Algorithm.init_server`, :meth:`~Algorithm.init_client`), what the coordinator does in round t
(:meth:`~Algorithm.round`, a generator of :class:`~fedmutual.protocol.Ask`), and what a client does with each
kind of message (methods marked with :func:`~fedmutual.protocol.handles`). A runtime (in process, Flower,
peer to peer) delivers the messages and keeps the states: a party never reads or writes another's.

The coordinator is the server, or, for serverless methods, the client that :meth:`~Algorithm.coordinator`
names for the round (e.g. DFML's aggregator, drawn from the seed and the round by every peer alike); its
state is then that client's own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar

from pydantic import BaseModel
from torch import nn

from fedmutual.config import Config
from fedmutual.errors import FedmutualError
from fedmutual.protocol.asks import Round, Work
from fedmutual.protocol.messages import Message
from fedmutual.protocol.run import ClientEnv, RunSpec
from fedmutual.protocol.state import State
from fedmutual.seeding import numpy_rng

HandlerFn = Callable[[State, Message, ClientEnv], "Message | Work"]


def sample_participants(cfg: Config, t: int) -> list[int]:
    """The clients of round t: all, or a seeded fraction ``sample_fraction`` (at least one)."""
    if cfg.sample_fraction >= 1.0:
        return list(range(cfg.clients))
    m = max(1, int(round(cfg.sample_fraction * cfg.clients)))
    return sorted(numpy_rng(cfg.seed, "sampling", t).choice(cfg.clients, size=m, replace=False).tolist())


class Algorithm(ABC):
    """One federated method, written once for every runtime.

    Class attributes describe the method to shared code, so that nothing outside the algorithm's file
    tests its name:

    - ``name``: the registry name and the name of its settings table (``[fml]``);
    - ``Settings``: a pydantic model of its own settings (None: it has none); ``self.settings`` is the run's;
    - ``client_tasks``: whether clients may learn different tasks (``task`` as a list);
    - ``val_source``: where clients' validation splits come from when ``val_source = "auto"``: ``"test"``
      (a split of the test set per client) or ``"train"`` (held out of the client's own data);
    - ``carves_public``: whether the round's public set is carved from the clients' data, which each
      client's partition then leaves out (DML-FL);
    - ``uses_global_model``: whether the ``global_model`` setting names this method's global model;
    - ``personalized``/``alone``: for ``compare``'s per-client report, methods whose clients keep
      personalized models, and the baseline that trains each client's model alone.
    """

    name: ClassVar[str] = ""
    Settings: ClassVar[type[BaseModel] | None] = None
    client_tasks: ClassVar[bool] = False
    val_source: ClassVar[str] = "test"
    carves_public: ClassVar[bool] = False
    uses_global_model: ClassVar[bool] = False
    personalized: ClassVar[bool] = False
    alone: ClassVar[bool] = False
    _handlers: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        found: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                kind = getattr(value, "fedmutual_handles", None)
                if kind is not None:
                    found[kind] = attr
        cls._handlers = found

    def __init__(self, run: RunSpec):
        self.run = run
        self.cfg = run.cfg
        self.settings: Any = run.cfg.table(self.name) if self.Settings is not None else None

    # ------------------------------------------------------------------ parties

    def init_server(self) -> State:
        """The server's state at the start of the run (default: nothing)."""
        return State()

    def init_client(self, env: ClientEnv) -> State:
        """Client ``env.k``'s state at the start of the run: its models and optimizers (default: nothing)."""
        return State()

    def setup(self, server: State, clients: list[int]) -> Round:
        """Run once before the first round of a new run, e.g. a common initialization (default: nothing)."""
        return {}
        yield  # pragma: no cover - makes this a generator

    @abstractmethod
    def round(self, t: int, state: State, clients: list[int]) -> Round:
        """The coordinator's round t (0-based) with the round's ``clients``; returns its training statistics.

        ``state`` is the coordinator's own: the server's, or the coordinating client's.
        """

    def sample(self, t: int) -> list[int]:
        """The participants of round t: by default a seeded fraction ``sample_fraction`` of the clients."""
        return sample_participants(self.cfg, t)

    def coordinator(self, t: int) -> int | None:
        """Who runs round t: None for the server (the default), or a client's index."""
        return None

    @classmethod
    def handler_kinds(cls) -> list[str]:
        """The message types this algorithm's clients handle."""
        return list(cls._handlers)

    def handler(self, kind: str) -> HandlerFn:
        """The client handler of message type ``kind``."""
        if kind not in self._handlers:
            raise FedmutualError(f"{self.name} has no client handler for {kind!r}; it handles: {', '.join(self._handlers) or 'nothing'} "
                                 "(mark a method with @handles(kind))")
        fn: HandlerFn = getattr(self, self._handlers[kind])
        return fn

    # ------------------------------------------------------------------ what is evaluated

    def global_model(self, server: State) -> nn.Module | None:
        """The global model, evaluated on the test set; None where the method has none."""
        return None

    @abstractmethod
    def client_model(self, server: State, me: State) -> nn.Module:
        """A client's deployable model, evaluated on the test set and on its validation split.

        ``server`` is the server's state (for methods whose clients deploy the global model) and ``me`` the
        client's own; evaluation is the experiment's view of the run, not a message between parties."""

    def extra_models(self, server: State, me: State) -> dict[str, nn.Module]:
        """Further models of a client to evaluate on the test set, by name (e.g. DFML's current model)."""
        return {}
