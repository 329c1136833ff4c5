"""Splitting a training set among clients, and per-client validation sets.

Every function here is a pure function of its arguments: the randomness comes
from :func:`fedmutual.seeding.numpy_rng` streams named after the function
(``"partition"``, ``"stratified_subset"``, ``"validation"``), so the same
labels, spec, number of clients and seed always give the same split, and the
split does not change when unrelated settings (rounds, model, ...) do.

Partition specs (``name`` or ``name:arg``), resolved through the registry
:data:`PARTITIONS`:

``iid``
    a seeded permutation cut into K parts whose sizes differ by at most 1.
``shards:P``
    the pathological non-IID split of McMahan et al., used by the FML paper:
    sort by label (ties in seeded random order), cut into K*P shards of
    near-equal size (the n mod K*P leftover samples go one each to the first
    shards, so no sample is dropped and shard sizes differ by at most 1), and
    give each client P shards drawn by a seeded permutation.
``dirichlet:A``
    for each class, proportions ~ Dir(A, ..., A) over the K clients split
    that class's shuffled samples; redrawn (up to 100 times) while a client
    has fewer than ``min(10, n // K)`` samples.
``indices:PATH``
    each client's training indices, read from the JSON file PATH: a list of
    index lists (one per client), or an object holding them under
    ``"assigned"`` or ``"train"``, such as a run's ``partition.json``. The
    indices refer to the training set the run uses (after ``limit_train``).
``NAME[:ARG]``
    a partitioner added with :func:`register_partition`, an installed plug-in
    (entry point of group ``fedmutual.partitions``), or an import string
    ``"package.module:function[:ARG]"``; it is called as
    ``fn(labels, num_clients, seed, arg)`` with ``arg`` the text after the
    name's colon (None without one).

Whatever made it, a partition is checked by :func:`check_partition`: one
index array per client, integer indices into the training set, none empty,
and no index given to two clients (or twice to one).
"""

from __future__ import annotations

import json
import math
from collections import deque
from fractions import Fraction
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np

from fedmutual.errors import ConfigError, DataError, FedmutualError
from fedmutual.registry import Registry, canonical, is_import_string
from fedmutual.seeding import numpy_rng

__all__ = [
    "PARTITIONS",
    "PartitionFn",
    "check_partition",
    "parse_partition",
    "partition",
    "read_indices",
    "register_partition",
    "stratified_subset",
    "validation_splits",
    "label_table",
    "format_label_table",
    "DIRICHLET_TRIES",
]

#: How many Dirichlet draws are tried before giving up on the minimum client size.
DIRICHLET_TRIES = 100

#: Splits a training set: ``fn(labels, num_clients, seed, arg) -> one index array per client``.
PartitionFn = Callable[[np.ndarray, int, int, Union[str, None]], Sequence[np.ndarray]]

_FORMS = (
    "'iid', 'shards:P' (P shards per client, an integer >= 1, e.g. 'shards:2') or "
    "'dirichlet:A' (concentration A, a number > 0, e.g. 'dirichlet:0.5')"
)

#: The partitions whose specs fedmutual defines itself; they cannot be replaced.
BUILTIN_PARTITIONS: tuple[str, ...] = ("iid", "shards", "dirichlet", "indices")


def _check_fn(name: str, obj: object) -> PartitionFn:
    if not callable(obj):
        raise TypeError(
            f"a partitioner must be a callable (labels, num_clients, seed, arg) -> list of index arrays, "
            f"got {type(obj).__name__} {obj!r}"
        )
    return obj


#: Every partition a config can name (``partition = "name[:arg]"``); the built-ins first.
PARTITIONS: Registry[PartitionFn] = Registry("partition", check=_check_fn)


def register_partition(name: str, fn: PartitionFn, replace: bool = False) -> PartitionFn:
    """Make ``fn`` available to configs as ``partition = "name"`` or ``"name:arg"``.

    ``fn(labels, num_clients, seed, arg)`` gets the training labels (int64, one per sample), the
    number of clients, the run seed and the text after the colon (None without one), and returns
    one array of training-set indices per client; the result is checked by :func:`check_partition`.
    It should draw its randomness from ``seed`` only (e.g. ``fedmutual.seeding.numpy_rng(seed,
    "my-partition")``) so that a config reproduces its split. A name that is taken raises ValueError
    unless ``replace``; the built-in names (``iid``, ``shards``, ``dirichlet``, ``indices``) cannot be
    replaced. Returns ``fn``.
    """
    if canonical(name) in BUILTIN_PARTITIONS:
        raise ValueError(f"{canonical(name)!r} is a built-in partition and cannot be replaced; register yours under another name")
    PARTITIONS.register(name, fn, replace=replace)
    return fn


