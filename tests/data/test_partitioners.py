"""Registered and explicit partitions: user partitioners, the invariant check, and ``indices:PATH``."""

import json
import sys

import numpy as np
import pytest

from fedmutual.config import validate
from fedmutual.data import check_partition, parse_partition, partition, read_indices, register_partition
from fedmutual.errors import ConfigError
from fedmutual.seeding import numpy_rng


def by_label(labels, k, seed, arg):
    """Client c gets the samples whose label is c mod k, in a seeded order; ``arg`` caps each client."""
    cap = int(arg) if arg is not None else None
    rng = numpy_rng(seed, "by-label")
    return [rng.permutation(np.flatnonzero(labels % k == c))[:cap] for c in range(k)]


def test_a_registered_partitioner_gets_the_labels_clients_seed_and_argument_text():
    seen = []

    def spy(labels, k, seed, arg):
        seen.append((labels.dtype, len(labels), k, seed, arg))
        return np.array_split(np.arange(len(labels))[::-1], k)

    register_partition("Spy_Split", spy)
    labels = np.arange(10, dtype=np.uint8) % 3
    parts = partition(labels, "spy-split", 3, seed=7)
    assert [p.tolist() for p in parts] == [[6, 7, 8, 9], [3, 4, 5], [0, 1, 2]]  # sorted int64 copies
    assert all(p.dtype == np.int64 for p in parts)
    partition(labels, "SPY_SPLIT: Keep-Case:x ", 2, seed=1)
    assert seen == [(np.int64, 10, 3, 7, None), (np.int64, 10, 2, 1, "Keep-Case:x")]
    assert parse_partition("spy_split:A") == ("spy-split", "A")
    assert validate({"partition": "spy-split:3"}).partition == "spy-split:3"


def test_a_user_partitioner_is_seeded_through_its_argument():
    register_partition("by-label", by_label)
    labels = np.arange(60) % 4
    a = partition(labels, "by-label:5", 2, seed=0)
    assert a[0].size == 5 and np.all(labels[a[0]] % 2 == 0) and np.all(labels[a[1]] % 2 == 1)
    assert all(np.array_equal(x, y) for x, y in zip(a, partition(labels, "by-label:5", 2, seed=0)))
    assert not all(np.array_equal(x, y) for x, y in zip(a, partition(labels, "by-label:5", 2, seed=1)))


@pytest.mark.parametrize("result, fragment", [
    ([np.arange(5)], "1 index arrays for 2 clients; it must give one per client"),
    ("nope", "expected a list of index arrays, one per client, got str"),
    ({0: [1]}, "expected a list of index arrays, one per client, got dict"),
    ([np.arange(5), np.arange(4, 10)], "index 4 is given to clients 0, 1; a sample belongs to one client"),
    ([np.array([1, 1, 2]), np.arange(3, 10)], "client 0 gets index 1 more than once"),
    ([np.arange(5), np.arange(5, 11)], "client 1 gets index 10, outside the training set of 10 samples (indices 0..9)"),
    ([np.array([-1, 0]), np.arange(1, 10)], "client 0 gets index -1, outside the training set"),
    ([np.arange(10), np.array([], dtype=np.int64)], "client 1 gets no training samples; every client needs at least one"),
    ([np.arange(5.0), np.arange(5, 10)], "client 0's indices are float64; expected integer sample indices"),
    ([np.arange(5) > 2, np.arange(5, 10)], "client 0's indices are bool"),
    ([np.arange(6).reshape(2, 3), np.arange(6, 10)], "client 0's indices have shape (2, 3); expected a 1-D array"),
])
def test_every_partition_is_checked(result, fragment):
    register_partition("bad-split", lambda labels, k, seed, arg: result)
    with pytest.raises(ConfigError) as e:
        partition(np.zeros(10, dtype=np.int64), "bad-split", 2, seed=0)
    assert str(e.value).startswith("partition 'bad-split': ") and fragment in str(e.value)


def test_check_partition_accepts_lists_and_may_leave_samples_out():
    parts = check_partition([[4, 0], np.array([7], dtype=np.uint8)], 10, 2)
    assert [p.tolist() for p in parts] == [[0, 4], [7]] and parts[1].dtype == np.int64


def test_a_failing_partitioner_is_reported_plainly():
    register_partition("broken", lambda labels, k, seed, arg: int(arg))
    with pytest.raises(ConfigError, match=r"partition 'broken:x': the partitioner failed \(ValueError"):
        partition(np.zeros(10, dtype=np.int64), "broken:x", 2, seed=0)


