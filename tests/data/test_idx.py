"""IDX reading and writing: round trips, byte layout, and every kind of broken file."""

import gzip
from pathlib import Path

import numpy as np
import pytest

from fedmutual.data.idx import load_idx_pair, read_idx, write_idx
from fedmutual.errors import DataError

FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("compress", [False, True])
def test_round_trip_every_dtype(tmp_path, dtype, compress):
    a = (np.arange(2 * 3 * 4) - 7).astype(dtype).reshape(2, 3, 4)
    if dtype == np.uint8:
        a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4) * 10
    p = tmp_path / "a.idx"
    write_idx(p, a, gzip=compress)
    b = read_idx(p)
    assert b.dtype == np.dtype(dtype)
    assert b.shape == (2, 3, 4)
    np.testing.assert_array_equal(a, b)
    assert b.flags.writeable


def test_bytes_are_big_endian_with_the_documented_header(tmp_path):
    p = tmp_path / "a.idx"
    write_idx(p, np.array([1, 258], dtype=np.int32))
    assert p.read_bytes() == bytes.fromhex("00000c01 00000002 00000001 00000102".replace(" ", ""))


def test_gzip_is_recognised_by_its_header_not_by_the_name(tmp_path):
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    gz_named_raw = tmp_path / "plain-name"
    write_idx(gz_named_raw, a, gzip=True)
    assert gz_named_raw.read_bytes()[:2] == b"\x1f\x8b"
    raw_named_gz = tmp_path / "looks-compressed.gz"
    write_idx(raw_named_gz, a, gzip=False)
    np.testing.assert_array_equal(read_idx(gz_named_raw), a)
    np.testing.assert_array_equal(read_idx(raw_named_gz), a)


def test_multi_member_gzip_is_read_whole(tmp_path):
    raw = tmp_path / "a.idx"
    a = np.arange(100, dtype=np.uint8).reshape(10, 10)
    write_idx(raw, a)
    data = raw.read_bytes()
    p = tmp_path / "two-members.gz"
    p.write_bytes(gzip.compress(data[:37]) + gzip.compress(data[37:]))
    np.testing.assert_array_equal(read_idx(p), a)


