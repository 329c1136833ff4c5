"""Combining model states received from clients."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch


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
