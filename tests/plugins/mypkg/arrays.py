"""A dataset from NumPy arrays: a small slice of the real Fashion-MNIST, read from its IDX files.

``dataset = "mypkg.arrays:tiny_fmnist"`` names the loader by import string; :func:`register` adds it under
the name ``tiny-fmnist`` instead. :func:`raw` gives the arrays themselves, for ``from_arrays`` in Python.
"""

from __future__ import annotations

import numpy as np

from fedmutual.data import ArrayDataset, candidate_dirs, from_arrays, read_idx, register_dataset
from fedmutual.data.datasets import find_idx_files
from fedmutual.errors import DataError

TRAIN, TEST = 300, 100


def raw(data_dir: str | None = None, train: int = TRAIN, test: int = TEST) -> tuple[np.ndarray, ...]:
    """The first ``train`` training and ``test`` test images (uint8 [N, 28, 28]) and labels of Fashion-MNIST."""
    for d in candidate_dirs("fashion-mnist", data_dir):
        files, _ = find_idx_files(d)
        if files is not None:
            return (read_idx(files["train images"])[:train], read_idx(files["train labels"])[:train].astype(np.int64),
                    read_idx(files["test images"])[:test], read_idx(files["test labels"])[:test].astype(np.int64))
    raise DataError("Fashion-MNIST not found (install dataset-fashion-mnist)")


def tiny_fmnist(data_dir: str | None = None, download: bool = False, name: str = "tiny-fmnist") -> ArrayDataset:
    """A dataset loader ``(data_dir, download) -> ArrayDataset``: 300 training and 100 test images."""
    tx, ty, vx, vy = raw(data_dir)
    return from_arrays(tx, ty, vx, vy, name=name, classes=["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                                          "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"])


def register() -> None:
    """Make the loader available as ``dataset = "tiny-fmnist"``."""
    register_dataset("tiny-fmnist", tiny_fmnist, replace=True)