def _write(tmp_path, name, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_truncated_payload_names_the_file_and_the_sizes(tmp_path):
    good = tmp_path / "good"
    write_idx(good, np.zeros((5, 4), dtype=np.uint8))
    p = _write(tmp_path, "cut-images", good.read_bytes()[:-3])
    with pytest.raises(DataError) as e:
        read_idx(p)
    msg = str(e.value)
    assert str(p) in msg
    assert "truncated" in msg
    assert "shape (5, 4) of uint8 (20 data bytes) but only 17 data bytes follow" in msg


def test_trailing_bytes_are_rejected(tmp_path):
    good = tmp_path / "good"
    write_idx(good, np.zeros(6, dtype=np.int16))
    p = _write(tmp_path, "long", good.read_bytes() + b"\x00\x01")
    with pytest.raises(DataError, match=r"has 2 trailing bytes after the data") as e:
        read_idx(p)
    assert str(p) in str(e.value)


def test_wrong_magic_is_rejected(tmp_path):
    p = _write(tmp_path, "notidx.png", b"\x89PNG\r\n\x1a\n" + bytes(40))
    with pytest.raises(DataError) as e:
        read_idx(p)
    assert f"{p} is not an IDX file: its magic number starts with bytes 0x89 0x50, expected 0x00 0x00" in str(e.value)


def test_undefined_type_code_is_rejected(tmp_path):
    p = _write(tmp_path, "badtype", bytes([0, 0, 0x0A, 1, 0, 0, 0, 1, 7]))
    with pytest.raises(DataError) as e:
        read_idx(p)
    assert f"{p} has IDX type code 0x0A, which is not one of the defined codes" in str(e.value)


def test_header_shorter_than_its_dimensions(tmp_path):
    p = _write(tmp_path, "shorthead", bytes([0, 0, 8, 3, 0, 0, 0, 1]))
    with pytest.raises(DataError, match=r"declares 3 dimensions \(16 header bytes\) but the file has only 8 bytes"):
        read_idx(p)


def test_empty_file(tmp_path):
    p = _write(tmp_path, "empty", b"")
    with pytest.raises(DataError, match="fewer than the 4-byte header"):
        read_idx(p)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope does not exist"):
        read_idx(tmp_path / "nope")


def test_truncated_gzip(tmp_path):
    good = tmp_path / "good.gz"
    write_idx(good, np.arange(4000, dtype=np.int32), gzip=True)
    p = _write(tmp_path, "cut.gz", good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(DataError) as e:
        read_idx(p)
    assert f"{p} is a truncated gzip file" in str(e.value)


def test_corrupt_gzip(tmp_path):
    good = tmp_path / "good.gz"
    write_idx(good, np.arange(4000, dtype=np.int32), gzip=True)
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p = _write(tmp_path, "flipped.gz", bytes(data))
    with pytest.raises(DataError) as e:
        read_idx(p)
    assert f"{p} is a corrupt gzip file" in str(e.value)


def test_garbage_after_the_gzip_stream(tmp_path):
    good = tmp_path / "good.gz"
    write_idx(good, np.arange(10, dtype=np.uint8), gzip=True)
    p = _write(tmp_path, "tail.gz", good.read_bytes() + b"junk")
    with pytest.raises(DataError, match="corrupt gzip file .*4 bytes of garbage"):
        read_idx(p)


def test_write_refuses_unsupported_dtypes(tmp_path):
    with pytest.raises(DataError, match="dtype int64 is not supported; use uint8, int8, int16, int32, float32 or float64"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64))


def test_pair_checks_counts(tmp_path):
    write_idx(tmp_path / "im", np.zeros((4, 2, 2), dtype=np.uint8))
    write_idx(tmp_path / "lb", np.array([0, 1, 2], dtype=np.uint8))
    with pytest.raises(DataError) as e:
        load_idx_pair(tmp_path / "im", tmp_path / "lb")
    assert f"{tmp_path / 'im'} has 4 images but {tmp_path / 'lb'} has 3 labels" in str(e.value)


def test_pair_returns_int64_labels(tmp_path):
    write_idx(tmp_path / "im", np.zeros((3, 2, 2), dtype=np.uint8))
    write_idx(tmp_path / "lb", np.array([2, 0, 1], dtype=np.uint8))
    x, y = load_idx_pair(tmp_path / "im", tmp_path / "lb")
    assert y.dtype == np.int64 and y.tolist() == [2, 0, 1]
    assert x.shape == (3, 2, 2)


def test_pair_rejects_swapped_files(tmp_path):
    write_idx(tmp_path / "im", np.zeros((3, 2, 2), dtype=np.uint8))
    write_idx(tmp_path / "lb", np.array([2, 0, 1], dtype=np.uint8))
    with pytest.raises(DataError, match="holds a 1-D array of shape \\(3,\\); an images file must be"):
        load_idx_pair(tmp_path / "lb", tmp_path / "im")


def test_pair_rejects_negative_and_float_labels(tmp_path):
    write_idx(tmp_path / "im", np.zeros((3, 2, 2), dtype=np.uint8))
    write_idx(tmp_path / "neg", np.array([0, -1, 1], dtype=np.int8))
    write_idx(tmp_path / "flt", np.array([0, 1, 1], dtype=np.float32))
    with pytest.raises(DataError, match="contains the negative label -1"):
        load_idx_pair(tmp_path / "im", tmp_path / "neg")
    with pytest.raises(DataError, match="holds float32 values; labels must be integers"):
        load_idx_pair(tmp_path / "im", tmp_path / "flt")


def test_real_fashion_mnist_labels():
    y = read_idx(FASHION / "train-labels-idx1-ubyte.gz")
    assert y.shape == (60000,) and y.dtype == np.uint8
    assert y[:6].tolist() == [9, 0, 0, 3, 0, 2]
    assert np.bincount(y).tolist() == [6000] * 10
    t = read_idx(FASHION / "t10k-labels-idx1-ubyte.gz")
    assert t[:5].tolist() == [9, 2, 1, 1, 6]
