"""Per-round data of the DML-FL protocol: fresh stratified folds and the public set.

The DML-FL authors cut a labelled pool into stratified disjoint folds; each
round every client trains on a fresh fold of its own and a further fold is the
round's public set (the "dynamic test set"). Here the pool is the run's
training set, i.e. the union of the clients' data. :class:`RoundData` gives,
for round t:

- ``public_set(t)``: the public set, carved from the pool (``dynamic``: a
  fresh stratified fold each round; ``static``: one fold for the whole run)
  or drawn from a second dataset;
- ``local(k, t)``: client k's training data: a fresh stratified fold of the
  pool disjoint from the public set (``local_data = "folds"``), or its own
  partition without the samples that are in the round's public set.

Every party can derive the round's folds from the run seed and t alone
(streams ``("folds", t)`` and ``("public",)``), so no indices travel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from fedmutual.errors import ConfigError

if TYPE_CHECKING:
    from fedmutual.data.tasks import Task
from fedmutual.seeding import numpy_rng


def stratified_split(labels: np.ndarray, sizes: Sequence[int], rng: np.random.Generator) -> list[np.ndarray]:
    """Disjoint index sets of the given ``sizes`` (sum at most ``len(labels)``), each stratified.

    Each class's samples are shuffled and spread evenly over one ordering of the
    whole set (sample i of a class with n_c samples sits at (i + u_c)/n_c, u_c a
    random offset); the pieces are consecutive runs of that ordering, so every
    piece holds each class in proportion to its size, up to about one sample.
    Returns sorted int64 arrays.
    """
    y = np.asarray(labels)
    if sum(sizes) > len(y) or any(s < 0 for s in sizes):
        raise ConfigError(f"cannot cut pieces of sizes {list(sizes)} from {len(y)} samples")
    idx_parts, key_parts = [], []
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        idx_parts.append(members)
        key_parts.append((np.arange(len(members)) + rng.random()) / len(members))
    idx, key = np.concatenate(idx_parts), np.concatenate(key_parts)
    order = idx[np.lexsort((rng.random(len(idx)), key))]
    bounds = np.cumsum([0, *sizes])
    return [np.sort(order[a:b]).astype(np.int64) for a, b in zip(bounds[:-1], bounds[1:])]


@dataclass
class Split:
    """One round's split of the pool: public indices (None when the public set is another dataset)
    and each client's fold (None when clients train on their own partition)."""

    public: np.ndarray | None
    folds: list[np.ndarray] | None


class RoundData:
    """Public sets and local training data per round (see the module docstring).

    ``clients`` are the clients' (x, y) training data; the pool is their
    concatenation in client order. ``carve`` says whether the public set is cut
    from the pool; ``external`` is a second dataset's (x, y) to draw it from
    instead.
    """

    def __init__(
        self,
        clients: Sequence[tuple[torch.Tensor, torch.Tensor]],
        seed: int,
        folds: bool,
        dynamic: bool,
        public_size: int | None,
        carve: bool,
        external: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        self.clients, self.seed, self.folds, self.dynamic = list(clients), seed, folds, dynamic
        self.external = external
        self.carve = carve and external is None
        self.x = torch.cat([x for x, _ in self.clients])
        self.y = torch.cat([y for _, y in self.clients])
        self.owner = np.concatenate([np.full(len(y), k) for k, (_, y) in enumerate(self.clients)])
        self.row = np.concatenate([np.arange(len(y)) for _, y in self.clients])
        self.labels = self.y.cpu().numpy()
        n, K = len(self.labels), len(self.clients)
        source = len(external[1]) if external is not None else n
        self.public_size = public_size if public_size is not None else n // (K + 1)
        if self.public_size < 1 or self.public_size > source:
            raise ConfigError(f"public.size: {self.public_size} public samples asked for, but the source has {source}")
        self.fold_size = (n - (self.public_size if self.carve else 0)) // K
        if folds and self.fold_size < 1:
            raise ConfigError(f"local_data = 'folds': {n} training samples are too few for {K} client folds and a public set")
        self._cache: tuple[int, Split] | None = None

    def split(self, t: int) -> Split:
        """The pool's split of round t (the same split every time it is asked for)."""
        if self._cache is not None and self._cache[0] == (t if self.dynamic or self.folds else 0):
            return self._cache[1]
        K, P, f = len(self.clients), self.public_size, self.fold_size
        rng = numpy_rng(self.seed, "folds", t)
        public = None
        rest = np.arange(len(self.labels))
        if self.carve and self.dynamic:
            pieces = stratified_split(self.labels, [P] + ([f] * K if self.folds else []), rng)
            public, folds = pieces[0], (pieces[1:] if self.folds else None)
        else:
            if self.carve:
                public = stratified_split(self.labels, [P], numpy_rng(self.seed, "public"))[0]
                rest = np.setdiff1d(rest, public)
            folds = [rest[p] for p in stratified_split(self.labels[rest], [f] * K, rng)] if self.folds else None
        split = Split(public, folds)
        self._cache = (t if self.dynamic or self.folds else 0, split)
        return split

    def public_set(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The public set of round t as (x, y)."""
        if self.external is not None:
            x, y = self.external
            stream = ("public", t) if self.dynamic else ("public",)
            idx = stratified_split(y.cpu().numpy(), [self.public_size], numpy_rng(self.seed, *stream))[0]
            idx_t = torch.from_numpy(idx).to(x.device)
            return x[idx_t], y[idx_t]
        public = self.split(t).public
        assert public is not None
        idx_t = torch.from_numpy(public).to(self.x.device)
        return self.x[idx_t], self.y[idx_t]

    def local(self, k: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client k's training data of round t: its fold, or its partition without the round's public samples."""
        s = self.split(t)
        if s.folds is not None:
            idx = torch.from_numpy(s.folds[k]).to(self.x.device)
            return self.x[idx], self.y[idx]
        x, y = self.clients[k]
        if s.public is None:
            return x, y
        keep = np.ones(len(y), dtype=bool)
        keep[self.row[s.public[self.owner[s.public] == k]]] = False
        idx = torch.from_numpy(np.flatnonzero(keep)).to(x.device)
        return x[idx], y[idx]


def load_public_dataset(
    name: str,
    data_dir: str | None,
    download: bool,
    input_shape: tuple[int, ...],
    labelled: bool,
    device: torch.device,
    task: "Task | None" = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A second dataset's training set as a public-set source (standardized with its own statistics).

    Its samples must have the run's input shape; a labelled public set also
    needs the run dataset's number of classes, and its labels go through the
    run's task like the clients' labels.
    """
    from fedmutual.data.datasets import load_dataset

    ds = load_dataset(name, data_dir, download)
    if tuple(ds.input_shape) != tuple(input_shape):
        raise ConfigError(
            f"public.dataset: {ds.name} has inputs of shape {tuple(ds.input_shape)}, the run's dataset "
            f"{tuple(input_shape)}; the public set must have the same input shape"
        )
    y = ds.train_y
    if labelled and task is not None:
        if ds.num_classes != len(task.label_map):
            raise ConfigError(
                f"public.dataset: {ds.name} has {ds.num_classes} classes, the run's dataset {len(task.label_map)}; "
                "a labelled public set needs the same classes (or set public.labels = false)"
            )
        y = task.apply(y)
    return ds.train_x.to(device), y.to(device)
