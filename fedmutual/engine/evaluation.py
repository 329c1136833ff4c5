"""Evaluation of many models on one test set: identical architectures run as one stacked model.

Every round, every client's model is tested on the same test set (and DFML's
current models too), K forward passes over 10 000 samples. Models that share an
architecture run stacked (:class:`fedmutual.engine.stacking.StackedModel` in
evaluation mode), each test batch laid out once for all of them; the rest, and
everything with ``engine = "loop"``, run one by one through
:func:`fedmutual.engine.jobs.accuracy`. Both give the same predictions up to
floating-point rounding (tested).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import torch
from torch import nn

from fedmutual.engine.jobs import accuracy
from fedmutual.engine.stacking import StackedModel, architecture, trace

# Bounds of one stacked evaluation call, so that its activations stay in cache (measured with
# benchmarks/engine.py --eval on LeNet5: 1024 samples per call ran about 2x the loop, 1780 about 1.3x).
EVAL_SAMPLES_PER_CALL = 1024
EVAL_ACTIVATION_BUDGET = 16 << 20
EVAL_PARAMETER_BUDGET = 64 << 20
EVAL_MIN_BATCH = 32  # fewer models per call rather than batches smaller than this


_traces: dict[tuple[Any, ...], Any] = {}


def _stack_key(model: nn.Module, x: torch.Tensor) -> tuple[Any, ...] | None:
    arch = architecture(model)
    if arch is None or arch[1:] != (str(x.dtype), str(x.device)) or x.dim() < 2:
        return None
    key = (arch, tuple(x.shape[1:]))
    if key not in _traces:  # one trace per architecture and sample shape
        _traces[key] = trace(model, key[1])
    foot = _traces[key]
    return None if foot is None else (arch, foot)


@torch.no_grad()
def _stacked_correct(models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, batch: int) -> list[int]:
    """Correct predictions of each model on (x, y), all models in one stacked forward per batch."""
    stack = StackedModel(models).train(False)
    correct = torch.zeros(len(models), dtype=torch.int64, device=x.device)
    for s in range(0, len(y), batch):
        logits = stack.forward(x[s : s + batch].unsqueeze(0), repeat=len(models))  # [S, b, C]
        pred = (logits[..., 0] > 0).long() if logits.shape[-1] == 1 else logits.argmax(-1)
        correct += (pred == y[s : s + batch]).sum(1)
    return correct.tolist()


def shared_accuracies(
    models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000, engine: str = "auto"
) -> list[float]:
    """Top-1 accuracy of each model on the same (x, y), in evaluation mode.

    A model listed twice is evaluated once. With ``engine = "stacked"``, models
    of one architecture (two or more) run stacked; ``"auto"`` does so for models
    with convolutions (measured: 2.5-4x the loop for LeNet5, CNN1 and CNN2, 0.8x
    for the MLP); ``"loop"`` runs each model alone.
    """
    if len(y) == 0:
        return [float("nan")] * len(models)
    unique: dict[int, nn.Module] = {}
    for m in models:
        unique.setdefault(id(m), m)
    acc: dict[int, float] = {}
    if engine != "loop":
        groups: dict[tuple[Any, ...], list[nn.Module]] = defaultdict(list)
        for m in unique.values():
            key = _stack_key(m, x)
            if key is not None:
                groups[key].append(m)
        for (_, foot), members in groups.items():
            if len(members) < 2 or (engine == "auto" and foot.conv_macs == 0):
                continue  # a linear-only model's matrix products already run well one model at a time
            params = 4 * sum(p.numel() for p in members[0].parameters())
            per_call = max(1, min(len(members), EVAL_PARAMETER_BUDGET // params, EVAL_SAMPLES_PER_CALL // EVAL_MIN_BATCH))
            for s in range(0, len(members), per_call):
                chunk = members[s : s + per_call]
                batch = max(1, min(batch_size, EVAL_SAMPLES_PER_CALL // len(chunk),
                                   EVAL_ACTIVATION_BUDGET // (4 * len(chunk) * foot.activation)))
                for m, c in zip(chunk, _stacked_correct(chunk, x, y, batch)):
                    acc[id(m)] = c / len(y)
    for ident, m in unique.items():
        if ident not in acc:
            acc[ident] = accuracy(m, x, y, batch_size)
    return [acc[id(m)] for m in models]


@torch.no_grad()
def _stacked_own_correct(models: Sequence[nn.Module], xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], batch: int) -> list[int]:
    """Correct predictions of each model on its own (x, y), all of equal length, in one stacked forward per batch."""
    stack = StackedModel(models).train(False)
    x, y = torch.stack(list(xs)), torch.stack(list(ys))  # [S, n, ...], [S, n]
    correct = torch.zeros(len(models), dtype=torch.int64, device=x.device)
    for s in range(0, y.shape[1], batch):
        logits = stack.forward(x[:, s : s + batch])  # [S, b, C]
        pred = (logits[..., 0] > 0).long() if logits.shape[-1] == 1 else logits.argmax(-1)
        correct += (pred == y[:, s : s + batch]).sum(1)
    return correct.tolist()


def own_accuracies(
    models: Sequence[nn.Module], xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], batch_size: int = 1000,
    engine: str = "auto",
) -> list[float]:
    """Top-1 accuracy of each model on its own data (``models[i]`` on ``(xs[i], ys[i])``), in evaluation mode.

    The clients' validation splits: models of one architecture whose data have equal lengths run stacked, under
    the rules of :func:`shared_accuracies` (``auto``: models with convolutions); the rest run one by one.
    """
    acc: dict[int, float] = {}
    if engine != "loop":
        groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        for i, (m, x, y) in enumerate(zip(models, xs, ys)):
            key = _stack_key(m, x) if len(y) else None
            if key is not None:
                groups[(key, len(y))].append(i)
        for ((_, foot), n), ids in groups.items():
            unique = {id(models[i]) for i in ids}
            if len(unique) < len(ids) or len(ids) < 2 or (engine == "auto" and foot.conv_macs == 0):
                continue  # a model listed twice, one model, or a linear-only model: one by one
            params = 4 * sum(p.numel() for p in models[ids[0]].parameters())
            per_call = max(1, min(len(ids), EVAL_PARAMETER_BUDGET // params, EVAL_SAMPLES_PER_CALL // EVAL_MIN_BATCH))
            for s in range(0, len(ids), per_call):
                chunk = ids[s : s + per_call]
                batch = max(1, min(batch_size, EVAL_SAMPLES_PER_CALL // len(chunk),
                                   EVAL_ACTIVATION_BUDGET // (4 * len(chunk) * foot.activation)))
                got = _stacked_own_correct([models[i] for i in chunk], [xs[i] for i in chunk], [ys[i] for i in chunk], batch)
                for i, c in zip(chunk, got):
                    acc[i] = c / n
    return [acc[i] if i in acc else accuracy(m, x, y, batch_size) for i, (m, x, y) in enumerate(zip(models, xs, ys))]
