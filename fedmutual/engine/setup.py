"""Device and thread settings, chosen once per process."""

from __future__ import annotations

import os

import torch

from fedmutual.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (an error if unavailable) or ``auto`` (CUDA when present)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was requested but no CUDA device is available; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"device: invalid value {name!r}; allowed: cpu, cuda, auto")
    return torch.device(name)


def default_threads() -> int:
    """One intra-op thread per available core (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def configure_threads(threads: int | None) -> int:
    """Set torch's intra-op threads to ``threads`` (default: the available cores) and inter-op to 1.

    Small models on few cores collapse when threads are oversubscribed, so the
    count is set deliberately and never above the cores this process may use.
    """
    n = threads or default_threads()
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set, or parallel work has started; harmless
    return n
