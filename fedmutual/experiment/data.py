"""The data of a run: the dataset, its seeded limits, the partition among clients and the validation splits.

:func:`prepare_data` is a pure function of the config's data fields and seed, unless the dataset or the
partition is given from Python; :func:`partition_record` is what a run's ``partition.json`` holds, and
:func:`recorded_fields` the config fields its ``config.json`` must then record so that the record names
the data the run really used (and stays rerunnable in the same process, or with ``indices:PATH`` from
the partition record).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from fedmutual.data import ArrayDataset, check_partition, load_dataset, stratified_subset, validation_splits
from fedmutual.data import partition as split_partition
from fedmutual.data.datasets import DATASETS
from fedmutual.data.tasks import Task, parse_task
from fedmutual.errors import ConfigError
from fedmutual.registry import canonical
from fedmutual.seeding import numpy_rng

if TYPE_CHECKING:
    from fedmutual.config import Config
    from fedmutual.protocol import ClientData

__all__ = [
    "EXPLICIT",
    "Prepared",
    "client_data",
    "client_tasks",
    "holdout_splits",
    "partition_record",
    "prepare_data",
    "recorded_fields",
]

#: The partition spec recorded for a partition given from Python (the runner records ``indices:PATH`` instead).
EXPLICIT = "explicit"


@dataclass
class Prepared:
    """The data of a run, split among clients."""

    dataset: ArrayDataset
    parts: list[np.ndarray]  # each client's training indices into train_x
    val: list[np.ndarray]  # each client's validation indices into test_x, or into train_x when val_on_train
    val_on_train: bool
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    partition: str = ""  # the partition spec that made ``assigned``; EXPLICIT when given from Python
    assigned: list[np.ndarray] | None = None  # each client's whole share before a validation holdout
    dataset_given: bool = False  # the dataset came from Python, not from the config's ``dataset``
    partition_given: bool = False  # the partition came from Python, not from the config's ``partition``


def prepare_data(
    cfg: Config,
    dataset: ArrayDataset | None = None,
    partition: Sequence[np.ndarray] | None = None,
    val_source: str = "test",
) -> Prepared:
    """Load the dataset, take the seeded stratified limits, partition it and draw validation splits.

    ``dataset`` replaces the config's ``dataset`` (its limits still apply). It is registered under
    its name for this process when that name resolves to nothing else, so that a config naming it
    resolves; a dataset made by ``from_arrays`` whose name already belongs to other data is refused.
    ``partition`` replaces the config's ``partition``: one array of training indices per client,
    into the training set after ``limit_train``, checked like every partition.
    ``val_source`` is where validation splits come from: ``"test"`` (drawn from the test set with
    each client's class mix) or ``"train"`` (held out from each client's share, ``val_fraction``).
    """
    if val_source not in ("test", "train"):
        raise ConfigError(f"val_source: {val_source!r}; expected 'test' or 'train'")
    if dataset is None:
        ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.download)
    else:
        if not isinstance(dataset, ArrayDataset):
            raise ConfigError(f"dataset: expected an ArrayDataset (e.g. from fedmutual.data.from_arrays), got {type(dataset).__name__}")
        ds = dataset
        _adopt(ds)
    tx, ty, vx, vy = ds.train_x, ds.train_y, ds.test_x, ds.test_y
    if cfg.limit_train is not None and cfg.limit_train < len(ty):
        idx = torch.from_numpy(stratified_subset(ty.numpy(), cfg.limit_train, cfg.seed))
        tx, ty = tx[idx], ty[idx]
    if cfg.limit_test is not None and cfg.limit_test < len(vy):
        idx = torch.from_numpy(stratified_subset(vy.numpy(), cfg.limit_test, cfg.seed + 1))
        vx, vy = vx[idx], vy[idx]
    if cfg.clients > len(ty):
        raise ConfigError(f"clients: {cfg.clients} clients but only {len(ty)} training samples; use fewer clients or more data")
    if partition is None:
        spec = cfg.partition
        parts = split_partition(ty.numpy(), spec, cfg.clients, cfg.seed)
    else:
        spec = EXPLICIT
        parts = check_partition(partition, len(ty), cfg.clients, "partition (given from Python)")
    if val_source == "train":
        train, val = holdout_splits(parts, cfg.val_fraction, cfg.seed)
    else:
        train, val = parts, validation_splits(parts, ty.numpy(), vy.numpy(), ds.num_classes, cfg.val_size, cfg.seed)
    return Prepared(ds, train, val, val_source == "train", tx, ty, vx, vy, partition=spec, assigned=parts,
                    dataset_given=dataset is not None, partition_given=partition is not None)


def _adopt(ds: ArrayDataset) -> None:
    """Register a dataset given from Python under its name, unless the name already names it."""
    key = canonical(ds.name)
    try:
        existing = DATASETS.get(key)
    except ConfigError:
        existing = None
    if existing is ds:
        return
    if existing is None:
        try:
            DATASETS.register(key, ds)
        except ValueError as e:
            raise ConfigError(f"dataset {ds.name!r}: {e}") from None
        return
    if ds.fingerprint is None:
        return  # loaded by the loader its name names (e.g. load_dataset(name)): the name is the truth
    same = (isinstance(existing, ArrayDataset) and existing.fingerprint == ds.fingerprint
            and existing.mean == ds.mean and existing.std == ds.std and existing.classes == ds.classes)
    if not same:
        what = existing.source if isinstance(existing, ArrayDataset) else "a loader"
        raise ConfigError(
            f"dataset {key!r}: this name already belongs to other data ({what}), so a run's config.json could "
            f"not name this dataset ({ds.source}); give it a name of its own (from_arrays(..., name=...))"
        )


def holdout_splits(parts: list[np.ndarray], fraction: float, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split each client's indices into train and validation (e.g. DFML's 80:20), seeded per client.

    A client keeps at least one training sample; its validation part has round(fraction·n) samples.
    """
    train, val = [], []
    for k, p in enumerate(parts):
        perm = numpy_rng(seed, "holdout", k).permutation(p)
        n_val = min(int(round(fraction * len(p))), len(p) - 1)
        train.append(np.sort(perm[n_val:]))
        val.append(np.sort(perm[:n_val]))
    return train, val


