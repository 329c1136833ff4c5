"""A runtime over small synthetic client data, assembled as ``fedmutual.experiment.runner.build`` assembles a run."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fedmutual.config import Config
from fedmutual.data.folds import RoundData, load_public_dataset
from fedmutual.data.tasks import parse_task
from fedmutual.experiment.data import client_tasks
from fedmutual.protocol import ClientData, Message, RunSpec
from fedmutual.runtimes.inprocess import InProcess, client_envs

NUM_CLASSES = 4


class Recorded(InProcess):
    """The in-process runtime, unchanged, that also keeps what every counted message delivered.

    ``messages[i]`` belongs to ``traffic.log[i]``: ``(src, dst, msg)`` with ``msg`` the message as its receiver
    accepted it (after any attack and a round trip through safetensors), or None where it was rejected.
    ``lines`` collects what the runtime logs.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.lines: list[str] = []
        self.messages: list[tuple[str, str, Message | None]] = []
        super().__init__(*args, log=self.lines.append, record=True, **kwargs)

    def _carry(self, *args: Any, **kwargs: Any) -> Message | None:
        before = len(self.traffic.log)
        out = super()._carry(*args, **kwargs)
        if len(self.traffic.log) > before:  # it went over the wire (a message to oneself or an empty one does not)
            s, d, _, _ = self.traffic.log[-1]
            self.messages.append((s, d, out))
        return out

    def clear(self) -> None:
        """Forget the recorded messages and the byte counts."""
        self.traffic.log.clear()
        self.traffic.reset()
        self.messages.clear()


def synthetic_clients(sizes, shape) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n in sizes:
        x = torch.randn(n, *shape, generator=g)
        y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        out.append((x, y))
    return out


@pytest.fixture
def make_runtime():
    """An :class:`InProcess` runtime (a :class:`Recorded` one) over small synthetic client data.

    Unequal client sizes, 4 classes, 1x8x8 inputs unless ``shape`` is given; each client's validation split is
    its first 8 samples. ``task`` may give each client its own task, as in a config. ``algorithm_class`` runs
    another :class:`~fedmutual.protocol.Algorithm` on the same config (the config still names ``algorithm``).
    Traffic is recorded (``rt.traffic.log``, ``rt.messages``) and log lines collect in ``rt.lines``.
    """

    def make(sizes=(40, 28, 17), shape=(1, 8, 8), algorithm_class=None, **cfg_kwargs) -> Recorded:
        defaults: dict[str, Any] = dict(clients=len(sizes), model="mlp", batch_size=8, local_epochs=2, rounds=3, lr=0.05)
        defaults.update(cfg_kwargs)
        cfg = Config(**defaults)
        alg_cls = algorithm_class or cfg.algorithm_class()
        tasks = client_tasks(cfg, NUM_CLASSES, alg_cls.client_tasks)
        task = tasks[0] if len(set(tasks)) == 1 else parse_task("classes", NUM_CLASSES)  # the run's task, as in build
        clients = []
        for (x, y), t in zip(synthetic_clients(sizes, shape), tasks):
            y = t.apply(y)
            clients.append(ClientData(x, y, x[:8], y[:8], task=t))
        rounds = None
        if cfg.local_data == "folds" or alg_cls.carves_public:
            p = cfg.public
            external = None
            if p.dataset is not None:
                external = load_public_dataset(p.dataset, cfg.data_dir, cfg.download, shape, p.labels, torch.device("cpu"), task)
            rounds = RoundData([(c.x, c.y) for c in clients], cfg.seed, cfg.local_data == "folds", p.mode == "dynamic",
                               p.size, carve=True, external=external)
        spec = RunSpec(cfg, shape, task.num_classes, torch.device("cpu"), task, [c.task for c in clients], alg_cls.name, rounds)
        alg = alg_cls(spec)
        return Recorded(alg, client_envs(alg, clients))

    return make
