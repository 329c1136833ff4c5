"""Reading and writing IDX files, the format of MNIST and Fashion-MNIST.

An IDX file is a 4-byte magic number ``0x00 0x00 <dtype code> <ndim>``, then
``ndim`` big-endian uint32 dimensions, then the values in big-endian C order.
Files may be gzip-compressed; compression is recognised by the gzip header
bytes ``0x1f 0x8b`` rather than by the file name, so a renamed file still
loads. Every check failure raises :class:`~fedmutual.errors.DataError` naming
the file and what was wrong, because a silently misread dataset would only
show up much later as a mysteriously bad accuracy.
"""

from __future__ import annotations

import gzip as _gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from fedmutual.errors import DataError

__all__ = ["read_idx", "write_idx", "load_idx_pair", "IDX_DTYPES"]

#: IDX type code -> NumPy dtype (big-endian, as stored in the file).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"
_HINT = "Re-download or re-copy the file (see docs/data.md)."


def _gunzip(raw: bytes) -> bytes:
    """Decompress every gzip member of ``raw`` (zlib checks each member's CRC and length).

    ``zlib`` directly is faster than :func:`gzip.decompress`; like ``gzip``,
    trailing zero padding after the last member is ignored.
    """
    out = []
    while True:
        d = zlib.decompressobj(wbits=31)
        out.append(d.decompress(raw))
        if not d.eof:
            raise EOFError("compressed stream ended before the end-of-stream marker")
        raw = d.unused_data
        if not raw.lstrip(b"\x00"):
            break
        if raw[:2] != _GZIP_MAGIC:
            raise _gzip.BadGzipFile(f"{len(raw)} bytes of garbage after the compressed data")
    return out[0] if len(out) == 1 else b"".join(out)


def _read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when it starts with the gzip header."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"IDX file {path} does not exist. {_HINT}") from None
    except OSError as e:
        raise DataError(f"cannot read IDX file {path}: {e.strerror or e}.") from None
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return _gunzip(raw)
    except EOFError:
        raise DataError(
            f"{path} is a truncated gzip file (the compressed stream ends early); "
            f"the download or copy was probably cut short. {_HINT}"
        ) from None
    except (OSError, zlib.error) as e:  # BadGzipFile is an OSError; CRC errors too
        raise DataError(f"{path} is a corrupt gzip file ({e}). {_HINT}") from None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (raw or gzip) into a native-endian NumPy array.

    Validates the magic number, the type code, the dimensions and that the
    payload has exactly the size the header announces: a truncated file, a
    file with trailing bytes, a wrong magic number or an unknown type code
    raise :class:`DataError` naming the file.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(
            f"{path} is not an IDX file: it has {len(data)} bytes, fewer than the "
            f"4-byte header. {_HINT}"
        )
    if data[0] != 0 or data[1] != 0:
        raise DataError(
            f"{path} is not an IDX file: its magic number starts with bytes "
            f"0x{data[0]:02x} 0x{data[1]:02x}, expected 0x00 0x00. {_HINT}"
        )
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        allowed = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise DataError(
            f"{path} has IDX type code 0x{code:02X}, which is not one of the "
            f"defined codes ({allowed}). {_HINT}"
        )
    if ndim < 1:
        raise DataError(f"{path} declares 0 dimensions; an IDX array needs at least 1. {_HINT}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(
            f"{path} is truncated: its header declares {ndim} dimensions "
            f"({header} header bytes) but the file has only {len(data)} bytes. {_HINT}"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    actual = len(data) - header
    if actual < expected:
        raise DataError(
            f"{path} is truncated: the header declares shape {dims} of {dtype.name} "
            f"({expected} data bytes) but only {actual} data bytes follow. {_HINT}"
        )
    if actual > expected:
        raise DataError(
            f"{path} has {actual - expected} trailing bytes after the data: the header "
            f"declares shape {dims} of {dtype.name} ({expected} data bytes) but "
            f"{actual} follow. The file is corrupt or not an IDX file. {_HINT}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    # astype to native byte order copies, which also makes the array writable.
    return array.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray, gzip: bool = False) -> None:
    """Write ``array`` as an IDX file (gzip-compressed if ``gzip``).

    Supported dtypes: uint8, int8, int16, int32, float32, float64. Used by the
    tests to build datasets, and handy to convert other data to IDX.
    """
    array = np.asarray(array)
    codes = {dt.newbyteorder("=").str.lstrip("<>|="): c for c, dt in IDX_DTYPES.items()}
    key = array.dtype.newbyteorder("=").str.lstrip("<>|=")
    if key not in codes:
        raise DataError(
            f"cannot write {path} as IDX: dtype {array.dtype} is not supported; use "
            "uint8, int8, int16, int32, float32 or float64."
        )
    if not 1 <= array.ndim <= 255:
        raise DataError(
            f"cannot write {path} as IDX: the array has {array.ndim} dimensions, "
            "IDX needs 1 to 255."
        )
    code = codes[key]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()
    if gzip:
        payload = _gzip.compress(payload, mtime=0)
    Path(path).write_bytes(payload)


def load_idx_pair(
    images_path: str | os.PathLike, labels_path: str | os.PathLike
) -> tuple[np.ndarray, np.ndarray]:
    """Read an images file and its labels file and check that they belong together.

    The labels must be a 1-D array of integers >= 0 with one label per image;
    the images must have at least 2 dimensions ([N, ...]). Returns
    ``(images, labels)`` with labels as int64.
    """
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim < 2:
        raise DataError(
            f"{images_path} holds a {images.ndim}-D array of shape {images.shape}; "
            "an images file must be [N, H, W] (or [N, C, H, W]). Check that the images "
            "and labels files are not swapped."
        )
    if labels.ndim != 1:
        raise DataError(
            f"{labels_path} holds an array of shape {labels.shape}; a labels file must "
            "be 1-D [N]. Check that the images and labels files are not swapped."
        )
    if labels.dtype.kind not in "iu":
        raise DataError(
            f"{labels_path} holds {labels.dtype} values; labels must be integers "
            "(IDX type code 0x08, 0x09, 0x0B or 0x0C)."
        )
    if len(labels) != len(images):
        raise DataError(
            f"{images_path} has {len(images)} images but {labels_path} has "
            f"{len(labels)} labels; they must match one to one. Check that both files "
            "come from the same split (train or test) of the same dataset."
        )
    if len(labels) and labels.min() < 0:
        raise DataError(
            f"{labels_path} contains the negative label {int(labels.min())}; labels "
            "must be class indices 0, 1, 2, ..."
        )
    return images, labels.astype(np.int64)
