"""load_dataset: the real Fashion-MNIST, discovery order, formats and broken sets."""

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmutual.data import DATASETS, cache_dir, candidate_dirs, load_dataset, write_idx
from fedmutual.data import datasets as datasets_module
from fedmutual.data.idx import read_idx
from fedmutual.errors import ConfigError, DataError

FASHION = Path("/usr/share/datasets/fashion-mnist")

NAMES = {
    "train images": "train-images-idx3-ubyte",
    "train labels": "train-labels-idx1-ubyte",
    "test images": "t10k-images-idx3-ubyte",
    "test labels": "t10k-labels-idx1-ubyte",
}


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No user data directory or cache leaks into the tests."""
    monkeypatch.delenv("FEDMUTUAL_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def make_idx_set(d: Path, n_train=12, n_test=5, gz=False, classes=10, shape=(4, 4), seed=0,
                 test_prefix="t10k", train_labels=None, test_labels=None) -> Path:
    """A small dataset in the MNIST file layout."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    tr_y = np.arange(n_train) % classes if train_labels is None else np.asarray(train_labels)
    te_y = np.arange(n_test) % classes if test_labels is None else np.asarray(test_labels)
    write_idx(d / f"train-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n_train, *shape), dtype=np.uint8), gzip=gz)
    write_idx(d / f"train-labels-idx1-ubyte{suffix}", tr_y.astype(np.uint8), gzip=gz)
    write_idx(d / f"{test_prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n_test, *shape), dtype=np.uint8), gzip=gz)
    write_idx(d / f"{test_prefix}-labels-idx1-ubyte{suffix}", te_y.astype(np.uint8), gzip=gz)
    return d


@pytest.fixture(scope="module")
def fashion():
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("FEDMUTUAL_DATA", raising=False)
        mp.setenv("XDG_CACHE_HOME", "/nonexistent-fedmutual-test-cache")
        return load_dataset("fashion-mnist")


def test_real_fashion_mnist(fashion):
    ds = fashion
    assert ds.name == "fashion-mnist"
    assert ds.source == str(FASHION)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.train_x.dtype == torch.float32
    assert ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_y.dtype == torch.int64 and ds.train_y.shape == (60000,)
    assert ds.num_classes == 10 and ds.input_shape == (1, 28, 28)
    assert ds.classes == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                          "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert int(ds.train_y[0]) == 9 and ds.classes[int(ds.train_y[0])] == "Ankle boot"
    assert ds.test_y[:5].tolist() == [9, 2, 1, 1, 6]
    assert torch.bincount(ds.train_y).tolist() == [6000] * 10
    assert abs(ds.train_x.double().mean().item()) < 1e-6
    assert abs(ds.train_x.double().std().item() - 1.0) < 1e-4


def test_fashion_standardization_uses_the_train_statistics(fashion):
    raw_train = read_idx(FASHION / "train-images-idx3-ubyte.gz").astype(np.float64)
    raw_test = read_idx(FASHION / "t10k-images-idx3-ubyte.gz").astype(np.float64)
    mean, std = raw_train.mean(), raw_train.std()
    assert fashion.mean == pytest.approx((mean,), rel=1e-12)
    assert fashion.std == pytest.approx((std,), rel=1e-12)
    assert mean == pytest.approx(72.9403522, abs=1e-6)
    # the test set is transformed with the train mean/std, so its mean is not 0
    assert fashion.test_x.double().mean().item() == pytest.approx((raw_test.mean() - mean) / std, abs=1e-6)
    assert float(fashion.train_x[7, 0, 14, 9]) == pytest.approx((raw_train[7, 14, 9] - mean) / std, abs=1e-5)


def test_candidate_dirs_order(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMUTUAL_DATA", str(tmp_path / "env"))
    assert candidate_dirs("Fashion-MNIST", tmp_path / "arg") == [
        tmp_path / "arg", tmp_path / "arg" / "fashion-mnist",
        tmp_path / "env", tmp_path / "env" / "fashion-mnist",
        Path("/usr/share/datasets/fashion-mnist"),
        tmp_path / "xdg-cache" / "fedmutual" / "fashion-mnist",
    ]
    monkeypatch.delenv("FEDMUTUAL_DATA")
    assert candidate_dirs("cifar10") == [tmp_path / "xdg-cache" / "fedmutual" / "cifar10"]
    assert candidate_dirs("mnist")[0] == Path("/usr/share/datasets/mnist")


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "fedmutual"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # ignored, as the XDG spec says
    assert cache_dir() == Path.home() / ".cache" / "fedmutual"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "fedmutual"


def test_unknown_name_lists_the_allowed_ones():
    assert DATASETS.names()[:5] == ["fashion-mnist", "mnist", "idx", "cifar10", "cifar100"]
    with pytest.raises(ConfigError, match="unknown dataset 'svhn'; expected one of: fashion-mnist, mnist, idx, cifar10, cifar100"):
        load_dataset("svhn")


def test_env_directory_wins_over_debian(tmp_path, monkeypatch):
    make_idx_set(tmp_path / "mine")
    monkeypatch.setenv("FEDMUTUAL_DATA", str(tmp_path / "mine"))
    ds = load_dataset("fashion-mnist")
    assert ds.source == str(tmp_path / "mine")
    assert len(ds.train_y) == 12 and len(ds.test_y) == 5


def test_env_subdirectory_named_after_the_dataset(tmp_path, monkeypatch):
    make_idx_set(tmp_path / "root" / "mnist")
    monkeypatch.setenv("FEDMUTUAL_DATA", str(tmp_path / "root"))
    ds = load_dataset("MNIST")
    assert ds.source == str(tmp_path / "root" / "mnist")
    assert ds.classes == [str(i) for i in range(10)]


def test_data_dir_wins_over_env(tmp_path, monkeypatch):
    make_idx_set(tmp_path / "arg", n_train=7)
    make_idx_set(tmp_path / "env", n_train=9)
    monkeypatch.setenv("FEDMUTUAL_DATA", str(tmp_path / "env"))
    assert len(load_dataset("idx", data_dir=tmp_path / "arg").train_y) == 7
    # an incomplete data_dir is passed over for the next complete directory
    (tmp_path / "arg" / "t10k-labels-idx1-ubyte").unlink()
    ds = load_dataset("idx", data_dir=tmp_path / "arg")
    assert ds.source == str(tmp_path / "env") and len(ds.train_y) == 9


def test_cache_directory_is_searched_last(tmp_path):
    make_idx_set(tmp_path / "xdg-cache" / "fedmutual" / "idx", n_train=8)
    ds = load_dataset("idx", data_dir=tmp_path / "empty")
    assert ds.source == str(tmp_path / "xdg-cache" / "fedmutual" / "idx")


def test_not_found_lists_every_directory_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(datasets_module.SYSTEM_DIRS, "fashion-mnist", tmp_path / "usr-share")
    (tmp_path / "arg").mkdir()
    make_idx_set(tmp_path / "env")
    (tmp_path / "env" / "t10k-images-idx3-ubyte").unlink()
    monkeypatch.setenv("FEDMUTUAL_DATA", str(tmp_path / "env"))
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist", data_dir=tmp_path / "arg")
    msg = str(e.value)
    for d in candidate_dirs("fashion-mnist", tmp_path / "arg"):
        assert f"  {d}  (" in msg
    assert len(candidate_dirs("fashion-mnist", tmp_path / "arg")) == 6
    assert f"{tmp_path / 'env'}  (no t10k-images*/test-images* file)" in msg
    assert f"{tmp_path / 'arg' / 'fashion-mnist'}  (does not exist)" in msg
    assert "sudo apt-get install dataset-fashion-mnist" in msg
    assert "fedmutual run --download" in msg
    assert "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/" in msg


def test_not_found_for_mnist_says_where_to_download_it(tmp_path, monkeypatch):
    monkeypatch.setitem(datasets_module.SYSTEM_DIRS, "mnist", tmp_path / "usr-share")
    with pytest.raises(DataError) as e:
        load_dataset("mnist", data_dir=tmp_path)
    msg = str(e.value)
    assert f"  {tmp_path}  (no train-images*, train-labels*, t10k-images*/test-images*, t10k-labels*/test-labels* file)" in msg
    assert "download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz" in msg
    assert "http://yann.lecun.com/exdb/mnist/" in msg
    assert "(fedmutual's --download fetches only fashion-mnist)" in msg


def test_not_found_for_cifar_says_how_to_extract_and_that_download_cannot_help(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", data_dir=tmp_path, download=True)
    msg = str(e.value)
    assert f"{tmp_path}  (no data_batch_1" in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in msg
    assert "(--download can fetch only: fashion-mnist.)" in msg


def test_gzipped_and_raw_files_give_the_same_data(tmp_path):
    make_idx_set(tmp_path / "raw", gz=False, seed=3)
    make_idx_set(tmp_path / "gz", gz=True, seed=3)
    a = load_dataset("idx", tmp_path / "raw")
    b = load_dataset("idx", tmp_path / "gz")
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)


def test_test_prefix_and_kaggle_style_names(tmp_path):
    d = make_idx_set(tmp_path / "d", test_prefix="test")
    (d / "train-images-idx3-ubyte").rename(d / "train-images.idx3-ubyte")
    ds = load_dataset("idx", d)
    assert len(ds.test_y) == 5 and ds.input_shape == (1, 4, 4)


def test_raw_file_is_used_over_its_gz_twin(tmp_path):
    d = make_idx_set(tmp_path / "d", seed=1)
    write_idx(d / "train-labels-idx1-ubyte.gz", np.zeros(12, dtype=np.uint8), gzip=True)
    ds = load_dataset("idx", d)
    assert ds.train_y.tolist() == [i % 10 for i in range(12)]


def test_ambiguous_files_are_an_error(tmp_path):
    d = make_idx_set(tmp_path / "d")
    shutil.copy(d / "train-images-idx3-ubyte", d / "train-images-idx3-ubyte (1)")
    with pytest.raises(DataError) as e:
        load_dataset("idx", d)
    assert f"{d} holds several train images files: train-images-idx3-ubyte, train-images-idx3-ubyte (1)" in str(e.value)


def test_truncated_file_names_the_file(tmp_path):
    d = make_idx_set(tmp_path / "d", gz=True)
    p = d / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(DataError) as e:
        load_dataset("idx", d)
    assert f"{p} is truncated" in str(e.value)


def test_wrong_magic_names_the_file(tmp_path):
    d = make_idx_set(tmp_path / "d")
    p = d / "train-labels-idx1-ubyte"
    p.write_bytes(b"\x01\x02" + p.read_bytes()[2:])
    with pytest.raises(DataError) as e:
        load_dataset("idx", d)
    assert f"{p} is not an IDX file: its magic number starts with bytes 0x01 0x02" in str(e.value)


def test_label_out_of_range_for_a_ten_class_dataset(tmp_path):
    labels = np.arange(12) % 10
    labels[4] = 10
    d = make_idx_set(tmp_path / "d", train_labels=labels)
    with pytest.raises(DataError) as e:
        load_dataset("mnist", d)
    assert f"{d / 'train-labels-idx1-ubyte'} contains the label 10, but mnist has 10 classes" in str(e.value)


def test_idx_class_count_comes_from_train_and_test_labels(tmp_path):
    d = make_idx_set(tmp_path / "d", train_labels=[0, 1, 2, 3, 0, 1], test_labels=[4, 0], n_train=6, n_test=2)
    ds = load_dataset("idx", d)
    assert ds.num_classes == 5 and ds.classes is None


def test_image_and_label_counts_must_match(tmp_path):
    d = make_idx_set(tmp_path / "d")
    write_idx(d / "t10k-labels-idx1-ubyte", np.zeros(4, dtype=np.uint8))
    with pytest.raises(DataError) as e:
        load_dataset("idx", d)
    assert "has 5 images but" in str(e.value) and "has 4 labels" in str(e.value)


def test_train_and_test_image_shapes_must_match(tmp_path):
    d = make_idx_set(tmp_path / "d")
    write_idx(d / "t10k-images-idx3-ubyte", np.zeros((5, 5, 5), dtype=np.uint8))
    with pytest.raises(DataError, match=r"are \(1, 4, 4\) but the test images in .* are \(1, 5, 5\)"):
        load_dataset("idx", d)


def test_channel_first_idx_images_are_standardized_per_channel(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3, 2, 2)).astype(np.float32) * np.array([1, 10, 100], np.float32)[:, None, None] + 5
    write_idx(d / "train-images", x)
    write_idx(d / "train-labels", np.arange(50, dtype=np.uint8) % 3)
    write_idx(d / "test-images", x[:4])
    write_idx(d / "test-labels", np.zeros(4, dtype=np.uint8))
    ds = load_dataset("idx", d)
    assert ds.input_shape == (3, 2, 2)
    per_channel = ds.train_x.transpose(0, 1).reshape(3, -1).double()
    assert torch.allclose(per_channel.mean(1), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(per_channel.std(1, unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-5)
    assert ds.std[2] / ds.std[0] == pytest.approx(100, rel=0.5)


def test_constant_images_map_to_zero(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    write_idx(d / "train-images", np.full((3, 2, 2), 7, np.uint8))
    write_idx(d / "train-labels", np.array([0, 1, 1], np.uint8))
    write_idx(d / "test-images", np.full((1, 2, 2), 9, np.uint8))
    write_idx(d / "test-labels", np.array([1], np.uint8))
    ds = load_dataset("idx", d)
    assert ds.mean == (7.0,) and ds.std == (1.0,)
    assert ds.train_x.abs().max().item() == 0.0
    assert ds.test_x.flatten().tolist() == [2.0] * 4
