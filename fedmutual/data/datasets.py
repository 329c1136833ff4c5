"""Finding and loading the image-classification datasets as standardized tensors.

:func:`load_dataset` looks for a dataset in a fixed order of directories
(:func:`candidate_dirs`), loads the first complete copy it finds, and returns
the whole dataset in memory as float32 tensors ``[N, C, H, W]`` standardized
per channel with the mean and standard deviation of the *training* set (the
test set is transformed with the same training statistics, so no test
information leaks into preprocessing). Nothing is cached on disk except
explicit downloads.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedmutual.data.cifar import CIFAR_LAYOUTS, find_cifar_dir, load_cifar
from fedmutual.data.download import DOWNLOADS, OFFICIAL_URLS, cache_dir, download_dataset
from fedmutual.data.idx import load_idx_pair
from fedmutual.errors import ConfigError, DataError

__all__ = [
    "ArrayDataset",
    "DATASETS",
    "FASHION_MNIST_CLASSES",
    "MNIST_CLASSES",
    "SYSTEM_DIRS",
    "load_dataset",
    "candidate_dirs",
    "cache_dir",
    "find_idx_files",
]

DATASETS: tuple[str, ...] = ("fashion-mnist", "mnist", "idx", "cifar10", "cifar100")

FASHION_MNIST_CLASSES: list[str] = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
MNIST_CLASSES: list[str] = [str(d) for d in range(10)]

#: Where Debian's dataset packages install the files.
SYSTEM_DIRS: dict[str, Path] = {
    "fashion-mnist": Path("/usr/share/datasets/fashion-mnist"),
    "mnist": Path("/usr/share/datasets/mnist"),
}

# IDX roles -> accepted file name prefixes (followed by anything: -idx3-ubyte, .gz, ...).
_IDX_ROLES: dict[str, tuple[str, ...]] = {
    "train images": ("train-images",),
    "train labels": ("train-labels",),
    "test images": ("t10k-images", "test-images"),
    "test labels": ("t10k-labels", "test-labels"),
}


@dataclass
class ArrayDataset:
    """A whole dataset in memory, ready for training.

    Images are float32 ``[N, C, H, W]`` standardized per channel with the
    training set's ``mean``/``std`` (given in the raw pixel units, e.g. 0..255);
    labels are int64 class indices ``0..num_classes-1``.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    input_shape: tuple[int, int, int]
    classes: list[str] | None
    source: str
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()


def _canonical(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}.")
    return key


