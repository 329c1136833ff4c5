"""What every algorithm sees (the :class:`Context`) and provides (the :class:`Algorithm` interface)."""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from fedmutual import aggregation
from fedmutual.config import Config
from fedmutual.data.tasks import Task
from fedmutual.errors import ConfigError, FedmutualError
from fedmutual.data.folds import RoundData, load_public_dataset
from fedmutual.engine.cohort import ClientJob, JobResult, Member, run_cohort, sgd, train_job
from fedmutual.faults import RoundEvents, RoundPlan, attackers, corrupt
from fedmutual.losses import binary_cross_entropy, check_kl_mode, cross_entropy
from fedmutual.models import adaptor_head, build_encoder, build_model, parse_model_spec
from fedmutual.seeding import derive_seed
from fedmutual.transport import InProcessTransport, Message, MessageRejected


@dataclass
class ClientData:
    """One client's private data, already on the run's device, with labels under the client's task.

    ``test_x``/``test_y`` are the shared test set under this client's task (None: not evaluated on it).
    """

    x: torch.Tensor
    y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor | None = None
    test_y: torch.Tensor | None = None
    task: Task | None = None

    @property
    def n(self) -> int:
        return len(self.y)


@dataclass
class Context:
    """The run as an algorithm sees it: config, data, transport and seed streams."""

    cfg: Config
    clients: list[ClientData]
    input_shape: tuple[int, int, int]
    num_classes: int
    device: torch.device
    transport: InProcessTransport
    on_step: Callable[[], None] | None = None
    task: Task | None = None  # the run's task; None: the dataset's own classes
    _rounds: RoundData | None = field(default=None, init=False, repr=False)
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)
    round: int = 0
    plan: RoundPlan = field(default_factory=RoundPlan)
    events: RoundEvents = field(default_factory=RoundEvents)
    hostile: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        a = self.cfg.attack
        if a.kind == "constant_label" and a.label >= self.num_classes:
            raise ConfigError(f"attack.label: {a.label}, but the task has {self.num_classes} classes (labels 0..{self.num_classes - 1})")
        self.hostile = attackers(self.cfg)
        self.transport.max_bytes = int(self.cfg.max_message_mb * 2**20)

    def begin_round(self, t: int, plan: RoundPlan) -> None:
        """Start round t with its drawn faults (the runner calls this before ``Algorithm.round``)."""
        self.round, self.plan = t, plan
        self.events = RoundEvents(dropped=list(plan.dropped))

    @property
    def num_outputs(self) -> int:
        """Outputs of the run's models: one per class, or 1 for a binary task."""
        return self.task.num_outputs if self.task is not None else self.num_classes

    @property
    def binary(self) -> bool:
        """Whether the run's task is binary: one sigmoid output, BCE, and a two-class KL."""
        return self.task is not None and self.task.binary

    def kl_mode(self, requested: str = "auto", key: str = "kl", k: int | None = None) -> str:
        """The KL mode for the run's models (client k's, when given): ``auto`` is ``bernoulli`` on a binary
        task, else ``softmax``. A mode that does not fit (``softmax`` on one output, a binary mode on several)
        is a ConfigError."""
        task = self.task if k is None else self.client_task(k)
        binary = task is not None and task.binary
        mode = ("bernoulli" if binary else "softmax") if requested == "auto" else requested
        try:
            check_kl_mode(mode, self.num_outputs if k is None else self.client_outputs(k))
        except ValueError as e:
            raise ConfigError(f"{key}: {e} (task {task.spec if task else 'classes'!r})") from None
        return mode

    def new_model(self, *stream: object, name: str | None = None, outputs: int | None = None) -> nn.Module:
        """A freshly initialized model whose weights depend only on the run seed and ``stream``.

        ``name`` defaults to the shared architecture (see :meth:`shared_model_name`),
        ``outputs`` to the run's task's (:attr:`num_outputs`).
        """
        name = name or self.shared_model_name()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.cfg.seed, "init", *stream))
            model = build_model(name, self.input_shape, outputs or self.num_outputs)
        # lets a checkpoint rebuild a model created on demand (fedmutual.checkpoint)
        model.fedmutual_init = {"stream": list(stream), "name": name, "outputs": outputs}
        return model.to(self.device)

    def client_task(self, k: int) -> Task | None:
        """Client k's task (``task`` may list one per client); None: the dataset's own classes."""
        return self.clients[k].task or self.task

    def client_outputs(self, k: int) -> int:
        """The number of outputs of client k's models: those of its task."""
        task = self.client_task(k)
        return task.num_outputs if task is not None else self.num_outputs

    def one_task(self, what: str) -> None:
        """Refuse clients with different tasks where ``what`` (e.g. one whole global model) must serve them all."""
        specs = sorted({t.spec for t in (self.client_task(k) for k in range(len(self.clients))) if t is not None})
        if len(specs) > 1:
            raise ConfigError(
                f"task: the clients' tasks differ ({'; '.join(specs)}), and {self.cfg.algorithm} has {what} for all of them; "
                f"give FML a partial global model (e.g. global_model = \"cnn2:encoder\"), whose adaptor heads are per client"
            )

    def new_client_model(self, k: int, *stream: object) -> nn.Module:
        """Client k's own architecture (``model``), with an output per class of client k's task."""
        return self.new_model(*stream, name=self.client_model_name(k), outputs=self.client_outputs(k))

    def new_encoder(self, *stream: object) -> nn.Sequential:
        """The partial global model (``global_model = "name:part"``), freshly initialized from ``stream``."""
        name, part = self._partial_spec()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.cfg.seed, "init", *stream))
            encoder, _ = build_encoder(name, part, self.input_shape)
        return encoder.to(self.device)

    def new_head(self, k: int, *stream: object) -> nn.Module:
        """Client k's adaptor head on the partial global model, sized for client k's task."""
        name, part = self._partial_spec()
        with torch.random.fork_rng(devices=[]):
            _, width = build_encoder(name, part, self.input_shape)
            torch.manual_seed(derive_seed(self.cfg.seed, "init", *stream))
            head = adaptor_head(width, self.client_outputs(k), self.cfg.fml.adaptor_hidden)
        return head.to(self.device)

    def _partial_spec(self) -> tuple[str, str]:
        name, part = self.global_model_spec()
        if part is None:
            raise ConfigError(f"global_model: {name!r} is a whole model, not a part such as {name}:encoder")
        return name, part

    def client_model_name(self, k: int) -> str:
        """Client k's own architecture (``model`` may list several, assigned round-robin)."""
        return self.cfg.model_names()[k]

    def shared_model_name(self) -> str:
        """The one architecture of a method that averages weights; refused when clients differ."""
        names = self.cfg.model_names()
        if len(set(names)) > 1:
            raise ConfigError(
                f"model: {self.cfg.algorithm} averages weights, so every client needs the same architecture; "
                f"got {', '.join(sorted(set(names)))}. Use one model name, or an algorithm for heterogeneous models (fml with global_model, dfml, local)."
            )
        return names[0]

    def global_model_spec(self) -> tuple[str, str | None]:
        """FML's global model: its architecture and named part (None = the whole model).

        ``global_model`` when set, else the clients' model when they all share one.
        """
        if self.cfg.global_model is not None:
            return parse_model_spec(self.cfg.global_model)
        names = self.cfg.model_names()
        if len(set(names)) > 1:
            raise ConfigError(
                f"global_model: {self.cfg.algorithm} needs a global model, and the clients' models differ "
                f"({', '.join(sorted(set(names)))}); set global_model (e.g. --global-model lenet5 or cnn2:encoder), "
                f"use one model name, or an algorithm without a global model (dfml, local, independent)."
            )
        return names[0], None

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """SGD with momentum and weight decay (the FML paper's), or Adam (``optimizer = "adam"``, DML-FL's)."""
        if self.cfg.optimizer == "adam":
            return torch.optim.Adam(model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        return sgd(model, self.cfg.lr, self.cfg.momentum, self.cfg.weight_decay)

    def round_data(self) -> RoundData:
        """The per-round folds and public sets (:mod:`fedmutual.data.folds`), built on first use.

        With ``local_data = "folds"`` every algorithm holds out the round's public
        fold as DML-FL does (settings ``dmlfl.public*``), so all methods train on
        the same local folds.
        """
        if self._rounds is None:
            d = self.cfg.dmlfl
            external = None
            if d.public_dataset is not None:
                external = load_public_dataset(
                    d.public_dataset, self.cfg.data_dir, self.cfg.download, self.input_shape, d.public_labels,
                    self.device, self.task,
                )
            self._rounds = RoundData(
                [(c.x, c.y) for c in self.clients], self.cfg.seed, self.cfg.local_data == "folds", d.public == "dynamic",
                d.public_size, carve=True, external=external,
            )
        return self._rounds

    def local_data(self, k: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client k's training data in round t: its partition, or the round's fold (``local_data = "folds"``).

        DML-FL with a public set carved from the training set also leaves out the
        round's public samples from a client's partition.
        """
        if self.cfg.local_data == "partition" and (self.cfg.algorithm != "dmlfl" or self.cfg.dmlfl.public_dataset):
            d = self.clients[k]
            return d.x, d.y
        return self.round_data().local(k, t)

    def lr_at(self, t: int) -> float:
        """The learning rate of round t: constant, or x0.1 at T/3 and 2T/3 (``lr_schedule = "step"``)."""
        if self.cfg.lr_schedule == "constant":
            return self.cfg.lr
        T = self.cfg.rounds
        return self.cfg.lr * 0.1 ** sum(t >= m for m in (T / 3, 2 * T / 3))

    def job(self, k: int, t: int, members: list[Member]) -> ClientJob:
        """Client k's training job of round t on its own data."""
        for m in members:
            for g in m.optimizer.param_groups:
                g["lr"] = self.lr_at(t)
        x, y = self.local_data(k, t)
        kl = self.kl_mode(k=k)  # a binary task (one sigmoid output) trains with BCE and the Bernoulli KL
        return ClientJob(
            client=k, members=members, x=x, y=y, epochs=self.cfg.local_epochs,
            batch_size=self.cfg.batch_size, shuffle_seed=derive_seed(self.cfg.seed, "shuffle", k, t),
            ce=cross_entropy if kl == "softmax" else binary_cross_entropy, kl=kl,
        )

    def train(self, jobs: list[ClientJob], t: int) -> list[JobResult]:
        """Train the cohort; a client drawn to crash raises half-way and gets an empty result (``steps == 0``)."""
        crashing = [j for j in jobs if j.client in self.plan.crash]
        healthy = [j for j in jobs if j.client not in self.plan.crash]
        done = dict(zip(map(id, healthy), run_cohort(healthy, t, self.on_step, self.cfg.engine) if healthy else []))
        for job in crashing:
            done[id(job)] = self._crash(job, t)
        return [done[id(j)] for j in jobs]

    def _crash(self, job: ClientJob, t: int) -> JobResult:
        from fedmutual.engine.cohort import count_steps

        at, steps = max(1, count_steps([job]) // 2), [0]

        def step() -> None:
            steps[0] += 1
            if self.on_step is not None:
                self.on_step()
            if steps[0] == at:
                raise ClientCrash(f"client {job.client} crashed in its update (simulated) after {at} steps")

        try:
            train_job(job, t, step)
        except ClientCrash as e:
            self.events.crashed.append(job.client)
            self.log(f"fedmutual: round {t + 1}: {e}; its reply is lost")
        return JobResult(job.client)

    def send(self, src: str, dst: str, tensors: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor] | None = None,
             content: str = "weights", **meta: object) -> Message | None:
        """Send a message through the run's transport; returns what the receiver accepted, or None.

        None (only ever for a client sender) means the message did not arrive or was rejected: its sender crashed or missed the
        deadline this round, or the receiver's validation refused it (logged with the reason).
        ``like`` is what the receiver expects the message to match in keys, shapes and dtypes
        (default: the tensors as the sender's honest code produced them). Messages from
        simulated attackers are corrupted here, before they are serialized and counted.
        ``content`` (weights, probabilities or logits) tells an attacker what it is corrupting.
        """
        k = party_index(src)
        if k is not None and k in self.events.crashed:
            return None
        if k is not None and k in self.plan.late:
            if k not in self.events.late:
                self.events.late.append(k)
                self.log(f"fedmutual: round {self.round + 1}: client {k} missed the deadline "
                         f"({self.plan.delay[k]:.2f} > {self.cfg.faults.deadline}); its messages are discarded")
            return None
        schema = like if like is not None else {n: v.detach() for n, v in tensors.items()}
        if k is not None and k in self.hostile:
            tensors = corrupt(self.cfg, tensors, like, content, self.round, k, dst)
        msg = Message(dict(tensors), {n: str(v) for n, v in meta.items()})
        try:
            return self.transport.send(src, dst, msg, like=schema)
        except MessageRejected as e:
            if k is None:  # a trusted party (the server) produced an invalid message: a bug, not a fault
                raise FedmutualError(f"round {self.round + 1}: the message from {src} to {dst} is invalid: {e.reason}") from None
            self.events.rejected.append({"client": k if k is not None else src, "reason": e.reason})
            self.log(f"fedmutual: round {self.round + 1}: rejected the message from {src} to {dst}: {e.reason}")
            return None

    def gather(self, dst: str, replies: Mapping[int, Mapping[str, torch.Tensor]], like: Mapping[str, torch.Tensor] | None = None,
               content: str = "weights", **meta: Any) -> dict[int, Message]:
        """Send each client's reply to ``dst``; returns the valid ones that arrived, by client.

        A meta value may be a function of the client id (e.g. ``num_samples=lambda k: ...``).
        With fewer than ``faults.min_replies`` valid replies, the round is marked skipped, a line is
        logged, and the result is empty: the algorithm then leaves its state as it was.
        """
        got: dict[int, Message] = {}
        for k, tensors in replies.items():
            m = {n: (v(k) if callable(v) else v) for n, v in meta.items()}
            msg = self.send(client_name(k), dst, tensors, like=like, content=content, **m)
            if msg is not None:
                got[k] = msg
        need = self.cfg.faults.min_replies
        if len(got) < need:
            self.events.skipped = True
            self.log(f"fedmutual: round {self.round + 1}: {len(got)} valid replies of {len(replies)} reached {dst}, "
                     f"fewer than faults.min_replies = {need}; the round is skipped")
            return {}
        return got

    def aggregate(self, states: list[Mapping[str, torch.Tensor]], weights: list[float] | None = None) -> dict[str, torch.Tensor]:
        """Combine model states with the configured rule (``aggregation.rule``; robust rules ignore weights)."""
        return aggregation.aggregate(states, self.cfg.aggregation.rule, weights, self.cfg.aggregation.trim)

    def reduce(self, stacked: torch.Tensor) -> torch.Tensor:
        """Combine rows of stacked tensors (one per party, e.g. shared predictions) with the configured rule."""
        return aggregation.reduce_rows(stacked, self.cfg.aggregation.rule, self.cfg.aggregation.trim)


class ClientCrash(Exception):
    """A simulated exception in a client's update."""


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """A model's state as a plain dict of detached tensors (what goes into a message)."""
    return {k: v.detach() for k, v in model.state_dict().items()}


def client_name(k: int) -> str:
    return f"client{k}"


def party_index(name: str) -> int | None:
    """k for ``"client<k>"``; None for other parties (the server)."""
    return int(name[6:]) if name.startswith("client") and name[6:].isdigit() else None


class Algorithm(ABC):
    """One federated method. Subclasses implement :meth:`round` in the paper's words.

    ``global_model`` is None where the method has none; ``client_model(k)`` is
    client k's deployable model (evaluated on the test set and its validation split).
    """

    name = "base"
    transient: tuple[str, ...] = ()  # attributes a checkpoint skips (rebuilt from the config at start)
    #: whether clients may hold different tasks (``task`` as a list); the runner refuses it otherwise
    client_tasks = False

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything that changes across rounds, as (tensors, JSON tree), for a checkpoint.

        The default walks the instance's attributes (see :mod:`fedmutual.checkpoint`): models,
        optimizers, tensors, lists and dicts of them and JSON values are covered without code.
        Override together with :meth:`load_state` for state of another kind.
        """
        from fedmutual.checkpoint import capture_attrs

        return capture_attrs(self, {"ctx", *self.transient})

    def load_state(self, tensors: dict[str, torch.Tensor], tree: dict[str, Any]) -> None:
        """Restore what :meth:`state` captured, onto an instance freshly built from the same config."""
        from fedmutual.checkpoint import restore_attrs

        restore_attrs(self, tensors, tree, self.ctx.new_model)

    def sample(self, t: int) -> list[int]:
        """The participants of round t: by default a seeded fraction ``sample_fraction`` of the clients."""
        from fedmutual.engine.runner import sample_participants

        return sample_participants(self.ctx.cfg, t)

    def extra_models(self) -> dict[str, list[nn.Module]]:
        """Further per-client models to evaluate on the test set, by name (e.g. DFML's current models)."""
        return {}

    @abstractmethod
    def round(self, t: int, participants: list[int]) -> dict[str, float]:
        """Run round t with the sampled ``participants``; returns training statistics."""

    def global_model(self) -> nn.Module | None:
        return None

    @abstractmethod
    def client_model(self, k: int) -> nn.Module:
        """Client k's deployable model."""


def mean_loss(results: list[JobResult], member: int = 0) -> float:
    """Mean over clients of one member's mean training loss."""
    vals = [r.loss[member] for r in results if r.steps]
    return sum(vals) / len(vals) if vals else float("nan")
