"""Simulated failures and attacks, all drawn from the run seed.

Each round, every sampled client draws from its own stream ``("faults", t, k)``:

- **dropout**: the client is offline for the round: it receives nothing, trains nothing, sends nothing;
- **crash**: its update raises an exception half-way through its local steps; what it changed in
  memory stays changed, and nothing it would send afterwards in that round leaves it;
- **straggler**: it takes U(1, slowdown) times a normal client's time; with a ``deadline`` (in normal
  client times) its messages arrive too late and are discarded.

Attackers (``attack.clients`` and a seeded draw of ``attack.count``) corrupt every message they send:

- ``sign_flip``: ``ref - scale·(x - ref)``, with ``ref`` what the receiver expects the reply to resemble
  (the model it sent; zero when there is none): the update pushed the other way;
- ``noise``: weights ``x + scale·N(0, 1)``; probabilities: rows drawn uniformly from the simplex
  (binary predictions, one column: U(0, 1)); logits ``scale·N(0, 1)``;
- ``constant_label``: predictions claiming ``label`` for every sample (weights are left alone);
  binary predictions (one column, P(positive)) are 1 for label 1 and 0 for label 0;
- ``nan``: every floating tensor full of NaN (a broken client).

Because every draw depends only on (seed, round, client) and, for noise, the receiver and the tensor's name,
a resumed run sees the same faults, and a message means the same whatever order it lists its tensors in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from fedmutual.config import Config
from fedmutual.seeding import numpy_rng, torch_generator

CONTENTS = ("weights", "probabilities", "logits")


@dataclass
class RoundPlan:
    """The faults drawn for one round."""

    dropped: list[int] = field(default_factory=list)
    crash: set[int] = field(default_factory=set)
    delay: dict[int, float] = field(default_factory=dict)  # in normal client times; 1.0 unless a straggler
    late: set[int] = field(default_factory=set)  # clients whose messages miss the deadline


@dataclass
class RoundEvents:
    """What actually happened in one round, written to ``metrics.jsonl`` under ``faults``."""

    dropped: list[int] = field(default_factory=list)
    crashed: list[int] = field(default_factory=list)
    late: list[int] = field(default_factory=list)
    rejected: list[dict[str, object]] = field(default_factory=list)  # {"client": k, "reason": ...}
    skipped: bool = False

    def as_row(self) -> dict[str, object]:
        return {"dropped": self.dropped, "crashed": self.crashed, "late": self.late, "rejected": self.rejected, "skipped": self.skipped}


def plan_round(cfg: Config, t: int, sampled: list[int]) -> RoundPlan:
    """Draw round t's faults for the sampled clients."""
    f = cfg.faults
    plan = RoundPlan()
    for k in sampled:
        u = numpy_rng(cfg.seed, "faults", t, k).random(4)
        if u[0] < f.dropout:
            plan.dropped.append(k)
            continue
        if u[1] < f.crash:
            plan.crash.add(k)
        plan.delay[k] = 1.0 + (f.slowdown - 1.0) * float(u[3]) if u[2] < f.straggler else 1.0
        if f.deadline is not None and plan.delay[k] > f.deadline:
            plan.late.add(k)
    return plan


def attackers(cfg: Config) -> set[int]:
    """The hostile clients: ``attack.clients`` plus a seeded draw up to ``attack.count`` in all."""
    if cfg.attack.kind == "none":
        return set()
    chosen = set(cfg.attack.clients)
    rest = [k for k in numpy_rng(cfg.seed, "attackers").permutation(cfg.clients).tolist() if k not in chosen]
    return chosen | set(rest[: max(0, cfg.attack.count - len(chosen))])


def corrupt(cfg: Config, tensors: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor] | None,
            content: str, *stream: object) -> dict[str, torch.Tensor]:
    """What an attacker sends instead of ``tensors`` (``content``: weights, probabilities or logits)."""
    a = cfg.attack
    if content not in CONTENTS:
        raise ValueError(f"unknown message content {content!r}; allowed: {', '.join(CONTENTS)}")
    out: dict[str, torch.Tensor] = {}
    for key, x in tensors.items():
        g = torch_generator(cfg.seed, "attack", *stream, key)  # per tensor: the draw ignores the order of a message's tensors
        if not x.is_floating_point():
            out[key] = x
            continue
        x64 = x.detach().to("cpu", torch.float64)
        if a.kind == "nan":
            y = torch.full_like(x64, float("nan"))
        elif a.kind == "sign_flip":
            r = ref[key].detach().to("cpu", torch.float64) if ref is not None and key in ref and ref[key].shape == x.shape else torch.zeros_like(x64)
            y = r - a.scale * (x64 - r)
        elif a.kind == "noise":
            if content == "weights":
                y = x64 + a.scale * torch.randn(x.shape, generator=g, dtype=torch.float64)
            elif content == "logits":
                y = a.scale * torch.randn(x.shape, generator=g, dtype=torch.float64)
            elif x.shape[-1] == 1:  # binary: one probability of the positive class per sample
                y = torch.rand(x.shape, generator=g, dtype=torch.float64)
            else:  # uniform on the simplex: normalized exponentials
                e = -torch.rand(x.shape, generator=g, dtype=torch.float64).clamp_min(1e-12).log()
                y = e / e.sum(-1, keepdim=True)
        else:  # constant_label
            if content == "weights":
                y = x64
            elif x.shape[-1] == 1:  # binary: P(positive) is 1 for label 1, 0 for label 0
                y = torch.full_like(x64, float(a.label == 1)) if content == "probabilities" else torch.full_like(x64, 20.0 if a.label == 1 else -20.0)
            else:
                hot = torch.nn.functional.one_hot(torch.full(x.shape[:-1], a.label), x.shape[-1]).to(torch.float64)
                y = hot if content == "probabilities" else 20.0 * hot  # logits: softmax puts ~1 on the label
        out[key] = y.to(x.dtype).to(x.device)
    return out
