"""Client jobs and the plain training loop.

An algorithm describes, for each participating client, which models train
together (the *members*, :class:`Member`), with which loss weights, on which
data (:class:`ClientJob`). :func:`train_job` runs one job with a plain loop
over its mini-batches; it is the reference that the stacked engine
(:mod:`fedmutual.engine.stacked`) reproduces, and what that engine falls back
to for jobs it cannot stack. :func:`fedmutual.engine.cohort.run_cohort` chooses
between the two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from fedmutual.engine.phases import phase
from fedmutual.errors import NonFiniteLossError
from fedmutual.losses import CEFn, cross_entropy, mutual_loss
from fedmutual.seeding import torch_generator


@dataclass
class Member:
    """One model in a client's mutual-learning step and its share of the loss.

    ``prox_mu`` and ``prox_ref`` add FedProx's (mu/2)·||w - w_ref||² to this member's loss.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    w_ce: float = 1.0
    w_kl: float = 0.0
    prox_mu: float = 0.0
    prox_ref: list[torch.Tensor] | None = None


@dataclass
class ClientJob:
    """What one client trains this round: its members, its data, and its shuffling stream.

    ``teachers[i]``, if set, holds fixed teacher probabilities for member i,
    one row per sample of ``x`` (``[N, P, C]``): each mini-batch takes the rows
    of its samples (DML-FL's received predictions). ``kl`` is the KL mode of
    :func:`fedmutual.losses.mutual_loss`.
    """

    client: int
    members: list[Member]
    x: torch.Tensor
    y: torch.Tensor
    epochs: int
    batch_size: int
    shuffle_seed: int
    temperature: float = 1.0
    ce: CEFn = cross_entropy
    peers: Sequence[Sequence[int]] | None = None
    teachers: Sequence[torch.Tensor | None] | None = None
    kl: str = "softmax"


@dataclass
class JobResult:
    client: int
    steps: int = 0
    loss: list[float] = field(default_factory=list)  # mean loss per member over the job


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The mini-batches of one epoch: a seeded permutation of ``range(n)``, last batch kept even if short."""
    perm = torch.randperm(n, generator=torch_generator(seed, "epoch", epoch))
    return list(perm.split(batch_size))


def prox_term(model: nn.Module, ref: Sequence[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's proximal term (mu/2)·||w - w_ref||²."""
    sq = sum(((p - r) ** 2).sum() for p, r in zip(model.parameters(), ref))
    return 0.5 * mu * torch.as_tensor(sq)  # as_tensor returns a tensor as it is; 0 (no parameters) as tensor(0)


def train_job(job: ClientJob, round: int, on_step: Callable[[], None] | None = None) -> JobResult:
    """Run one client's job with a plain loop over its members."""
    with phase("train.loop"):
        return _train_job(job, round, on_step)


def _train_job(job: ClientJob, round: int, on_step: Callable[[], None] | None) -> JobResult:
    result = JobResult(job.client, loss=[0.0] * len(job.members))
    for m in job.members:
        m.model.train()
    n = len(job.y)
    for epoch in range(job.epochs):
        for idx in batch_order(n, job.batch_size, job.shuffle_seed, epoch):
            idx = idx.to(job.x.device)
            xb, yb = job.x[idx], job.y[idx]
            logits = [m.model(xb) for m in job.members]
            teachers = None if job.teachers is None else [None if T is None else T[idx] for T in job.teachers]
            total, parts = mutual_loss(
                logits, yb, [m.w_ce for m in job.members], [m.w_kl for m in job.members],
                job.temperature, job.ce, job.peers, teachers=teachers, kl=job.kl,
            )
            for m in job.members:
                if m.prox_mu and m.prox_ref is not None:
                    total = total + prox_term(m.model, m.prox_ref, m.prox_mu)
            value = float(total.detach())
            if not math.isfinite(value):
                raise NonFiniteLossError(job.client, round + 1, value)  # rounds are reported 1-based
            for m in job.members:
                m.optimizer.zero_grad(set_to_none=True)
            total.backward()
            for m in job.members:
                m.optimizer.step()
            for i, p in enumerate(parts):
                result.loss[i] += float(p.detach())
            result.steps += 1
            if on_step is not None:
                on_step()
    if result.steps:
        result.loss = [v / result.steps for v in result.loss]
    return result


def count_steps(jobs: Sequence[ClientJob]) -> int:
    """Total optimizer steps the cohort will take (for progress bars)."""
    return sum(j.epochs * math.ceil(len(j.y) / j.batch_size) for j in jobs)


def sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """The paper's optimizer: SGD with momentum and weight decay."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on (x, y), in eval mode; a model with one output is binary (logit > 0 is class 1)."""
    if len(y) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    correct = 0
    for s in range(0, len(y), batch_size):
        out = model(x[s : s + batch_size])
        pred = (out[..., 0] > 0).long() if out.shape[-1] == 1 else out.argmax(-1)
        correct += int((pred == y[s : s + batch_size]).sum())
    model.train(was_training)
    return correct / len(y)