def client_tasks(cfg: Config, dataset_classes: int, allow_per_client: bool, allowed: Sequence[str] = ()) -> list[Task]:
    """Each client's task, checked against the dataset.

    Clients with different tasks are refused unless ``allow_per_client`` (the caller knows whether
    its algorithm serves per-client tasks); the error names ``allowed``, the algorithms that do.
    """
    tasks = [parse_task(spec, dataset_classes) for spec in cfg.task_specs()]
    if len(set(tasks)) > 1 and not allow_per_client:
        which = ", ".join(sorted(allowed)) or "algorithms that train a model per client"
        raise ConfigError(
            f"task: {cfg.algorithm} trains one model for every client, so the clients need one task; "
            f"got {'; '.join(sorted({t.spec for t in tasks}))}. Per-client tasks work with {which}."
        )
    return tasks


def client_data(data: Prepared, tasks: list[Task], device: torch.device) -> tuple[Task, list[ClientData]]:
    """Each client's data on ``device``, labelled by its own task, and the run's task.

    The run's task is the clients' task when they all share one, else the dataset's own classes.
    A client's training, validation and test labels are the dataset's labels mapped by its task;
    clients of the same task share one tensor of test labels.
    """
    from fedmutual.protocol import ClientData  # imported here: the protocol layer sits above the data

    task = tasks[0] if len(set(tasks)) == 1 else parse_task("classes", data.dataset.num_classes)
    test_x = data.test_x.to(device)
    test_y_of: dict[Task, torch.Tensor] = {}
    for t in tasks:
        test_y_of.setdefault(t, t.apply(data.test_y).to(device))
    val_x, val_y = (data.train_x, data.train_y) if data.val_on_train else (data.test_x, data.test_y)
    clients = [
        ClientData(data.train_x[p].to(device), t.apply(data.train_y[p]).to(device), val_x[v].to(device),
                   t.apply(val_y[v]).to(device), test_x, test_y_of[t], t)
        for p, v, t in zip(data.parts, data.val, tasks)
    ]
    return task, clients


def partition_record(prepared: Prepared) -> dict[str, Any]:
    """What a run's ``partition.json`` holds.

    ``train_sizes``, ``val_sizes`` and ``label_counts`` (training labels per client and class);
    ``train`` and ``val``, each client's indices (validation indices point into the training set
    when ``val_source`` is ``"train"``, else into the test set; both after the limits);
    ``assigned``, each client's whole share as the partition gave it (``train`` plus a held-out
    ``val``), which ``partition = "indices:<this file>"`` reads back; ``partition``, the spec used
    (``"explicit"`` when given from Python); and ``dataset``, ``source`` and ``fingerprint``, the
    dataset's name, where it came from and, for arrays, their SHA-256.
    """
    ds = prepared.dataset
    y = prepared.train_y.numpy()
    assigned = prepared.assigned if prepared.assigned is not None else prepared.parts
    return {
        "train_sizes": [len(p) for p in prepared.parts],
        "val_sizes": [len(v) for v in prepared.val],
        "label_counts": [np.bincount(y[p], minlength=ds.num_classes).tolist() for p in prepared.parts],
        "train": [p.tolist() for p in prepared.parts],
        "val": [v.tolist() for v in prepared.val],
        "assigned": [p.tolist() for p in assigned],
        "val_source": "train" if prepared.val_on_train else "test",
        "partition": prepared.partition,
        "dataset": ds.name,
        "source": ds.source,
        "fingerprint": ds.fingerprint,
    }


def recorded_fields(prepared: Prepared) -> dict[str, str]:
    """The config fields ``config.json`` must record instead of the config's own, for data given from Python.

    ``dataset``: the registered name of a dataset given from Python (:func:`prepare_data` registered
    it); ``partition``: ``"explicit"`` for a partition given from Python, which the runner replaces by
    ``"indices:<absolute path of the run's partition.json>"``. Empty when both came from the config.
    """
    out: dict[str, str] = {}
    if prepared.dataset_given:
        out["dataset"] = canonical(prepared.dataset.name)
    if prepared.partition_given:
        out["partition"] = EXPLICIT
    return out