def _shards_arg(spec: str, arg: str) -> int:
    p = int(arg) if arg.isdigit() else 0
    if p < 1:
        raise ConfigError(
            f"partition {spec!r}: the number of shards per client must be an integer "
            f">= 1; expected {_FORMS}."
        )
    return p


def _dirichlet_arg(spec: str, arg: str) -> float:
    try:
        a = float(arg)
    except ValueError:
        a = float("nan")
    if not (math.isfinite(a) and a > 0):
        raise ConfigError(
            f"partition {spec!r}: the Dirichlet concentration must be a finite number "
            f"> 0; expected {_FORMS}."
        )
    return a


def _unknown(spec: object) -> ConfigError:
    users = [n for n in PARTITIONS.names() if n not in BUILTIN_PARTITIONS and ":" not in n]
    more = f", the registered {', '.join(map(repr, users))}" if users else ""
    return ConfigError(
        f"unknown partition {spec!r}; expected {_FORMS}. Also possible: 'indices:PATH' (a JSON file of "
        f"each client's training indices, e.g. a run's partition.json){more}, or an import string such as "
        "'mypackage.splits:split' (with ':ARG' to pass it an argument)."
    )


def _user_spec(text: str) -> tuple[str, str | None] | None:
    """A registered or plug-in name with an optional argument, or an import string with one; None if neither."""
    head, sep, rest = text.partition(":")
    key = canonical(head)
    if key and key not in BUILTIN_PARTITIONS and not is_import_string(key):
        try:
            PARTITIONS.get(key)
            return key, (rest.strip() or None) if sep else None
        except ConfigError as e:
            if not str(e).startswith("unknown partition"):
                raise  # a plug-in that failed to load
    if sep:
        attr, sep2, arg = rest.partition(":")
        target = f"{head.strip()}:{attr.strip()}"
        if is_import_string(target):
            PARTITIONS.get(target)  # imports it now: a config naming a missing function is refused early
            return target, (arg.strip() or None) if sep2 else None
    return None


def parse_partition(spec: str) -> tuple[str, float | int | str | None]:
    """Parse a partition spec: ``("iid", None)``, ``("shards", P)``, ``("dirichlet", A)``,
    ``("indices", PATH)``, or a registered partitioner's (or an import string's) name and its
    argument text (None without one). Names are case-insensitive; arguments keep their case."""
    if not isinstance(spec, str):
        raise ConfigError(f"partition must be a string, got {spec!r}; expected {_FORMS}.")
    text = spec.strip()
    if text.lower() == "iid":
        return "iid", None
    kind, sep, arg = text.partition(":")
    kind = kind.strip().lower()
    arg = arg.strip()
    if sep and kind == "shards":
        return "shards", _shards_arg(spec, arg)
    if sep and kind == "dirichlet":
        return "dirichlet", _dirichlet_arg(spec, arg)
    if kind == "indices":
        if not arg:
            raise ConfigError(
                f"partition {spec!r}: 'indices:PATH' needs the path of a JSON file of each client's "
                "training indices (e.g. 'indices:runs/my-run/partition.json')."
            )
        return "indices", arg
    found = _user_spec(text) if text else None
    if found is None:
        raise _unknown(spec)
    return found


def _check_labels(labels: np.ndarray, what: str = "labels") -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or (y.size and y.dtype.kind not in "iu"):
        raise DataError(
            f"{what} must be a 1-D array of integer class indices, got {y.dtype} of shape {y.shape}."
        )
    y = y.astype(np.int64, copy=False)
    if y.size and y.min() < 0:
        raise DataError(f"{what} contain the negative label {int(y.min())}; labels must be >= 0.")
    return y


