"""Partitions, stratified subsets and validation splits: hand-checked cases and real labels."""

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from fedmutual.data import (
    format_label_table,
    label_table,
    parse_partition,
    partition,
    stratified_subset,
    validation_splits,
)
from fedmutual.data.idx import read_idx
from fedmutual.errors import ConfigError, DataError

FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def fashion_labels():
    return (read_idx(FASHION / "train-labels-idx1-ubyte.gz").astype(np.int64),
            read_idx(FASHION / "t10k-labels-idx1-ubyte.gz").astype(np.int64))


def _exactly_once(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n
    assert np.array_equal(np.sort(allidx), np.arange(n))
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0)  # sorted, no repeats


# --- parse_partition ---------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    ("iid", ("iid", None)),
    (" IID ", ("iid", None)),
    ("shards:2", ("shards", 2)),
    ("Shards:10", ("shards", 10)),
    ("dirichlet:0.5", ("dirichlet", 0.5)),
    ("dirichlet:1e-2", ("dirichlet", 0.01)),
    ("dirichlet:100", ("dirichlet", 100.0)),
])
def test_parse_valid(spec, expected):
    assert parse_partition(spec) == expected


@pytest.mark.parametrize("spec, fragment", [
    ("shards", "unknown partition 'shards'"),
    ("shards:0", "partition 'shards:0': the number of shards per client must be an integer >= 1"),
    ("shards:1.5", "partition 'shards:1.5': the number of shards per client must be an integer >= 1"),
    ("shards:-2", "must be an integer >= 1"),
    ("dirichlet:0", "partition 'dirichlet:0': the Dirichlet concentration must be a finite number > 0"),
    ("dirichlet:-1", "must be a finite number > 0"),
    ("dirichlet:inf", "must be a finite number > 0"),
    ("dirichlet:abc", "must be a finite number > 0"),
    ("noniid", "unknown partition 'noniid'"),
    ("", "unknown partition ''"),
])
def test_parse_invalid_names_the_allowed_forms(spec, fragment):
    with pytest.raises(ConfigError) as e:
        parse_partition(spec)
    assert fragment in str(e.value)
    assert "'iid', 'shards:P' (P shards per client, an integer >= 1, e.g. 'shards:2') or 'dirichlet:A'" in str(e.value)


# --- partition: small hand-checkable cases ------------------------------------

def test_iid_sizes_and_coverage():
    labels = np.zeros(10, dtype=np.int64)
    parts = partition(labels, "iid", 3, seed=0)
    assert [len(p) for p in parts] == [4, 3, 3]
    _exactly_once(parts, 10)


def test_shards_hand_checked():
    labels = np.array([2, 0, 1, 0, 2, 1, 1, 0, 2, 0, 1, 2])  # four of each class
    parts = partition(labels, "shards:2", 3, seed=0)
    _exactly_once(parts, 12)
    for p in parts:
        assert len(p) == 4
        # two shards of 2 samples; sorted by label, every shard is one class
        counts = np.bincount(labels[p], minlength=3)
        assert sorted(counts.tolist()) in ([0, 2, 2], [0, 0, 4])


def test_shards_spread_the_remainder_over_the_first_shards():
    labels = np.arange(13) % 3
    parts = partition(labels, "shards:2", 2, seed=5)  # 4 shards of sizes 4, 3, 3, 3
    _exactly_once(parts, 13)
    assert sorted(len(p) for p in parts) == [6, 7]


def test_shards_need_enough_samples():
    with pytest.raises(ConfigError) as e:
        partition(np.zeros(9, dtype=np.int64), "shards:2", 5, seed=0)
    assert ("partition 'shards:2' with 5 clients needs 10 shards, but there are only 9 training "
            "samples (each shard needs at least one)") in str(e.value)


@pytest.mark.parametrize("k", [0, -1, 11])
def test_invalid_number_of_clients(k):
    with pytest.raises(ConfigError, match=f"cannot split 10 training samples among {k} clients: the number of "
                                          "clients must be between 1 and 10"):
        partition(np.zeros(10, dtype=np.int64), "iid", k, seed=0)


