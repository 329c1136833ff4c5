"""from_arrays and registered datasets: a user's own data, checked and standardized like the built-ins."""

import hashlib
import sys

import numpy as np
import pytest
import torch

from fedmutual.config import validate
from fedmutual.data import ArrayDataset, from_arrays, load_dataset, register_dataset, write_idx
from fedmutual.errors import ConfigError, DataError


def _arrays(n=30, m=10, shape=(5, 4), classes=3, seed=0, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    tx = rng.integers(0, 256, (n, *shape)).astype(dtype)
    vx = rng.integers(0, 256, (m, *shape)).astype(dtype)
    return tx, np.arange(n) % classes, vx, np.arange(m) % classes


def test_round_trip_matches_the_built_in_idx_loader(tmp_path):
    tx, ty, vx, vy = _arrays(shape=(6, 6), classes=4)
    d = tmp_path / "set"
    d.mkdir()
    write_idx(d / "train-images-idx3-ubyte", tx)
    write_idx(d / "train-labels-idx1-ubyte", ty.astype(np.uint8))
    write_idx(d / "t10k-images-idx3-ubyte", vx)
    write_idx(d / "t10k-labels-idx1-ubyte", vy.astype(np.uint8))
    ref = load_dataset("idx", d)
    ds = from_arrays(tx, ty, vx, vy, name="My_Set")
    assert ds.name == "my-set" and ds.input_shape == (1, 6, 6) == ref.input_shape and ds.num_classes == 4
    assert torch.equal(ds.train_x, ref.train_x) and torch.equal(ds.test_x, ref.test_x)
    assert torch.equal(ds.train_y, ref.train_y) and ds.train_y.dtype == torch.int64
    assert ds.mean == ref.mean and ds.std == ref.std and ds.classes is None


def test_per_channel_standardization_uses_training_statistics_only():
    rng = np.random.default_rng(1)
    tx = rng.normal([[[[1.0]], [[-5.0]]]], [[[[2.0]], [[0.5]]]], (40, 2, 3, 3)).astype(np.float32)
    vx = rng.normal(10.0, 1.0, (8, 2, 3, 3)).astype(np.float32)
    before = tx.copy()
    ds = from_arrays(torch.from_numpy(tx), torch.arange(40) % 2, vx, np.arange(8) % 2)
    assert np.array_equal(tx, before)  # the caller's arrays are not changed
    mean, std = tx.astype(np.float64).mean(axis=(0, 2, 3)), tx.astype(np.float64).std(axis=(0, 2, 3))
    assert np.allclose(ds.mean, mean) and np.allclose(ds.std, std)
    assert np.allclose(ds.train_x.mean(dim=(0, 2, 3)).numpy(), 0, atol=1e-5)
    expect = (vx - mean[None, :, None, None]) / std[None, :, None, None]
    assert np.allclose(ds.test_x.numpy(), expect, atol=1e-5)


def test_without_standardization_values_are_kept():
    tx, ty, vx, vy = _arrays(shape=(2, 3, 3))
    ds = from_arrays(tx, ty, vx, vy, standardize=False, classes=["a", "b", "c", "d"])
    assert torch.equal(ds.train_x, torch.from_numpy(tx.astype(np.float32)))
    assert ds.mean == (0.0, 0.0) and ds.std == (1.0, 1.0) and ds.input_shape == (2, 3, 3)
    assert ds.num_classes == 4 and ds.classes == ["a", "b", "c", "d"]  # a class may have no samples


def test_flat_samples_become_one_by_one_images():
    rng = np.random.default_rng(2)
    ds = from_arrays(rng.normal(size=(12, 7)), np.arange(12) % 2, rng.normal(size=(4, 7)), np.arange(4) % 2)
    assert ds.train_x.shape == (12, 1, 1, 7) and ds.input_shape == (1, 1, 7)


def test_source_names_the_arrays_by_their_fingerprint():
    tx, ty, vx, vy = _arrays()
    a = from_arrays(tx, ty, vx, vy)
    b = from_arrays(torch.from_numpy(tx), torch.from_numpy(ty), vx, vy, name="other")
    h = hashlib.sha256()
    for arr in (tx, ty, vx, vy):
        h.update(f"{arr.dtype.str}{tuple(arr.shape)};".encode())
        h.update(arr.tobytes())
    assert a.fingerprint == b.fingerprint == h.hexdigest()
    assert a.source == f"arrays (sha256 {a.fingerprint[:12]})"
    vy2 = vy.copy()
    vy2[0] = 2 if vy2[0] != 2 else 1
    assert from_arrays(tx, ty, vx, vy2).fingerprint != a.fingerprint
    assert from_arrays(tx, ty.astype(np.int32), vx, vy).fingerprint != a.fingerprint  # dtypes count


@pytest.mark.parametrize("change, error, fragment", [
    (dict(train_x=[[1, 2]]), ConfigError, "train_x must be a NumPy array or a torch tensor, got list"),
    (dict(test_y=(0, 1)), ConfigError, "test_y must be a NumPy array or a torch tensor, got tuple"),
    (dict(name="a:b"), ConfigError, "name 'a:b' is not a dataset name"),
    (dict(name=""), ConfigError, "name '' is not a dataset name"),
    (dict(standardize=1), ConfigError, "standardize must be True or False"),
    (dict(classes="abc"), ConfigError, "classes must be a list of class names"),
    (dict(classes=[0, 1, 2]), ConfigError, "classes must be a list of class names"),
    (dict(classes=["a", "b"]), DataError, "train_y contains the label 2, but 2 class names were given (labels 0..1)"),
    (dict(train_x=np.zeros((30, 5, 4), dtype=bool)), DataError, "train_x must hold real numbers (an integer or float dtype), got bool"),
    (dict(test_x=np.zeros((10, 5, 4), dtype=np.complex64)), DataError, "test_x must hold real numbers"),
    (dict(train_x=np.zeros((30, 1, 1, 5, 4))), DataError, "train_x has shape (30, 1, 1, 5, 4); expected images"),
    (dict(train_x=np.zeros(30)), DataError, "train_x has shape (30,)"),
    (dict(test_x=np.zeros((0, 5, 4)), test_y=np.zeros(0, dtype=np.int64)), DataError, "test_x is empty"),
    (dict(train_x=np.zeros((30, 0, 4))), DataError, "every sample dimension must be >= 1"),
    (dict(test_x=np.zeros((10, 4, 5))), DataError, "the training samples are (1, 5, 4) but the test samples are (1, 4, 5)"),
    (dict(train_y=np.zeros(30)), DataError, "train_y must be a 1-D array of integer class indices, got float64"),
    (dict(train_y=np.zeros((30, 1), dtype=np.int64)), DataError, "train_y must be a 1-D array of integer class indices"),
    (dict(train_y=np.zeros(29, dtype=np.int64)), DataError, "train_y has 29 labels but train_x has 30 samples"),
    (dict(test_y=np.full(10, -1)), DataError, "test_y contains the negative label -1"),
    (dict(train_x=np.full((30, 5, 4), np.nan)), DataError, "train_x contains NaN or infinite values"),
    (dict(test_x=np.full((10, 5, 4), np.inf, dtype=np.float32)), DataError, "test_x contains NaN or infinite values"),
])
def test_refusals(change, error, fragment):
    tx, ty, vx, vy = _arrays()
    args = {"train_x": tx, "train_y": ty, "test_x": vx, "test_y": vy, **change}
    with pytest.raises(error) as e:
        from_arrays(**args)
    assert fragment in str(e.value)


def test_a_registered_array_dataset_is_served_by_name_and_config():
    ds = from_arrays(*_arrays())
    assert register_dataset("My_Arrays", ds) is ds
    assert load_dataset("my-arrays") is ds
    assert validate({"dataset": "MY_ARRAYS"}).dataset == "my-arrays"
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("my-arrays", from_arrays(*_arrays(seed=1)))


def test_a_registered_loader_gets_the_data_dir_and_download_flag(tmp_path):
    calls = []

    def loader(data_dir, download):
        calls.append((data_dir, download))
        return from_arrays(*_arrays(), name="loaded")

    register_dataset("my-loader", loader)
    ds = load_dataset("my-loader", tmp_path, True)
    assert isinstance(ds, ArrayDataset) and ds.name == "loaded" and calls == [(str(tmp_path), True)]
    load_dataset("MY_LOADER")
    assert calls[-1] == (None, False)


def test_broken_loaders_and_unknown_names():
    register_dataset("returns-none", lambda d, dl: None)
    register_dataset("raises", lambda d, dl: 1 / 0)
    with pytest.raises(ConfigError, match="dataset 'returns-none': its loader returned a NoneType, not an ArrayDataset"):
        load_dataset("returns-none")
    with pytest.raises(DataError, match=r"dataset 'raises': its loader failed \(ZeroDivisionError"):
        load_dataset("raises")
    with pytest.raises(ConfigError, match="unknown dataset 'svhn'; expected one of: fashion-mnist, mnist, idx, cifar10, cifar100, "
                                          "returns-none, raises, or an import string"):
        load_dataset("svhn")
    with pytest.raises(ConfigError, match="dataset: unknown dataset 'svhn'; allowed: fashion-mnist, mnist, idx, cifar10, cifar100"):
        validate({"dataset": "svhn"})


def test_an_import_string_loader(tmp_path, monkeypatch):
    mod = f"fm_data_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{mod}.py").write_text(
        "import numpy as np\nfrom fedmutual.data import from_arrays\n\n"
        "def Load(data_dir, download):\n"
        "    return from_arrays(np.ones((4, 2, 2)), np.arange(4) % 2, np.ones((2, 2, 2)), np.arange(2), name='mine')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert validate({"dataset": f"{mod}:Load"}).dataset == f"{mod}:Load"
        ds = load_dataset(f"{mod}:Load")
        assert ds.name == "mine" and ds.train_x.shape == (4, 1, 2, 2)
        assert torch.equal(ds.train_x, torch.zeros(4, 1, 2, 2))  # a constant channel: scale 1, centred on 0
        with pytest.raises(ConfigError, match=f"dataset: dataset '{mod}:Nope': module '{mod}' has no attribute 'Nope'"):
            validate({"dataset": f"{mod}:Nope"})
    finally:
        sys.modules.pop(mod, None)