def test_unknown_partitions_name_every_form():
    register_partition("by-label", by_label)
    with pytest.raises(ConfigError) as e:
        parse_partition("noniid:3")
    msg = str(e.value)
    assert msg.startswith("unknown partition 'noniid:3'; expected 'iid', 'shards:P'")
    assert "'indices:PATH'" in msg and "the registered 'by-label'" in msg and "an import string" in msg
    for spec in ("iid:3", "shards", "dirichlet"):  # built-in names with the wrong shape stay unknown
        with pytest.raises(ConfigError, match=f"unknown partition '{spec}'"):
            parse_partition(spec)


def test_an_import_string_partitioner_with_an_argument(tmp_path, monkeypatch):
    mod = f"fm_splits_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{mod}.py").write_text(
        "import numpy as np\n\ndef Halves(labels, k, seed, arg):\n"
        "    return np.array_split(np.arange(int(arg or len(labels))), k)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert parse_partition(f"{mod}:Halves:6") == (f"{mod}:Halves", "6")
        assert parse_partition(f"{mod}:Halves") == (f"{mod}:Halves", None)
        assert [p.tolist() for p in partition(np.zeros(10, dtype=np.int64), f"{mod}:Halves:6", 2, 0)] == [[0, 1, 2], [3, 4, 5]]
        assert validate({"partition": f"{mod}:Halves:6"}).partition == f"{mod}:Halves:6"
        with pytest.raises(ConfigError, match=f"module '{mod}' has no attribute 'Nope'"):
            parse_partition(f"{mod}:Nope")
    finally:
        sys.modules.pop(mod, None)


# --- indices:PATH ----------------------------------------------------------------------------

def test_indices_from_a_list_of_lists(tmp_path):
    f = tmp_path / "split.json"
    f.write_text(json.dumps([[5, 1], [0, 2, 3]]))
    assert parse_partition(f"indices:{f}") == ("indices", str(f))
    parts = partition(np.zeros(6, dtype=np.int64), f"indices:{f}", 2, seed=123)
    assert [p.tolist() for p in parts] == [[1, 5], [0, 2, 3]]
    assert validate({"partition": f"indices:{f}"}).partition == f"indices:{f}"


def test_indices_from_a_partition_record_prefer_the_assigned_shares(tmp_path):
    f = tmp_path / "partition.json"
    f.write_text(json.dumps({"train": [[0], [2]], "val": [[1], [3]], "assigned": [[0, 1], [2, 3]]}))
    assert [p.tolist() for p in read_indices(f)] == [[0, 1], [2, 3]]
    f.write_text(json.dumps({"train": [[0], [2]], "val": [[1], [3]]}))
    assert [p.tolist() for p in partition(np.zeros(4, dtype=np.int64), f"indices:{f}", 2, 0)] == [[0], [2]]


@pytest.mark.parametrize("content, fragment", [
    (None, "does not exist"),
    ("{not json", "cannot read"),
    (json.dumps({"sizes": [1, 2]}), "holds no per-client index lists"),
    (json.dumps([1, 2]), "holds no per-client index lists"),
    (json.dumps([[0, 1.0], [2]]), "client 0's entry in"),
    (json.dumps([[0, True], [2]]), "client 0's entry in"),
    (json.dumps([[0, 1], [2, 9]]), "client 1 gets index 9, outside the training set of 4 samples"),
    (json.dumps([[0, 1], [1, 2]]), "index 1 is given to clients 0, 1"),
    (json.dumps([[0, 1, 2, 3]]), "1 index arrays for 2 clients"),
])
def test_indices_refusals(tmp_path, content, fragment):
    f = tmp_path / "split.json"
    if content is not None:
        f.write_text(content)
    with pytest.raises(ConfigError) as e:
        partition(np.zeros(4, dtype=np.int64), f"indices:{f}", 2, seed=0)
    assert str(e.value).startswith(f"partition 'indices:{f}': ") and fragment in str(e.value)


def test_indices_needs_a_path():
    with pytest.raises(ConfigError, match="'indices:PATH' needs the path of a JSON file"):
        parse_partition("indices:")
    with pytest.raises(ConfigError, match="partition: partition 'indices': 'indices:PATH' needs"):
        validate({"partition": "indices"})
    with pytest.raises(ConfigError, match=r"partition 'indices:\S+missing.json': \S+missing.json does not exist"):
        read_indices("/nonexistent-fm/missing.json")