def candidate_dirs(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The directories searched for dataset ``name``, in order; the first complete one wins.

    1. ``data_dir`` and ``data_dir/<name>`` (when given);
    2. ``$FEDMUTUAL_DATA`` and ``$FEDMUTUAL_DATA/<name>`` (when set);
    3. Debian's install directory (fashion-mnist and mnist only);
    4. ``cache_dir()/<name>``, where downloads go.
    """
    key = _canonical(name)
    dirs: list[Path] = []
    if data_dir is not None and str(data_dir) != "":
        d = Path(data_dir).expanduser()
        dirs += [d, d / key]
    env = os.environ.get("FEDMUTUAL_DATA", "")
    if env:
        e = Path(env).expanduser()
        dirs += [e, e / key]
    if key in SYSTEM_DIRS:
        dirs.append(SYSTEM_DIRS[key])
    dirs.append(cache_dir() / key)
    seen: set[Path] = set()
    return [d for d in dirs if not (d in seen or seen.add(d))]


def find_idx_files(directory: str | os.PathLike) -> tuple[dict[str, Path] | None, str]:
    """The four IDX files of a dataset in ``directory``.

    Returns ``(files, "")`` with keys ``train images``, ``train labels``,
    ``test images``, ``test labels`` when all four are there, else
    ``(None, why)``. A file and its ``.gz`` twin count as one (the
    uncompressed one is used); any other duplicate raises DataError because
    picking one silently could load the wrong data.
    """
    d = Path(directory)
    if not d.is_dir():
        return None, "does not exist" if not d.exists() else "is not a directory"
    found: dict[str, Path] = {}
    missing: list[str] = []
    for role, prefixes in _IDX_ROLES.items():
        matches = sorted({p for pre in prefixes for p in d.glob(pre + "*") if p.is_file()})
        names = {p.name for p in matches}
        matches = [p for p in matches if not (p.name.endswith(".gz") and p.name[:-3] in names)]
        if not matches:
            missing.append("/".join(f"{pre}*" for pre in prefixes))
        elif len(matches) > 1:
            raise DataError(
                f"{d} holds several {role} files: {', '.join(p.name for p in matches)}; "
                "fedmutual cannot tell which one to use. Keep one (a file and its .gz "
                "copy are fine) and move the others away."
            )
        else:
            found[role] = matches[0]
    if missing:
        return None, "no " + ", ".join(missing) + " file"
    return found, ""


def _locate(key: str, dirs: list[Path]) -> tuple[Path | None, list[str]]:
    """First directory holding the dataset, and a line per directory tried."""
    tried: list[str] = []
    for d in dirs:
        if key in CIFAR_LAYOUTS:
            if not d.is_dir():
                why = "does not exist" if not d.exists() else "is not a directory"
            else:
                folder, missing = find_cifar_dir(d, key)
                if folder is not None:
                    return folder, tried
                why = f"no {', '.join(missing)} (here or in {CIFAR_LAYOUTS[key][0]}/)"
        else:
            files, why = find_idx_files(d)
            if files is not None:
                return d, tried
        tried.append(f"  {d}  ({why})")
    return None, tried


def _how_to_get(key: str) -> list[str]:
    cache = cache_dir() / key
    if key == "fashion-mnist":
        return [
            "sudo apt-get install dataset-fashion-mnist   (Debian/Ubuntu; found automatically)",
            f"fedmutual run --download ...   (downloads into {cache})",
            f"download the four .gz files from {OFFICIAL_URLS[key]} into one of the directories above",
        ]
    if key == "mnist":
        return [
            "download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz "
            f"and t10k-labels-idx1-ubyte.gz (from {OFFICIAL_URLS[key]} or a mirror) into one of "
            "the directories above (fedmutual's --download fetches only fashion-mnist)",
        ]
    if key == "idx":
        return [
            "put four IDX files named train-images*, train-labels*, t10k-images* (or test-images*) "
            "and t10k-labels* (or test-labels*), raw or gzipped, into one directory and pass "
            "it as the data directory",
        ]
    sub = CIFAR_LAYOUTS[key][0]
    return [
        f"download {OFFICIAL_URLS[key]} and extract it (tar xzf) so that {sub}/ lies in one of "
        "the directories above",
    ]


def _not_found(key: str, tried: list[str], download_refused: bool) -> DataError:
    ways = "\n".join(f"  - {w}" for w in _how_to_get(key))
    note = ""
    if download_refused:
        note = f"\n(--download can fetch only: {', '.join(DOWNLOADS)}.)"
    return DataError(
        f"dataset {key} not found. Looked in, in this order:\n"
        + "\n".join(tried)
        + f"\nTo get it, do one of:\n{ways}\n"
        "(Pass the directory with --data-dir or set FEDMUTUAL_DATA to use another place.)"
        + note
    )


def _channel_stats(x: np.ndarray, source: str) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of ``x`` [N, C, H, W]."""
    means, stds = [], []
    for c in range(x.shape[1]):
        xc = x[:, c]
        if x.dtype == np.uint8:
            # Exact and cheap: a 256-bin histogram instead of float copies
            # (torch.bincount takes uint8 as is; np.bincount would cast to int64 first).
            flat = torch.from_numpy(np.ascontiguousarray(xc).reshape(-1))
            counts = torch.bincount(flat, minlength=256).numpy().astype(np.float64)
            values = np.arange(256, dtype=np.float64)
            n = counts.sum()
            mean = float(counts @ values / n)
            var = float(counts @ (values - mean) ** 2 / n)
        else:
            x64 = xc.astype(np.float64)
            if not np.isfinite(x64).all():
                raise DataError(f"the training images in {source} contain NaN or infinite values.")
            mean, var = float(x64.mean()), float(x64.var())
        means.append(mean)
        # A constant channel carries no information; scale 1 maps it to 0 instead of NaN.
        stds.append(math.sqrt(var) if var > 0 else 1.0)
    return means, stds


def _standardize(x: np.ndarray, mean: list[float], std: list[float]) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32)
    shape = (1, len(mean), 1, 1)
    t.sub_(torch.tensor(mean, dtype=torch.float32).view(shape))
    t.div_(torch.tensor(std, dtype=torch.float32).view(shape))
    return t


