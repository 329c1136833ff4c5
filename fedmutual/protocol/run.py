"""What every party knows about a run, and what each client has of its own.

:class:`RunSpec` holds the public facts: the config, the input shape, the tasks, and the factories that
build models and optimizers from the run seed, so that every party (a server, a client, a peer on another
machine) builds the same initial models. :class:`ClientEnv` is what one client's handler sees of its own:
its data, the round, the round's public set, and how to describe a training job on its data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import nn

from fedmutual import aggregation
from fedmutual.config import Config
from fedmutual.data.tasks import Task
from fedmutual.engine.cohort import ClientJob, Member, sgd
from fedmutual.errors import ConfigError
from fedmutual.losses import binary_cross_entropy, check_kl_mode, cross_entropy
from fedmutual.models import adaptor_head, build_encoder, build_model, parse_model_spec
from fedmutual.seeding import derive_seed

if TYPE_CHECKING:
    from fedmutual.data.folds import RoundData


@dataclass
class ClientData:
    """One client's private data, already on its device, with labels under the client's task.

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
class RunSpec:
    """The run as every party knows it: config, input shape, tasks, device, and seeded factories.

    ``num_classes`` is the run's task's number of classes; ``tasks`` each client's task (None: the dataset's
    own classes). ``algorithm`` names the method in messages. ``rounds`` derives per-round folds and public
    sets from the seed (None: the run has none).
    """

    cfg: Config
    input_shape: tuple[int, int, int]
    num_classes: int
    device: torch.device
    task: Task | None = None
    tasks: Sequence[Task | None] = ()
    algorithm: str = ""
    rounds: "RoundData | None" = field(default=None, repr=False)

    def public_set(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Round t's public set (x, y): every party derives the same one from the seed and t."""
        if self.rounds is None:
            raise ConfigError(f"{self.algorithm} asked for a public set, but the run has none")
        return self.rounds.public_set(t)

    # ------------------------------------------------------------------ tasks and losses

    @property
    def num_outputs(self) -> int:
        """Outputs of the run's models: one per class, or 1 for a binary task."""
        return self.task.num_outputs if self.task is not None else self.num_classes

    @property
    def binary(self) -> bool:
        """Whether the run's task is binary: one sigmoid output, BCE, and a two-class KL."""
        return self.task is not None and self.task.binary

    def client_task(self, k: int) -> Task | None:
        """Client k's task (``task`` may list one per client); None: the dataset's own classes."""
        own = self.tasks[k] if k < len(self.tasks) else None
        return own or self.task

    def client_outputs(self, k: int) -> int:
        """The number of outputs of client k's models: those of its task."""
        task = self.client_task(k)
        return task.num_outputs if task is not None else self.num_outputs

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

    def one_task(self, what: str) -> None:
        """Refuse clients with different tasks where ``what`` (e.g. one whole global model) must serve them all."""
        specs = sorted({t.spec for t in (self.client_task(k) for k in range(self.cfg.clients)) if t is not None})
        if len(specs) > 1:
            raise ConfigError(
                f"task: the clients' tasks differ ({'; '.join(specs)}), and {self.algorithm} has {what} for all of them; "
                f"give FML a partial global model (e.g. global_model = \"cnn2:encoder\"), whose adaptor heads are per client"
            )

    # ------------------------------------------------------------------ architectures

    def client_model_name(self, k: int) -> str:
        """Client k's own architecture (``model`` may list several, assigned round-robin)."""
        return self.cfg.model_names()[k]

    def shared_model_name(self) -> str:
        """The one architecture of a method that averages weights; refused when clients differ."""
        names = self.cfg.model_names()
        if len(set(names)) > 1:
            raise ConfigError(
                f"model: {self.algorithm} averages weights, so every client needs the same architecture; "
                f"got {', '.join(sorted(set(names)))}. Use one model name, or an algorithm for heterogeneous models (fml with global_model, dfml, local)."
            )
        return names[0]

    def global_model_spec(self) -> tuple[str, str | None]:
        """The global model's architecture and named part (None = the whole model).

        ``global_model`` when set, else the clients' model when they all share one.
        """
        if self.cfg.global_model is not None:
            return parse_model_spec(self.cfg.global_model)
        names = self.cfg.model_names()
        if len(set(names)) > 1:
            raise ConfigError(
                f"global_model: {self.algorithm} needs a global model, and the clients' models differ "
                f"({', '.join(sorted(set(names)))}); set global_model (e.g. --global-model lenet5 or cnn2:encoder), "
                f"use one model name, or an algorithm without a global model (dfml, local, independent)."
            )
        return names[0], None

    # ------------------------------------------------------------------ factories

    def new_model(self, *stream: object, name: str | None = None, outputs: int | None = None) -> nn.Module:
        """A freshly initialized model whose weights depend only on the run seed and ``stream``.

        ``name`` defaults to the shared architecture (see :meth:`shared_model_name`),
        ``outputs`` to the run's task's (:attr:`num_outputs`).
        """
        name = name or self.shared_model_name()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.cfg.seed, "init", *stream))
            model = build_model(name, self.input_shape, outputs or self.num_outputs)
        # lets a saved state rebuild a model created on demand (fedmutual.protocol.state)
        setattr(model, "fedmutual_init", {"stream": list(stream), "name": name, "outputs": outputs})
        return model.to(self.device)

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

    def new_head(self, k: int, *stream: object, hidden: Sequence[int] = ()) -> nn.Module:
        """Client k's adaptor head on the partial global model, sized for client k's task
        (one FC layer, or FC -> ReLU -> ... -> FC with ``hidden`` widths)."""
        name, part = self._partial_spec()
        with torch.random.fork_rng(devices=[]):
            _, width = build_encoder(name, part, self.input_shape)
            torch.manual_seed(derive_seed(self.cfg.seed, "init", *stream))
            head = adaptor_head(width, self.client_outputs(k), hidden)
        return head.to(self.device)

    def _partial_spec(self) -> tuple[str, str]:
        name, part = self.global_model_spec()
        if part is None:
            raise ConfigError(f"global_model: {name!r} is a whole model, not a part such as {name}:encoder")
        return name, part

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """SGD with momentum and weight decay (the FML paper's), or Adam (``optimizer = "adam"``, DML-FL's)."""
        if self.cfg.optimizer == "adam":
            return torch.optim.Adam(model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        return sgd(model, self.cfg.lr, self.cfg.momentum, self.cfg.weight_decay)

    def lr_at(self, t: int) -> float:
        """The learning rate of round t: constant, or x0.1 at T/3 and 2T/3 (``lr_schedule = "step"``)."""
        if self.cfg.lr_schedule == "constant":
            return self.cfg.lr
        T = self.cfg.rounds
        return self.cfg.lr * 0.1 ** sum(t >= m for m in (T / 3, 2 * T / 3))

    # ------------------------------------------------------------------ combining

    def aggregate(self, states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
        """Combine model states with the configured rule (``aggregation.rule``; robust rules ignore weights)."""
        return aggregation.aggregate(list(states), self.cfg.aggregation.rule, None if weights is None else list(weights),
                                     self.cfg.aggregation.trim)

    def reduce(self, stacked: torch.Tensor) -> torch.Tensor:
        """Combine rows of stacked tensors (one per party, e.g. shared predictions) with the configured rule."""
        return aggregation.reduce_rows(stacked, self.cfg.aggregation.rule, self.cfg.aggregation.trim)


@dataclass
class ClientEnv:
    """What client ``k``'s handlers see of their own: its data, the current round and the round's public set.

    ``carve`` says whether the round's public samples are left out of the client's partition.
    """

    k: int
    data: ClientData
    run: RunSpec
    round: int = 0
    carve: bool = False

    @property
    def n(self) -> int:
        """The client's number of training samples (its partition)."""
        return self.data.n

    def local_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The client's training data this round: its partition, a fresh fold (``local_data = "folds"``), or its
        partition without the round's public samples (when the algorithm carves its public set from the clients)."""
        cfg, rounds = self.run.cfg, self.run.rounds
        if rounds is None or (cfg.local_data == "partition" and not (self.carve and cfg.public.dataset is None)):
            return self.data.x, self.data.y
        return rounds.local(self.k, self.round)

    def public_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The round's public set (x, y): every party derives the same one from the seed and the round."""
        return self.run.public_set(self.round)

    def job(self, members: list[Member], **overrides: Any) -> ClientJob:
        """This client's training job this round on its own data: its members trained together with the run's
        epochs, batch size, learning rate of the round, and the loss of its task (BCE and the Bernoulli KL on a
        binary task). ``overrides`` replace fields of the job (e.g. ``x``, ``y``, ``epochs``, ``temperature``)."""
        run, t = self.run, self.round
        for m in members:
            for g in m.optimizer.param_groups:
                g["lr"] = run.lr_at(t)
        if "x" not in overrides:
            overrides["x"], overrides["y"] = self.local_data()
        kl = run.kl_mode(k=self.k)
        fields: dict[str, Any] = dict(
            client=self.k, members=members, epochs=run.cfg.local_epochs, batch_size=run.cfg.batch_size,
            shuffle_seed=derive_seed(run.cfg.seed, "shuffle", self.k, t),
            ce=cross_entropy if kl == "softmax" else binary_cross_entropy, kl=kl,
        )
        fields.update(overrides)
        return ClientJob(**fields)
