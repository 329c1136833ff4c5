"""One client's party on its own machine: its data, its state on disk, and the algorithm's handlers.

A :class:`Node` answers the requests of :class:`fedmutual.runtimes.remote.Remote` (carried by Flower, or any
transport): the algorithm's own handler runs on the client's own state, its training work runs on this machine,
and the state goes back to disk (:class:`fedmutual.deploy.store.StateStore`) before the reply leaves.

A node's data is either the simulation's partition (``data_dir`` None: it loads the run's dataset and takes client
``k``'s share with the same partition function, so a deployment is comparable with a simulation), or a dataset
directory of its own (the real case): all of that directory's training split is the client's, its validation split
is drawn from it as in simulation, and the test split is its test set.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fedmutual.config import Config
from fedmutual.data import load_dataset, validation_splits
from fedmutual.data.folds import RoundData, load_public_dataset
from fedmutual.data.tasks import parse_task
from fedmutual.deploy.store import StateStore
from fedmutual.engine.cohort import JobResult, run_cohort
from fedmutual.engine.setup import configure_threads, resolve_device
from fedmutual.errors import ConfigError, DataError, FedmutualError
from fedmutual.experiment.data import client_tasks, holdout_splits
from fedmutual.experiment.runner import prepare_run
from fedmutual.protocol import Algorithm, ClientData, ClientEnv, Message, RunSpec, State, Work
from fedmutual.protocol.messages import encode
from fedmutual.protocol.state import dump, load
from fedmutual.protocol.validation import MessageRejected, receive
from fedmutual.registry import ALGORITHMS
from fedmutual.runtimes.remote import EVALUATE, HELLO, Payload, as_bytes, as_int, client_accuracies, server_from
from fedmutual.seeding import derive_seed


class Node:
    """Client ``k`` of the run ``cfg``, its states kept under ``state_dir``."""

    def __init__(self, cfg: Config, k: int, clients: int, state_dir: Path, data_dir: str | None = None,
                 log: Callable[[str], None] = print):
        if clients != cfg.clients:
            raise ConfigError(f"num-partitions = {clients}, but the run has {cfg.clients} clients")
        if not 0 <= k < cfg.clients:
            raise ConfigError(f"partition-id = {k}; the run has clients 0..{cfg.clients - 1}")
        self.cfg, self.k, self.log = cfg, k, log
        self.state_dir = Path(state_dir)
        configure_threads(cfg.threads)
        torch.manual_seed(derive_seed(cfg.seed, "torch"))
        started = time.perf_counter()
        if data_dir is None:
            parties = prepare_run(cfg)
            self.alg, self.data = parties.alg, parties.clients[k]
        else:
            self.alg, self.data = _own_data(cfg, k, data_dir)
        self.env = ClientEnv(k, self.data, self.alg.run, carve=self.alg.carves_public)
        self.max_bytes = int(cfg.max_message_mb * 2**20)
        self.keep = cfg.checkpoint_every * cfg.checkpoint_keep + 1 if cfg.checkpoint_every else 2
        self._stores: dict[str, StateStore] = {}
        log(f"fedmutual: node of client {k}: {self.data.n} training samples ({'its own data in ' + data_dir if data_dir else 'the simulation partition'}), "
            f"{cfg.algorithm}, ready in {time.perf_counter() - started:.1f} s")

    def store(self, run: str) -> StateStore:
        if run not in self._stores:
            self._stores[run] = StateStore(self.state_dir / run / f"client{self.k}", self.keep)
        return self._stores[run]

    def handle(self, kind: str, req: Payload) -> Payload:
        """Answer one request; a refusal a server can act on is an ``error`` reply, not an exception."""
        try:
            if kind == HELLO:
                return {"client": self.k, "clients": self.cfg.clients, "samples": self.data.n}
            if kind == EVALUATE:
                return self._evaluate(req)
            return self._run(kind, req)
        except (FedmutualError, MessageRejected) as e:
            self.log(f"fedmutual: client {self.k}: {kind}: {e}")
            return {"error": str(e)}

    def load_state(self, req: Payload, t: int, what: str) -> State:
        """The client's state for a request of round ``t``, from disk (see :class:`StateStore`)."""
        store = self.store(str(req["run"]))
        me = self.alg.init_client(self.env)
        key = store.find(t, as_int(req, "session"))
        if key is None:
            source = "its initial state"
        else:
            tensors, tree = store.read(key)
            load(me, tensors, tree, self.alg.run.new_model)
            source = f"its state of round {key[0] + 1} (session {key[1]})" if key[0] >= 0 else "its state after setup"
        self.log(f"fedmutual: client {self.k}: {what} from {source}")
        return me

    def save_state(self, req: Payload, t: int, me: State) -> None:
        """The client's state after a request of round ``t``, to disk."""
        tensors, tree = dump(me)
        self.store(str(req["run"])).write(t, as_int(req, "session"), tensors, tree)

    def apply(self, kind: str, me: State, msg: Message, t: int) -> tuple[Message, JobResult | None]:
        """Run the algorithm's handler of ``kind`` on ``me``, and its training work on this machine: the answer,
        and the work's result (None when the handler had no training to do)."""
        handler = self.alg.handler(kind)
        self.env.round = max(t, 0)
        out = handler(me, msg, self.env)
        if not isinstance(out, Work):
            return out, None
        result = run_cohort([out.job], max(t, 0), None, self.cfg.engine)[0]
        return out.reply(result), result

    def _run(self, kind: str, req: Payload) -> Payload:
        t = as_int(req, "round")
        data = as_bytes(req, "data")
        msg = Message() if not data else receive(data, None, self.max_bytes)
        device = self.alg.run.device
        if device.type != "cpu":
            msg.tensors = {n: v.to(device) for n, v in msg.tensors.items()}
        self.alg.handler(kind)  # an unknown kind is refused before the state is read
        me = self.load_state(req, t, f"{kind} ({'setup' if t < 0 else f'round {t + 1}'})")
        answer, result = self.apply(kind, me, msg, t)
        reply: Payload = {}
        if result is not None:
            reply.update({"steps": result.steps, "loss": [float(v) for v in result.loss]})
        self.save_state(req, t, me)
        reply["data"] = b"" if answer.empty else encode(answer)
        return reply

    def _evaluate(self, req: Payload) -> Payload:
        t = as_int(req, "round")
        me = self.load_state(req, t + 1, f"evaluation after round {t + 1}")  # the state after round t
        self.env.round = max(t, 0)
        server = server_from(req, self.alg)
        with torch.no_grad():
            return client_accuracies(self.alg, server, me, self.data, self.cfg.eval_batch_size)