def _load_idx_dir(key: str, d: Path):
    files, why = find_idx_files(d)
    if files is None:  # the directory changed since discovery
        raise DataError(f"{d}: {why}.")
    train_x, train_y = load_idx_pair(files["train images"], files["train labels"])
    test_x, test_y = load_idx_pair(files["test images"], files["test labels"])
    out = []
    for arr, path in ((train_x, files["train images"]), (test_x, files["test images"])):
        if arr.ndim == 3:
            arr = arr[:, None]
        elif arr.ndim != 4:
            raise DataError(
                f"{path} holds images of shape {arr.shape}; expected [N, H, W] or [N, C, H, W]."
            )
        out.append(arr)
    train_x, test_x = out
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(
            f"the train images in {files['train images']} are {train_x.shape[1:]} but the test "
            f"images in {files['test images']} are {test_x.shape[1:]}; both must have the same "
            "shape. Check that both files come from the same dataset."
        )
    if key in ("fashion-mnist", "mnist"):
        num_classes = 10
        classes = FASHION_MNIST_CLASSES if key == "fashion-mnist" else MNIST_CLASSES
        for y, path in ((train_y, files["train labels"]), (test_y, files["test labels"])):
            if len(y) and y.max() >= num_classes:
                raise DataError(
                    f"{path} contains the label {int(y.max())}, but {key} has 10 classes "
                    "(labels 0..9). The file belongs to another dataset or is corrupt; "
                    "load it as dataset 'idx' if it is meant to be different."
                )
    else:
        num_classes = int(max(train_y.max(initial=-1), test_y.max(initial=-1))) + 1
        classes = None
    return train_x, train_y, test_x, test_y, num_classes, classes


def load_dataset(
    name: str, data_dir: str | os.PathLike | None = None, download: bool = False
) -> ArrayDataset:
    """Find and load a dataset; see :func:`candidate_dirs` for where it looks.

    ``name`` is one of :data:`DATASETS` (case-insensitive). When the data is
    not found and ``download`` is true, downloadable datasets (fashion-mnist)
    are fetched into ``cache_dir()/<name>`` first. Raises :class:`DataError`
    listing every directory tried when the dataset is nowhere to be found.
    """
    key = _canonical(name)
    dirs = candidate_dirs(key, data_dir)
    found, tried = _locate(key, dirs)
    if found is None:
        if download and key in DOWNLOADS:
            target = download_dataset(key, cache_dir() / key)
            found, more = _locate(key, [target])
            if found is None:
                raise _not_found(key, tried + more, False)
        else:
            raise _not_found(key, tried, download)

    if key in CIFAR_LAYOUTS:
        train_x, train_y, test_x, test_y, classes = load_cifar(found, key)  # type: ignore[arg-type]
        num_classes = CIFAR_LAYOUTS[key][6]
    else:
        train_x, train_y, test_x, test_y, num_classes, classes = _load_idx_dir(key, found)
    if len(train_x) == 0 or len(test_x) == 0:
        raise DataError(
            f"{key} in {found} has {len(train_x)} training and {len(test_x)} test images; "
            "both sets must be non-empty."
        )
    mean, std = _channel_stats(train_x, str(found))
    return ArrayDataset(
        name=key,
        train_x=_standardize(train_x, mean, std),
        train_y=torch.from_numpy(np.ascontiguousarray(train_y, dtype=np.int64)),
        test_x=_standardize(test_x, mean, std),
        test_y=torch.from_numpy(np.ascontiguousarray(test_y, dtype=np.int64)),
        num_classes=num_classes,
        input_shape=tuple(int(s) for s in train_x.shape[1:]),  # type: ignore[arg-type]
        classes=list(classes) if classes is not None else None,
        source=str(found),
        mean=tuple(mean),
        std=tuple(std),
    )
