"""Reading the CIFAR-10 / CIFAR-100 "python version" files without trusting them.

The official CIFAR files are Python pickles. Unpickling can run arbitrary code
named by the file, so this module never calls ``pickle.load``: it uses an
unpickler whose ``find_class`` allows only the handful of globals a pickled
dict of NumPy arrays needs and refuses everything else with a
:class:`~fedmutual.errors.DataError` before anything from the file runs.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any, Literal

import numpy as np

try:  # NumPy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - NumPy 1.x
    from numpy.core.multiarray import _reconstruct

from fedmutual.errors import DataError

__all__ = ["read_cifar_batch", "load_cifar", "CIFAR_LAYOUTS", "find_cifar_dir"]


def _latin1_encode(obj: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """Stand-in for ``_codecs.encode`` limited to what pickle protocol 2 uses.

    Python 3 pickles ``bytes`` under protocol 2 as ``_codecs.encode(text, "latin1")``;
    any other codec (and any non-str argument) is refused.
    """
    if not isinstance(obj, str) or encoding.replace("-", "").lower() != "latin1" or errors != "strict":
        raise DataError(
            f"refuses to call _codecs.encode({type(obj).__name__}, {encoding!r}): only "
            "latin1 encoding of text is allowed in a CIFAR batch file."
        )
    return obj.encode("latin1")


# Globals that a pickle of a dict of NumPy arrays legitimately names:
# NumPy 1.x wrote numpy.core.multiarray, NumPy 2.x writes numpy._core.multiarray;
# _codecs.encode is how Python 3 writes bytes under protocol 2.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in :data:`_ALLOWED`."""

    def __init__(self, file: io.BufferedIOBase, path: Path):
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DataError(
                f"{self._path}: the CIFAR loader refuses to load global {module}.{name} "
                "from this pickle; a CIFAR batch contains only NumPy arrays, lists and "
                "strings, so the file is not a genuine CIFAR batch (and may be "
                "malicious). Nothing from it was executed. Re-download the official "
                "archive and extract it again."
            ) from None


def _decode_keys(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    return obj


def read_cifar_batch(path: str | os.PathLike) -> dict:
    """Load one CIFAR python-format file (a batch or the meta file) safely.

    Returns the pickled dict with its byte-string keys decoded to ``str``
    (values are left as stored: ``data`` a NumPy array, label lists, byte
    strings for names).
    """
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"CIFAR file {path} does not exist.") from None
    except OSError as e:
        raise DataError(f"cannot read CIFAR file {path}: {e.strerror or e}.") from None
    with f:
        try:
            obj = _RestrictedUnpickler(f, path).load()
        except DataError as e:
            if str(path) in str(e):
                raise
            raise DataError(f"{path}: {e}") from None
        except Exception as e:  # any malformed-pickle failure
            raise DataError(
                f"{path} is not a readable CIFAR batch file ({type(e).__name__}: {e}); it "
                "is truncated or corrupt. Re-download the archive and extract it again."
            ) from None
    if not isinstance(obj, dict):
        raise DataError(
            f"{path} holds a {type(obj).__name__}, expected the dict of a CIFAR batch."
        )
    return _decode_keys(obj)


#: kind -> (sub-folder name, train files, test file, meta file, label key, names key, classes)
CIFAR_LAYOUTS: dict[str, tuple[str, tuple[str, ...], str, str, str, str, int]] = {
    "cifar10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
        "labels",
        "label_names",
        10,
    ),
    "cifar100": ("cifar-100-python", ("train",), "test", "meta", "fine_labels", "fine_label_names", 100),
}


def _layout(kind: str) -> tuple[str, tuple[str, ...], str, str, str, str, int]:
    if kind not in CIFAR_LAYOUTS:
        raise DataError(f"unknown CIFAR kind {kind!r}; expected 'cifar10' or 'cifar100'.")
    return CIFAR_LAYOUTS[kind]


def required_files(kind: str) -> list[str]:
    """File names a CIFAR directory of this kind must contain."""
    _, train, test, meta, *_ = _layout(kind)
    return [*train, test, meta]


def find_cifar_dir(directory: str | os.PathLike, kind: str) -> tuple[Path | None, list[str]]:
    """Where the batch files are: ``directory/<official folder>`` or ``directory``.

    Returns ``(folder, [])`` when one of the two holds every file, else
    ``(None, missing)`` with the files missing from the more complete one.
    """
    sub, *_ = _layout(kind)
    need = required_files(kind)
    best: list[str] | None = None
    for d in (Path(directory) / sub, Path(directory)):
        missing = [n for n in need if not (d / n).is_file()]
        if not missing:
            return d, []
        if best is None or len(missing) < len(best):
            best = missing
    return None, best or []


def _batch_arrays(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = read_cifar_batch(path)
    for key in ("data", label_key):
        if key not in batch:
            raise DataError(
                f"{path} has no {key!r} entry (it has {sorted(map(str, batch))}); "
                "it is not a CIFAR batch of the expected kind."
            )
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' is a {desc}; expected a uint8 array of shape [N, 3072].")
    try:
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{path}: {label_key!r} is not a list of integers.") from None
    if labels.shape != (len(data),):
        raise DataError(
            f"{path} has {len(data)} images but {labels.size} {label_key!r}; they must match."
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
        raise DataError(
            f"{path} contains the label {bad}; {label_key!r} must lie in 0..{num_classes - 1}."
        )
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(
    directory: str | os.PathLike, kind: Literal["cifar10", "cifar100"]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Load CIFAR-10 or CIFAR-100 (fine labels) from the official python-format files.

    ``directory`` is the extracted folder (``cifar-10-batches-py`` /
    ``cifar-100-python``) or its parent. Returns
    ``(train_x, train_y, test_x, test_y, classes)`` with images as uint8
    ``[N, 3, 32, 32]`` and labels as int64.
    """
    sub, train_files, test_file, meta_file, label_key, names_key, num_classes = _layout(kind)
    folder, missing = find_cifar_dir(directory, kind)
    if folder is None:
        raise DataError(
            f"{directory} (and {Path(directory) / sub}) lack the {kind} file(s) "
            f"{', '.join(missing)}. Extract the official python-version archive there."
        )
    parts = [_batch_arrays(folder / n, label_key, num_classes) for n in train_files]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    test_x, test_y = _batch_arrays(folder / test_file, label_key, num_classes)
    meta = read_cifar_batch(folder / meta_file)
    names = meta.get(names_key)
    if not isinstance(names, list) or len(names) != num_classes:
        got = f"{len(names)} names" if isinstance(names, list) else "no such entry"
        raise DataError(
            f"{folder / meta_file}: {names_key!r} should list {num_classes} class names, "
            f"found {got}."
        )
    classes = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    return train_x, train_y, test_x, test_y, classes