def _check_clients(num_clients: int, n: int) -> int:
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)):
        raise ConfigError(f"the number of clients must be an integer, got {num_clients!r}.")
    k = int(num_clients)
    if not 1 <= k <= n:
        raise ConfigError(
            f"cannot split {n} training samples among {k} clients: the number of clients "
            f"must be between 1 and {n} (each client needs at least one sample)."
        )
    return k


def check_partition(parts: object, num_samples: int, num_clients: int, what: str = "partition") -> list[np.ndarray]:
    """Check a partition of ``num_samples`` training samples among ``num_clients`` clients.

    ``parts`` must hold one 1-D array (or list) of integer indices ``0..num_samples-1`` per client,
    none empty, and no index may be given to two clients or twice to one (samples may be left
    out). Returns each client's indices sorted, as int64 copies; a ConfigError starting with
    ``what`` says what is wrong otherwise.
    """
    if isinstance(parts, (str, bytes, dict)) or not isinstance(parts, (Sequence, np.ndarray)):
        raise ConfigError(f"{what}: expected a list of index arrays, one per client, got {type(parts).__name__}.")
    if len(parts) != num_clients:
        raise ConfigError(f"{what}: {len(parts)} index arrays for {num_clients} clients; it must give one per client.")
    arrays = []
    for i, p in enumerate(parts):
        a = np.asarray(p.detach().cpu() if hasattr(p, "detach") else p)
        if a.ndim != 1:
            raise ConfigError(f"{what}: client {i}'s indices have shape {a.shape}; expected a 1-D array of sample indices.")
        if a.size == 0:
            raise ConfigError(f"{what}: client {i} gets no training samples; every client needs at least one.")
        if a.dtype.kind not in "iu":
            raise ConfigError(f"{what}: client {i}'s indices are {a.dtype}; expected integer sample indices.")
        a = a.astype(np.int64)
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= num_samples:
            bad = lo if lo < 0 else hi
            raise ConfigError(
                f"{what}: client {i} gets index {bad}, outside the training set of {num_samples} samples "
                f"(indices 0..{num_samples - 1})."
            )
        arrays.append(a)
    counts = np.bincount(np.concatenate(arrays), minlength=num_samples)
    if counts.max() > 1:
        idx = int(np.flatnonzero(counts > 1)[0])
        owners = [i for i, a in enumerate(arrays) if (a == idx).any()]
        if len(owners) == 1:
            raise ConfigError(f"{what}: client {owners[0]} gets index {idx} more than once; a sample counts once.")
        raise ConfigError(
            f"{what}: index {idx} is given to clients {', '.join(map(str, owners))}; a sample belongs to one client."
        )
    return [np.sort(a) for a in arrays]


def read_indices(path: str | Path, what: str | None = None) -> list[np.ndarray]:
    """Each client's training indices from the JSON file ``path`` (see the ``indices:PATH`` spec).

    The file holds a list of index lists, one per client, or an object with them under
    ``"assigned"`` (preferred: each client's whole share, before any validation holdout) or
    ``"train"``, such as a run's ``partition.json``. Not checked against a training set here.
    """
    what = what or f"partition 'indices:{path}'"
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{what}: {p} {'is not a file' if p.exists() else 'does not exist'}.")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{what}: cannot read {p} as JSON ({e}).") from None
    if isinstance(data, dict):
        data = data.get("assigned", data.get("train"))
    if not isinstance(data, list) or not all(isinstance(c, list) for c in data):
        raise ConfigError(
            f"{what}: {p} holds no per-client index lists; expected a list of lists of integers, or an "
            "object with them under 'assigned' or 'train' (as a run's partition.json)."
        )
    parts = []
    for i, c in enumerate(data):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in c):
            raise ConfigError(f"{what}: client {i}'s entry in {p} holds something other than integer indices.")
        parts.append(np.asarray(c, dtype=np.int64))
    return parts