def test_one_client_gets_everything():
    labels = np.arange(7) % 2
    for spec in ("iid", "shards:3", "dirichlet:0.1"):
        assert partition(labels, spec, 1, seed=0)[0].tolist() == list(range(7))


def test_labels_must_be_integers():
    with pytest.raises(DataError, match="training labels must be a 1-D array of integer class indices, got float64"):
        partition(np.zeros(10), "iid", 2, seed=0)


def test_dirichlet_gives_up_with_an_explanation():
    labels = np.zeros(20, dtype=np.int64)  # one class: each draw sends nearly all of it to one client
    with pytest.raises(DataError) as e:
        partition(labels, "dirichlet:0.001", 10, seed=0)
    msg = str(e.value)
    assert "dirichlet:0.001 could not give each of the 10 clients at least 2 samples in 100 seeded draws" in msg
    assert "(the smallest client got 0; 20 samples, 1 classes)" in msg
    assert "Use fewer clients, a larger concentration A" in msg


@pytest.mark.parametrize("spec", ["iid", "shards:2", "dirichlet:0.5"])
def test_seeded(spec):
    labels = np.arange(300) % 10
    a = partition(labels, spec, 6, seed=1)
    b = partition(labels, spec, 6, seed=1)
    c = partition(labels, spec, 6, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    _exactly_once(a, 300)


# --- partition: the real Fashion-MNIST labels --------------------------------

def test_fashion_iid(fashion_labels):
    y, _ = fashion_labels
    parts = partition(y, "iid", 5, seed=0)
    _exactly_once(parts, 60000)
    assert [len(p) for p in parts] == [12000] * 5
    table = label_table(parts, y, 10)
    assert table.sum(axis=0).tolist() == [6000] * 10
    assert table.min() > 1000 and table.max() < 1400  # about 1200 each


def test_fashion_shards_two_classes_per_client(fashion_labels):
    y, _ = fashion_labels
    for seed in (0, 1, 2):
        parts = partition(y, "shards:2", 5, seed=seed)
        _exactly_once(parts, 60000)
        table = label_table(parts, y, 10)
        # 10 shards of 6000 = one whole class each; a client holds two shards
        assert set(np.unique(table).tolist()) <= {0, 6000, 12000}
        assert ((table > 0).sum(axis=1) <= 2).all()
        assert table.sum(axis=1).tolist() == [12000] * 5


def test_fashion_shards_mcmahan_setting(fashion_labels):
    y, _ = fashion_labels
    parts = partition(y, "shards:2", 100, seed=0)  # 200 shards of 300
    _exactly_once(parts, 60000)
    assert [len(p) for p in parts] == [600] * 100
    assert ((label_table(parts, y, 10) > 0).sum(axis=1) <= 2).all()


def _mean_max_share(parts, y):
    t = label_table(parts, y, 10)
    return float((t.max(axis=1) / t.sum(axis=1)).mean())


def test_fashion_dirichlet_concentration(fashion_labels):
    y, _ = fashion_labels
    skewed = partition(y, "dirichlet:0.1", 10, seed=0)
    flat = partition(y, "dirichlet:100", 10, seed=0)
    for parts in (skewed, flat):
        _exactly_once(parts, 60000)
        assert min(len(p) for p in parts) >= 10
    assert _mean_max_share(skewed, y) > 0.5
    assert _mean_max_share(flat, y) < 0.15
    near_uniform = label_table(partition(y, "dirichlet:1000", 10, seed=0), y, 10)
    shares = near_uniform / near_uniform.sum(axis=1, keepdims=True)
    assert np.abs(shares - 0.1).max() < 0.02


# --- stratified_subset -------------------------------------------------------

def test_stratified_subset_hand_checked():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    s = stratified_subset(labels, 10, seed=0)
    assert np.bincount(labels[s]).tolist() == [5, 3, 2]
    # 7 * (.5, .3, .2) = 3.5, 2.1, 1.4 -> floors 3, 2, 1, the spare one to the largest remainder
    s = stratified_subset(labels, 7, seed=0)
    assert np.bincount(labels[s]).tolist() == [4, 2, 1]
    assert s.dtype == np.int64 and np.all(np.diff(s) > 0)
    assert stratified_subset(labels, 100, seed=3).tolist() == list(range(100))


def test_stratified_subset_is_seeded():
    labels = np.arange(1000) % 4
    assert np.array_equal(stratified_subset(labels, 100, 1), stratified_subset(labels, 100, 1))
    assert not np.array_equal(stratified_subset(labels, 100, 1), stratified_subset(labels, 100, 2))


@pytest.mark.parametrize("n", [0, 101, -3])
def test_stratified_subset_size_limits(n):
    with pytest.raises(ConfigError, match=f"stratified subset of {n} samples from 100: the size must be an integer between 1 and 100"):
        stratified_subset(np.arange(100) % 3, n, seed=0)


def test_stratified_subset_fashion(fashion_labels):
    y, t = fashion_labels
    assert np.bincount(y[stratified_subset(y, 5000, 0)]).tolist() == [500] * 10
    assert np.bincount(t[stratified_subset(t, 2000, 0)]).tolist() == [200] * 10


# --- validation_splits ---------------------------------------------------------

def test_validation_hand_checked():
    train = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    test = np.array([0] * 10 + [1] * 10)
    parts = [np.array([0, 1, 2, 3]), np.array([4, 5, 6, 7])]  # 3:1 and 1:3
    val = validation_splits(parts, train, test, 2, 8, seed=0)
    assert [np.bincount(test[v], minlength=2).tolist() for v in val] == [[6, 2], [2, 6]]
    assert len(np.intersect1d(val[0], val[1])) == 0
    assert val[0].dtype == np.int64 and np.all(np.diff(val[0]) > 0)


def test_validation_default_size_and_seeding():
    train = np.arange(40) % 4
    test = np.arange(21) % 4
    parts = partition(train, "iid", 4, seed=0)
    val = validation_splits(parts, train, test, 4, None, seed=3)
    assert [len(v) for v in val] == [5] * 4
    again = validation_splits(parts, train, test, 4, None, seed=3)
    other = validation_splits(parts, train, test, 4, None, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(val, again))
    assert not all(np.array_equal(a, b) for a, b in zip(val, other))


def test_validation_overlap_when_a_class_runs_out():
    train = np.zeros(6, dtype=np.int64)
    test = np.zeros(10, dtype=np.int64)
    parts = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5])]
    val = validation_splits(parts, train, test, 1, 5, seed=0)
    assert all(len(np.unique(v)) == 5 for v in val)  # never a repeat within a client
    assert len(np.intersect1d(val[0], val[1])) == 0
    assert np.array_equal(np.union1d(val[0], val[1]), np.arange(10))
    assert len(np.unique(np.concatenate(val))) == 10


