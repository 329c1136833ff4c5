import numpy as np
import pytest
import torch

from fedmutual.data.folds import RoundData, stratified_split
from fedmutual.errors import ConfigError
from fedmutual.seeding import numpy_rng

# unequal classes: 300, 120, 60, 20 samples
LABELS = np.repeat(np.arange(4), [300, 120, 60, 20])


def _clients(k=3, seed=0):
    """Clients holding a shuffled share of LABELS; x records each sample's pool position."""
    perm = np.random.default_rng(seed).permutation(len(LABELS))
    parts = np.array_split(perm, k)
    return [(torch.from_numpy(p).float()[:, None], torch.from_numpy(LABELS[p])) for p in parts]


def _ids(x: torch.Tensor) -> set[int]:
    return set(x[:, 0].long().tolist())


def _assert_stratified(labels, idx, size):
    assert len(idx) == size
    for c, n_c in zip(*np.unique(labels, return_counts=True)):
        assert abs(int((labels[idx] == c).sum()) - n_c * size / len(labels)) <= 1.5, (c, size)


def test_stratified_split_disjoint_sized_and_stratified():
    pieces = stratified_split(LABELS, [125, 125, 100, 50], numpy_rng(0, "t"))
    assert [len(p) for p in pieces] == [125, 125, 100, 50]
    assert len(set(np.concatenate(pieces).tolist())) == 400  # disjoint
    for p, size in zip(pieces, [125, 125, 100, 50]):
        _assert_stratified(LABELS, p, size)
    with pytest.raises(ConfigError, match="cannot cut pieces"):
        stratified_split(LABELS, [400, 101], numpy_rng(0, "t"))


def test_dynamic_folds_are_fresh_disjoint_and_stratified_every_round():
    clients = _clients()
    rd = RoundData(clients, seed=0, folds=True, dynamic=True, public_size=None, carve=True)
    assert rd.public_size == 500 // 4 and rd.fold_size == (500 - 125) // 3
    seen_public = []
    for t in range(4):
        px, py = rd.public_set(t)
        public = _ids(px)
        folds = [_ids(rd.local(k, t)[0]) for k in range(3)]
        every = [public, *folds]
        assert sum(len(s) for s in every) == len(set().union(*every)) == 125 + 3 * 125  # pairwise disjoint
        _assert_stratified(LABELS, np.array(sorted(public)), 125)
        for f in folds:
            _assert_stratified(LABELS, np.array(sorted(f)), 125)
        assert torch.equal(py, torch.from_numpy(LABELS[px[:, 0].long().numpy()]))  # labels travel with their samples
        seen_public.append(public)
        assert _ids(rd.public_set(t)[0]) == public  # asked again: the same split
    assert all(a != b for i, a in enumerate(seen_public) for b in seen_public[i + 1:])  # fresh each round
    again = RoundData(clients, seed=0, folds=True, dynamic=True, public_size=None, carve=True)
    assert _ids(again.public_set(2)[0]) == seen_public[2]  # a function of the seed and t
    other = RoundData(clients, seed=1, folds=True, dynamic=True, public_size=None, carve=True)
    assert _ids(other.public_set(2)[0]) != seen_public[2]


def test_static_public_set_with_fresh_local_folds():
    rd = RoundData(_clients(), seed=0, folds=True, dynamic=False, public_size=100, carve=True)
    public = _ids(rd.public_set(0)[0])
    assert len(public) == 100 and rd.fold_size == 400 // 3
    fold0 = []
    for t in range(3):
        assert _ids(rd.public_set(t)[0]) == public
        folds = [_ids(rd.local(k, t)[0]) for k in range(3)]
        assert all(not (f & public) for f in folds) and not (folds[0] & folds[1])
        fold0.append(folds[0])
    assert fold0[0] != fold0[1] != fold0[2]


def test_partition_mode_drops_the_rounds_public_samples_from_each_client():
    clients = _clients()
    rd = RoundData(clients, seed=0, folds=False, dynamic=True, public_size=60, carve=True)
    for t in range(2):
        public = _ids(rd.public_set(t)[0])
        for k, (x, _) in enumerate(clients):
            lx, ly = rd.local(k, t)
            assert _ids(lx) == _ids(x) - public
            assert torch.equal(ly, torch.from_numpy(LABELS[lx[:, 0].long().numpy()]))


def test_public_set_from_a_second_dataset_leaves_the_pool_to_the_clients():
    ext_x = torch.arange(1000, 1300).float()[:, None]
    ext_y = torch.from_numpy(np.repeat(np.arange(3), 100))
    rd = RoundData(_clients(), seed=0, folds=True, dynamic=True, public_size=90, carve=True, external=(ext_x, ext_y))
    px, py = rd.public_set(0)
    assert len(px) == 90 and min(_ids(px)) >= 1000 and torch.bincount(py).tolist() == [30, 30, 30]
    assert _ids(rd.public_set(1)[0]) != _ids(px)
    assert rd.fold_size == 500 // 3
    with pytest.raises(ConfigError, match="public.size: 301"):
        RoundData(_clients(), seed=0, folds=True, dynamic=True, public_size=301, carve=True, external=(ext_x, ext_y))