def _dirichlet(y: np.ndarray, k: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    n = len(y)
    order = np.argsort(y, kind="stable")
    bounds = np.flatnonzero(np.diff(y[order])) + 1
    by_class = [rng.permutation(chunk) for chunk in np.split(order, bounds)]
    min_size = min(10, n // k)
    smallest = 0
    for _ in range(DIRICHLET_TRIES):
        pieces: list[list[np.ndarray]] = [[] for _ in range(k)]
        for idx in by_class:
            p = rng.dirichlet(np.full(k, alpha))
            cuts = np.minimum((np.cumsum(p)[:-1] * len(idx)).astype(np.int64), len(idx))
            for client, chunk in enumerate(np.split(idx, cuts)):
                pieces[client].append(chunk)
        parts = [np.concatenate(pc) for pc in pieces]
        smallest = min(len(p) for p in parts)
        if smallest >= min_size:
            return parts
    raise DataError(
        f"dirichlet:{alpha:g} could not give each of the {k} clients at least {min_size} "
        f"samples in {DIRICHLET_TRIES} seeded draws (the smallest client got {smallest}; "
        f"{n} samples, {len(by_class)} classes). With a small concentration each class "
        "goes to few clients, so with many clients some end up (nearly) empty. Use fewer "
        "clients, a larger concentration A, or another partition (e.g. 'shards:2')."
    )


def _iid(labels: np.ndarray, k: int, seed: int, arg: str | None) -> list[np.ndarray]:
    rng = numpy_rng(seed, "partition")
    return np.array_split(rng.permutation(len(labels)), k)


def _shards(labels: np.ndarray, k: int, seed: int, arg: str | None) -> list[np.ndarray]:
    spec = f"shards:{arg}"
    p = _shards_arg(spec, str(arg or "").strip())
    y, n = labels, len(labels)
    rng = numpy_rng(seed, "partition")
    num_shards = k * p
    if num_shards > n:
        raise ConfigError(
            f"partition {spec!r} with {k} clients needs {num_shards} shards, but there are "
            f"only {n} training samples (each shard needs at least one). Use fewer clients "
            "or fewer shards per client."
        )
    shuffled = rng.permutation(n)
    order = shuffled[np.argsort(y[shuffled], kind="stable")]
    shards = np.array_split(order, num_shards)
    shard_ids = rng.permutation(num_shards)
    return [np.concatenate([shards[s] for s in shard_ids[c * p:(c + 1) * p]]) for c in range(k)]


def _dirichlet_split(labels: np.ndarray, k: int, seed: int, arg: str | None) -> list[np.ndarray]:
    alpha = _dirichlet_arg(f"dirichlet:{arg}", str(arg or "").strip())
    return _dirichlet(labels, k, alpha, numpy_rng(seed, "partition"))


def _indices(labels: np.ndarray, k: int, seed: int, arg: str | None) -> list[np.ndarray]:
    return read_indices(str(arg or ""))


for _name, _fn in (("iid", _iid), ("shards", _shards), ("dirichlet", _dirichlet_split), ("indices", _indices)):
    PARTITIONS.register(_name, _fn)
del _name, _fn


def partition(labels: np.ndarray, spec: str, num_clients: int, seed: int) -> list[np.ndarray]:
    """Split sample indices ``0..len(labels)-1`` among ``num_clients`` clients by ``spec``.

    Returns one sorted int64 index array per client, checked by :func:`check_partition`
    (for the built-in random splits every index appears in exactly one of them).
    See the module docstring for the specs.
    """
    kind, value = parse_partition(spec)
    # a partitioner gets the argument as text; shards and dirichlet parse it again themselves
    arg = spec.strip().partition(":")[2].strip() if kind in ("shards", "dirichlet") else None if value is None else str(value)
    y = _check_labels(labels, "training labels")
    n = len(y)
    k = _check_clients(num_clients, n)
    fn = PARTITIONS.get(kind)
    if kind in BUILTIN_PARTITIONS:
        parts = fn(y, k, seed, arg)
    else:
        try:
            parts = fn(y.copy(), k, seed, arg)
        except FedmutualError:
            raise
        except Exception as e:
            raise ConfigError(f"partition {spec!r}: the partitioner failed ({type(e).__name__}: {e})") from e
    return check_partition(parts, n, k, f"partition {spec!r}")


def _apportion(weights: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Integers summing to ``total`` proportional to ``weights`` (largest remainder).

    Exact integer arithmetic; ties between equal remainders are broken at random.
    """
    w = weights.astype(np.int64)
    whole = int(w.sum())
    num = total * w
    quota, rem = num // whole, num % whole
    extra = total - int(quota.sum())
    order = np.lexsort((rng.random(len(w)), -rem))
    quota[order[:extra]] += 1
    return quota


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` sorted indices into ``labels`` whose class counts are proportional to the full set's.

    Each class gets its largest-remainder share of ``n`` (so counts are within 1
    of exact proportionality and sum to ``n``), drawn without replacement.
    """
    y = _check_labels(labels)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= len(y):
        raise ConfigError(
            f"cannot draw a stratified subset of {n!r} samples from {len(y)}: the size must "
            f"be an integer between 1 and {len(y)}."
        )
    rng = numpy_rng(seed, "stratified_subset")
    classes, counts = np.unique(y, return_counts=True)
    quota = _apportion(counts, int(n), rng)
    chosen = [
        rng.choice(np.flatnonzero(y == c), size=int(q), replace=False)
        for c, q in zip(classes, quota)
        if q > 0
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _round_matrix(weights: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Per-client class quotas: row k proportional to ``weights[k]``, summing to ``size``.

    Each entry is the floor or ceiling of its exact share ``size*w/sum(w)``
    (rows sum exactly to ``size``), and each column sum is at most the ceiling
    of the column's exact sum, so that the clients together never ask for more
    samples of a class than the exact shares add up to. This is controlled
    rounding: a greedy largest-remainder assignment of the round-ups, repaired
    by augmenting paths (a bipartite max flow, which always succeeds because
    the exact fractional shares are a feasible fractional flow).
    """
    k, c = weights.shape
    w = weights.astype(np.int64)
    row = w.sum(axis=1)
    num = size * w
    floor = num // row[:, None]
    rem = num % row[:, None]
    need = size - floor.sum(axis=1)  # round-ups each row needs (an integer)
    allowed = rem > 0
    cap = np.zeros(c, dtype=np.int64)
    for j in range(c):
        total = sum((Fraction(int(rem[i, j]), int(row[i])) for i in np.flatnonzero(allowed[:, j])), Fraction(0))
        cap[j] = math.ceil(total)
    up = np.zeros((k, c), dtype=bool)
    frac = rem / row[:, None]
    cells = np.argwhere(allowed)
    order = np.lexsort((rng.random(len(cells)), -frac[allowed]))  # argwhere and mask agree on order
    left = need.copy()
    for i, j in cells[order]:
        if left[i] > 0 and cap[j] > 0:
            up[i, j] = True
            left[i] -= 1
            cap[j] -= 1
    for start in np.flatnonzero(left > 0):
        while left[start] > 0:
            # BFS from client `start` over (client -> class not yet rounded up) and
            # (full class -> client rounded up there) edges to a class with spare capacity.
            parent_col: dict[int, int] = {}  # class -> client it was reached from
            parent_row: dict[int, int] = {start: -1}  # client -> class it was reached from
            queue = deque([start])
            end = -1
            while queue and end < 0:
                i = queue.popleft()
                for j in np.flatnonzero(allowed[i] & ~up[i]):
                    j = int(j)
                    if j in parent_col:
                        continue
                    parent_col[j] = i
                    if cap[j] > 0:
                        end = j
                        break
                    for i2 in np.flatnonzero(up[:, j]):
                        i2 = int(i2)
                        if i2 not in parent_row:
                            parent_row[i2] = j
                            queue.append(i2)
            if end < 0:  # impossible by the max-flow argument above
                raise RuntimeError("validation quota rounding found no augmenting path (a bug)")
            cap[end] -= 1
            left[start] -= 1
            j = end
            while True:
                i = parent_col[j]
                up[i, j] = True
                prev = parent_row[i]
                if prev < 0:
                    break
                up[i, prev] = False
                j = prev
    return floor + up


def validation_splits(
    parts: list[np.ndarray],
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    size: int | None,
    seed: int,
) -> list[np.ndarray]:
    """For each client, ``size`` test-set indices with the class mix of its training part.

    ``size`` defaults to ``len(test_labels) // len(parts)``. Client k's class
    counts are the largest-remainder rounding of ``size`` times its training
    class proportions (classes absent from the test set are left out), rounded
    jointly across clients so the clients never ask for more of a class than
    their exact shares add up to. Samples are drawn from a seeded permutation
    of each class: client 0 takes the first ones, client 1 the next, and so on,
    so the splits are disjoint whenever the test set has enough of every class
    (always the case for equal-size parts of a balanced set with the default
    size). When a class runs out, the rest of that client's quota is drawn
    from the class's samples already given to earlier clients (overlap
    between clients, never within a client); only a client asking for more
    samples of a class than the test set has gets repeats.
    Returns sorted int64 index arrays into the test set.
    """
    y_train = _check_labels(train_labels, "training labels")
    y_test = _check_labels(test_labels, "test labels")
    k = len(parts)
    if k < 1:
        raise ConfigError("validation_splits needs at least one client part.")
    for y, what in ((y_train, "training"), (y_test, "test")):
        if y.size and y.max() >= num_classes:
            raise DataError(
                f"the {what} labels contain {int(y.max())}, but num_classes is {num_classes}."
            )
    if size is None:
        size = len(y_test) // k
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 1 <= size <= len(y_test):
        raise ConfigError(
            f"validation size {size!r} per client is invalid: it must be an integer between 1 "
            f"and the test set size {len(y_test)} (with {k} clients the default is "
            f"{len(y_test) // k})."
        )
    size = int(size)
    test_counts = np.bincount(y_test, minlength=num_classes)
    weights = np.zeros((k, num_classes), dtype=np.int64)
    for i, part in enumerate(parts):
        idx = np.asarray(part, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(y_train)):
            raise DataError(
                f"client {i}'s part has index {int(idx.max() if idx.max() >= len(y_train) else idx.min())}, "
                f"outside the training set of {len(y_train)} samples."
            )
        weights[i] = np.bincount(y_train[idx], minlength=num_classes) * (test_counts > 0)
        if weights[i].sum() == 0:
            raise DataError(
                f"client {i} has no training samples of any class present in the test set "
                "(or an empty part), so it cannot get a validation split with its class mix."
            )
    rng = numpy_rng(seed, "validation")
    quotas = _round_matrix(weights, size, rng)
    pools = [rng.permutation(np.flatnonzero(y_test == c)) for c in range(num_classes)]
    used = np.zeros(num_classes, dtype=np.int64)
    splits = []
    for i in range(k):
        chosen = []
        for c in np.flatnonzero(quotas[i]):
            q, pool, start = int(quotas[i, c]), pools[c], int(used[c])
            fresh = pool[start:start + q]
            used[c] = min(start + q, len(pool))
            rest = q - len(fresh)
            if rest:
                earlier = pool[:start]
                if rest <= len(earlier):
                    extra = rng.choice(earlier, size=rest, replace=False)
                else:
                    extra = np.concatenate([earlier, rng.choice(pool, size=rest - len(earlier))])
                fresh = np.concatenate([fresh, extra])
            chosen.append(fresh)
        splits.append(np.sort(np.concatenate(chosen)).astype(np.int64))
    return splits


def label_table(parts: list[np.ndarray], labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Class counts per client: an int64 array ``[K, num_classes]``."""
    y = _check_labels(labels)
    if y.size and y.max() >= num_classes:
        raise DataError(f"the labels contain {int(y.max())}, but num_classes is {num_classes}.")
    table = np.zeros((len(parts), num_classes), dtype=np.int64)
    for i, part in enumerate(parts):
        table[i] = np.bincount(y[np.asarray(part, dtype=np.int64)], minlength=num_classes)
    return table


def format_label_table(table: np.ndarray, classes: list[str] | None = None) -> str:
    """A plain-text table: one row per client, one column per class, totals last."""
    t = np.asarray(table)
    if t.ndim != 2:
        raise DataError(f"a label table must be 2-D [clients, classes], got shape {t.shape}.")
    k, c = t.shape
    names = list(classes) if classes is not None else [str(j) for j in range(c)]
    if len(names) != c:
        raise DataError(f"{len(names)} class names given for a table with {c} classes.")
    header = ["client", *names, "total"]
    rows = [[str(i), *(str(int(v)) for v in t[i]), str(int(t[i].sum()))] for i in range(k)]
    rows.append(["total", *(str(int(v)) for v in t.sum(axis=0)), str(int(t.sum()))])
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(s.rjust(w) for s, w in zip(cells[1:], widths[1:]))]).rstrip()

    return "\n".join(line(r) for r in [header, *rows])