def _own_data(cfg: Config, k: int, data_dir: str) -> tuple[Algorithm, ClientData]:
    """Client k's algorithm and data from a dataset directory of its own."""
    alg_cls = cfg.algorithm_class()
    if cfg.local_data == "folds" or (alg_cls.carves_public and cfg.public.dataset is None):
        why = "local_data = \"folds\" splits every client's data" if cfg.local_data == "folds" else \
            f"{cfg.algorithm} carves its public set from every client's data"
        raise ConfigError(f"data-dir: {why}, which a node with data of its own cannot do; "
                          "use the simulation partition, or (for a public set) set [public] dataset")
    device = resolve_device(cfg.device)
    ds = load_dataset(cfg.dataset, data_dir, False)
    allowed = [n for n in ALGORITHMS.names() if ALGORITHMS.get(n).client_tasks]  # type: ignore[attr-defined]
    tasks = client_tasks(cfg, ds.num_classes, alg_cls.client_tasks, allowed)
    task = tasks[k]
    run_task = tasks[0] if len(set(tasks)) == 1 else parse_task("classes", ds.num_classes)
    whole = np.arange(len(ds.train_y))
    if cfg.resolved_val_source() == "train":
        (train,), (val,) = holdout_splits([whole], cfg.val_fraction, cfg.seed + k)
        vx, vy = ds.train_x, ds.train_y
    else:
        train = whole
        (val,) = validation_splits([whole], ds.train_y.numpy(), ds.test_y.numpy(), ds.num_classes, cfg.val_size, cfg.seed + k)
        vx, vy = ds.test_x, ds.test_y
    if len(train) == 0:
        raise DataError(f"data-dir {data_dir}: no training samples")
    data = ClientData(ds.train_x[train].to(device), task.apply(ds.train_y[train]).to(device), vx[val].to(device),
                      task.apply(vy[val]).to(device), ds.test_x.to(device), task.apply(ds.test_y).to(device), task)
    rounds = None
    if alg_cls.carves_public:
        assert cfg.public.dataset is not None
        external = load_public_dataset(cfg.public.dataset, data_dir, False, ds.input_shape, cfg.public.labels, device, run_task)
        rounds = RoundData([(data.x, data.y)], cfg.seed, False, cfg.public.mode == "dynamic", cfg.public.size, carve=True, external=external)
    spec = RunSpec(cfg, ds.input_shape, run_task.num_classes, device, run_task, tasks, alg_cls.name, rounds)
    return alg_cls(spec), data

