"""Combining what several parties sent: model states, or stacked predictions.

``weighted_mean`` is the plain average (FedAvg, FML). ``median`` and
``trimmed_mean`` are the robust rules: per coordinate, they ignore the most
extreme values, so a minority of hostile or broken participants cannot drag
the result arbitrarily far. Each rule works on a tensor stacked along dim 0
(one row per party, e.g. the predictions of DML-FL's clients on a public set)
and, through :func:`aggregate`, on state dicts.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

RULES = ("mean", "median", "trimmed_mean")


def weighted_mean(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Coordinate-wise weighted mean of state dicts with identical keys and shapes.

    ``weights`` default to uniform and are normalized to sum to 1. Floating
    tensors are averaged in float64 and cast back; integer buffers (counters)
    are taken from the first state.
    """
    if not states:
        raise ValueError("cannot average zero states")
    w = torch.tensor([1.0] * len(states) if weights is None else list(weights), dtype=torch.float64)
    if len(w) != len(states) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"need {len(states)} non-negative weights with a positive sum, got {list(w)}")
    w = w / w.sum()
    out: dict[str, torch.Tensor] = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            out[key] = first.clone()
            continue
        acc = torch.zeros_like(first, dtype=torch.float64)
        for wi, s in zip(w.tolist(), states):
            acc += wi * s[key].to(torch.float64)
        out[key] = acc.to(first.dtype)
    return out


def median(stacked: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median over dim 0; with an even count, the mean of the two middle values.

    Computed in float64 and cast back to the input's dtype.
    """
    if stacked.shape[0] == 0:
        raise ValueError("cannot take the median of zero rows")
    s = stacked.to(torch.float64).sort(dim=0).values
    n = s.shape[0]
    mid = (s[(n - 1) // 2] + s[n // 2]) / 2
    return mid.to(stacked.dtype)


def trim_count(n: int, trim: float) -> int:
    """How many values :func:`trimmed_mean` drops at each end: floor(trim·n), keeping at least one value."""
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    return min(math.floor(trim * n + 1e-9), (n - 1) // 2)


def trimmed_mean(stacked: torch.Tensor, trim: float) -> torch.Tensor:
    """Coordinate-wise mean over dim 0 after dropping the floor(trim·n) smallest and largest values."""
    if stacked.shape[0] == 0:
        raise ValueError("cannot average zero rows")
    n = stacked.shape[0]
    b = trim_count(n, trim)
    s = stacked.to(torch.float64).sort(dim=0).values
    return s[b : n - b].mean(dim=0).to(stacked.dtype)


def reduce_rows(stacked: torch.Tensor, rule: str = "mean", trim: float = 0.1, weights: Sequence[float] | None = None) -> torch.Tensor:
    """Combine the rows of ``stacked`` (one per party) with ``rule``: mean (optionally weighted), median or trimmed_mean.

    Robust rules ignore ``weights``: a weight is a claim by the sender, which a hostile party could inflate.
    """
    if rule == "mean":
        return weighted_mean([{"x": row} for row in stacked], weights)["x"]
    if rule == "median":
        return median(stacked)
    if rule == "trimmed_mean":
        return trimmed_mean(stacked, trim)
    raise ValueError(f"unknown aggregation rule {rule!r}; allowed: {', '.join(RULES)}")


def aggregate(states: Sequence[Mapping[str, torch.Tensor]], rule: str = "mean", weights: Sequence[float] | None = None,
              trim: float = 0.1) -> dict[str, torch.Tensor]:
    """Combine state dicts key by key with ``rule``; ``mean`` is exactly :func:`weighted_mean`.

    Integer buffers are taken from the first state, as in :func:`weighted_mean`.
    """
    if rule == "mean":
        return weighted_mean(states, weights)
    if not states:
        raise ValueError("cannot aggregate zero states")
    out: dict[str, torch.Tensor] = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            out[key] = first.clone()
        else:
            out[key] = reduce_rows(torch.stack([s[key] for s in states]), rule, trim)
    return out