def test_validation_repeats_only_when_the_class_is_too_small():
    train = np.array([0, 0, 1, 1])
    test = np.array([0, 0, 1, 1, 1, 1, 1, 1])
    val = validation_splits([np.array([0, 1]), np.array([2, 3])], train, test, 2, 5, seed=0)
    assert len(val[0]) == 5 and set(val[0].tolist()) == {0, 1}  # only two class-0 test samples
    assert set(val[1].tolist()) <= {2, 3, 4, 5, 6, 7} and len(np.unique(val[1])) == 5


def test_validation_ignores_classes_missing_from_the_test_set():
    train = np.array([0, 1, 2, 2])
    test = np.array([0, 1, 0, 1])
    val = validation_splits([np.arange(4)], train, test, 3, 4, seed=0)
    assert val[0].tolist() == [0, 1, 2, 3]
    with pytest.raises(DataError, match="client 1 has no training samples of any class present in the test set"):
        validation_splits([np.array([0]), np.array([2, 3])], train, test, 3, 2, seed=0)


def test_validation_size_limits():
    train = np.arange(10) % 2
    test = np.arange(6) % 2
    with pytest.raises(ConfigError, match="validation size 7 per client is invalid: it must be an integer between 1 "
                                          "and the test set size 6 \\(with 2 clients the default is 3\\)"):
        validation_splits([np.arange(5), np.arange(5, 10)], train, test, 2, 7, seed=0)


