"""A partitioner of a user's own: ``partition = "mypkg.parts:label_skew:2"``, or registered by name."""

from __future__ import annotations

import numpy as np

from fedmutual.seeding import numpy_rng


def label_skew(labels: np.ndarray, num_clients: int, seed: int, arg: str | None) -> list[np.ndarray]:
    """Client k holds ``arg`` classes (default 2): k·c .. k·c + c - 1, modulo the number of classes. Each class's
    samples are split evenly, in a seeded order, among the clients holding it; classes nobody holds are left out."""
    c = int(arg or 2)
    classes = int(labels.max()) + 1
    rng = numpy_rng(seed, "label-skew")
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for y in range(classes):
        owners = [k for k in range(num_clients) if (y - k * c) % classes < c]
        idx = rng.permutation(np.flatnonzero(labels == y))
        for k, chunk in zip(owners, np.array_split(idx, len(owners)) if owners else []):
            parts[k] += chunk.tolist()
    return [np.array(sorted(p), dtype=np.int64) for p in parts]
