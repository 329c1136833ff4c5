"""CIFAR python-format files: small real-format batches, and pickles that must be refused."""

import os
import pickle

import numpy as np
import pytest
import torch

from fedmutual.data import load_dataset
from fedmutual.data.cifar import load_cifar, read_cifar_batch
from fedmutual.errors import DataError

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _batch(rows: int, start: int, label_key: str = "labels", num_classes: int = 10) -> dict:
    data = ((np.arange(rows * 3072).reshape(rows, 3072) + start) % 251).astype(np.uint8)
    labels = [int((start + i) % num_classes) for i in range(rows)]
    return {b"batch_label": b"testing batch", label_key.encode(): labels, b"data": data,
            b"filenames": [f"img_{start + i}.png".encode() for i in range(rows)]}


def make_cifar10(root, subfolder=True):
    d = root / "cifar-10-batches-py" if subfolder else root
    d.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        _dump(d / f"data_batch_{i}", _batch(4, 10 * i))
    _dump(d / "test_batch", _batch(3, 100))
    _dump(d / "batches.meta", {b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072})
    return d


def test_cifar10_layout_and_values(tmp_path):
    make_cifar10(tmp_path)
    train_x, train_y, test_x, test_y, classes = load_cifar(tmp_path, "cifar10")
    assert train_x.shape == (20, 3, 32, 32) and train_x.dtype == np.uint8
    assert test_x.shape == (3, 3, 32, 32)
    assert train_y.dtype == np.int64
    assert train_y.tolist() == [(10 * i + r) % 10 for i in range(1, 6) for r in range(4)]
    assert test_y.tolist() == [0, 1, 2]
    assert classes == CIFAR10_NAMES
    first = _batch(4, 10)[b"data"]
    # a row is 1024 red, then 1024 green, then 1024 blue values, each row-major 32x32
    assert train_x[0, 1, 0, 0] == first[0, 1024]
    assert train_x[0, 2, 1, 3] == first[0, 2048 + 32 + 3]
    np.testing.assert_array_equal(train_x[3].reshape(-1), first[3])


def test_files_directly_in_the_directory(tmp_path):
    d = make_cifar10(tmp_path / "flat", subfolder=False)
    assert load_cifar(d, "cifar10")[0].shape == (20, 3, 32, 32)


def test_batch_keys_are_decoded_and_values_kept(tmp_path):
    d = make_cifar10(tmp_path)
    b = read_cifar_batch(d / "data_batch_1")
    assert set(b) == {"batch_label", "labels", "data", "filenames"}
    assert b["batch_label"] == b"testing batch"
    assert b["filenames"][0] == b"img_10.png"


def test_numpy1_global_names_are_accepted(tmp_path):
    # The official files were written by NumPy 1.x, which names numpy.core.multiarray.
    raw = pickle.dumps({b"data": np.arange(6, dtype=np.uint8)}, protocol=2)
    assert b"cnumpy._core.multiarray\n_reconstruct\n" in raw
    p = tmp_path / "old"
    p.write_bytes(raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))
    assert read_cifar_batch(p)["data"].tolist() == [0, 1, 2, 3, 4, 5]


def test_cifar100_fine_labels(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    train = _batch(6, 95, "fine_labels", 100)
    train[b"coarse_labels"] = [0] * 6
    _dump(d / "train", train)
    _dump(d / "test", _batch(2, 0, "fine_labels", 100))
    _dump(d / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                       b"coarse_label_names": [f"s{i}".encode() for i in range(20)]})
    train_x, train_y, test_x, test_y, classes = load_cifar(tmp_path, "cifar100")
    assert train_y.tolist() == [95, 96, 97, 98, 99, 0]
    assert test_y.tolist() == [0, 1]
    assert len(classes) == 100 and classes[99] == "c99"


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    d = make_cifar10(tmp_path)
    _dump(d / "data_batch_3", {b"data": np.zeros((1, 3072), np.uint8), b"labels": [_Evil(marker)]})
    with pytest.raises(DataError) as e:
        load_cifar(tmp_path, "cifar10")
    msg = str(e.value)
    assert f"{d / 'data_batch_3'}: the CIFAR loader refuses to load global {os.system.__module__}.system" in msg
    assert "Nothing from it was executed" in msg
    assert not marker.exists()


def test_builtins_eval_is_refused(tmp_path):
    p = tmp_path / "evil"
    p.write_bytes(b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.")
    with pytest.raises(DataError, match="refuses to load global builtins.eval"):
        read_cifar_batch(p)


def test_codecs_encode_only_for_latin1(tmp_path):
    p = tmp_path / "rot13"
    p.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(DataError) as e:
        read_cifar_batch(p)
    assert str(e.value).startswith(f"{p}: refuses to call _codecs.encode(str, 'rot13')")


def test_truncated_pickle(tmp_path):
    d = make_cifar10(tmp_path)
    raw = (d / "test_batch").read_bytes()
    (d / "test_batch").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="test_batch is not a readable CIFAR batch file .*truncated or corrupt"):
        load_cifar(tmp_path, "cifar10")


def test_missing_batches_are_named(tmp_path):
    d = make_cifar10(tmp_path)
    (d / "data_batch_4").unlink()
    (d / "batches.meta").unlink()
    with pytest.raises(DataError, match="lack the cifar10 file\\(s\\) data_batch_4, batches.meta"):
        load_cifar(tmp_path, "cifar10")


def test_wrong_data_shape_and_labels(tmp_path):
    d = make_cifar10(tmp_path)
    _dump(d / "data_batch_2", {b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]})
    with pytest.raises(DataError, match="'data' is a uint8 array of shape \\(2, 1024\\); expected a uint8 array of shape \\[N, 3072\\]"):
        load_cifar(tmp_path, "cifar10")
    _dump(d / "data_batch_2", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})
    with pytest.raises(DataError, match="contains the label 10; 'labels' must lie in 0..9"):
        load_cifar(tmp_path, "cifar10")
    _dump(d / "data_batch_2", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]})
    with pytest.raises(DataError, match="has 2 images but 1 'labels'"):
        load_cifar(tmp_path, "cifar10")


def test_load_dataset_cifar10_is_standardized_per_channel(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDMUTUAL_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    d = make_cifar10(tmp_path / "data")
    ds = load_dataset("CIFAR10", data_dir=tmp_path / "data")
    assert ds.name == "cifar10" and ds.source == str(d)
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10
    assert ds.classes == CIFAR10_NAMES
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.train_x.dtype == torch.float32
    per_channel = ds.train_x.transpose(0, 1).reshape(3, -1).double()
    assert torch.allclose(per_channel.mean(1), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(per_channel.std(1, unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-5)
    raw = load_cifar(d, "cifar10")[0].astype(np.float64)
    assert ds.mean == pytest.approx(tuple(raw[:, c].mean() for c in range(3)))
    assert ds.std == pytest.approx(tuple(raw[:, c].std() for c in range(3)))
