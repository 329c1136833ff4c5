"""Where a round's time goes: named phases timed with a wall clock, when asked for.

The engine and the runtimes wrap their parts in :func:`phase` (training steps, batch gathering, stacking and
write-back, evaluation, messages, checkpoints). Timing is off by default and then costs one attribute check per
phase. :func:`timing` turns it on for a block and returns the seconds per phase; a phase nested in another is
counted in both (``train`` holds ``train.gather``), so the breakdown reads as a tree. On CUDA the phases
synchronize the device, so that the time of queued kernels lands in the phase that queued them.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch

_seconds: dict[str, float] | None = None
_calls: dict[str, int] = defaultdict(int)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the block as phase ``name`` when timing is on; otherwise do nothing."""
    if _seconds is None:
        yield
        return
    sync = torch.cuda.is_available() and torch.cuda.is_initialized()
    if sync:
        torch.cuda.synchronize()
    start = time.perf_counter()
    try:
        yield
    finally:
        if sync:
            torch.cuda.synchronize()
        if _seconds is not None:
            _seconds[name] += time.perf_counter() - start
            _calls[name] += 1


@contextmanager
def timing() -> Iterator[dict[str, float]]:
    """Turn phase timing on for the block; the dict it yields fills with seconds per phase."""
    global _seconds
    previous = _seconds
    _seconds = defaultdict(float)
    _calls.clear()
    out = _seconds
    try:
        yield out
    finally:
        _seconds = previous