@pytest.mark.parametrize("seed", range(5))
def test_validation_rounding_keeps_rows_exact_and_columns_within_their_share(seed):
    rng = np.random.default_rng(seed)
    train = rng.integers(0, 6, 700)
    test = np.repeat(np.arange(6), 40)
    parts = partition(train, "dirichlet:0.7", 7, seed=seed)
    size = 33
    val = validation_splits(parts, train, test, 6, size, seed=seed)
    t_train = label_table(parts, train, 6)
    t_val = label_table(val, test, 6)
    assert t_val.sum(axis=1).tolist() == [size] * 7
    exact = [[Fraction(size * int(a), int(row.sum())) for a in row] for row in t_train]
    for i in range(7):
        for c in range(6):
            assert math.floor(exact[i][c]) <= t_val[i, c] <= math.ceil(exact[i][c])
    for c in range(6):
        assert t_val[:, c].sum() <= math.ceil(sum(exact[i][c] for i in range(7)))


def test_validation_rounding_repairs_a_greedy_dead_end():
    """Three clients, each half of two classes, one test sample per class, size 1.

    Rounding each client on its own can give two clients the same class (an
    overlap); the joint rounding must give each client a different class
    from its own two. For about a third of these seeds the first greedy pass
    paints itself into a corner and the augmenting-path repair is needed.
    """
    train = np.array([0, 1, 0, 2, 1, 2])
    test = np.array([0, 1, 2])
    parts = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5])]
    for seed in range(30):
        val = validation_splits(parts, train, test, 3, 1, seed=seed)
        assert sorted(np.concatenate(val).tolist()) == [0, 1, 2]
        for part, v in zip(parts, val):
            assert test[v[0]] in train[part]


@pytest.mark.parametrize("spec", ["iid", "shards:2"])
def test_fashion_validation_splits_are_disjoint_with_matching_mix(fashion_labels, spec):
    y, t = fashion_labels
    parts = partition(y, spec, 5, seed=0)
    val = validation_splits(parts, y, t, 10, None, seed=0)
    assert [len(v) for v in val] == [2000] * 5
    allv = np.concatenate(val)
    assert len(np.unique(allv)) == 10000  # disjoint, and together the whole test set
    t_train = label_table(parts, y, 10)
    t_val = label_table(val, t, 10)
    ideal = 2000 * t_train / t_train.sum(axis=1, keepdims=True)
    assert np.abs(t_val - ideal).max() < 1
    if spec == "shards:2":
        assert set(np.unique(t_val).tolist()) <= {0, 1000, 2000}


def test_fashion_validation_dirichlet_mix(fashion_labels):
    y, t = fashion_labels
    parts = partition(y, "dirichlet:0.3", 20, seed=4)
    val = validation_splits(parts, y, t, 10, 300, seed=4)
    t_train = label_table(parts, y, 10)
    t_val = label_table(val, t, 10)
    ideal = 300 * t_train / t_train.sum(axis=1, keepdims=True)
    assert np.abs(t_val - ideal).max() < 1
    assert all(len(np.unique(v)) == 300 for v in val)


# --- label tables --------------------------------------------------------------

def test_label_table_and_its_text():
    labels = np.array([0, 1, 1, 2, 2, 2])
    parts = [np.array([0, 1]), np.array([2, 3, 4, 5])]
    table = label_table(parts, labels, 4)
    assert table.tolist() == [[1, 1, 0, 0], [0, 1, 3, 0]]
    assert format_label_table(table) == (
        "client  0  1  2  3  total\n"
        "0       1  1  0  0      2\n"
        "1       0  1  3  0      4\n"
        "total   1  2  3  0      6"
    )
    assert format_label_table(table, ["cat", "dog", "Ankle boot", "x"]).splitlines()[0] == (
        "client  cat  dog  Ankle boot  x  total"
    )


def test_label_table_rejects_labels_beyond_num_classes():
    with pytest.raises(DataError, match="the labels contain 5, but num_classes is 3"):
        label_table([np.array([0])], np.array([0, 5]), 3)
    with pytest.raises(DataError, match="2 class names given for a table with 3 classes"):
        format_label_table(np.zeros((2, 3), dtype=np.int64), ["a", "b"])
