"""Shared test setup: every test leaves the public registries as it found them."""

from __future__ import annotations

from typing import Iterator

import pytest

from fedmutual.data import DATASETS, PARTITIONS
from fedmutual.models import MODELS
from fedmutual.registry import ALGORITHMS


@pytest.fixture(autouse=True)
def _restore_registries() -> Iterator[None]:
    """What a test registers (or imports by import string) is gone after it, so tests do not depend on their order."""
    registries = (ALGORITHMS, MODELS, DATASETS, PARTITIONS)
    for r in registries:
        r.names()  # load the built-ins first, so that the snapshot holds them
    saved = [(r, dict(r._entries), list(r._builtin_names)) for r in registries]
    yield
    for r, entries, builtin in saved:
        r._entries.clear()
        r._entries.update(entries)
        r._builtin_names[:] = builtin
