"""Finding and loading the image-classification datasets as standardized tensors.

:func:`load_dataset` resolves a dataset name through the registry
:data:`DATASETS`: the built-in file datasets (fashion-mnist, mnist, idx,
cifar10, cifar100), loaders and in-memory datasets added with
:func:`register_dataset`, installed plug-ins (entry points of group
``fedmutual.datasets``) and import strings ``"package.module:loader"``.

A built-in dataset is looked for in a fixed order of directories
(:func:`candidate_dirs`); the first complete copy is loaded and returned
whole in memory as float32 tensors ``[N, C, H, W]`` standardized per channel
with the mean and standard deviation of the *training* set (the test set is
transformed with the same training statistics, so no test information leaks
into preprocessing). :func:`from_arrays` turns a user's own arrays into the
same form. Nothing is cached on disk except explicit downloads.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
import torch

from fedmutual.data.cifar import CIFAR_LAYOUTS, find_cifar_dir, load_cifar
from fedmutual.data.download import DOWNLOADS, OFFICIAL_URLS, cache_dir, download_dataset
from fedmutual.data.idx import load_idx_pair
from fedmutual.errors import ConfigError, DataError, FedmutualError
from fedmutual.registry import Registry, canonical

__all__ = [
    "ARRAYS_SOURCE",
    "ArrayDataset",
    "BUILTIN_DATASETS",
    "DATASETS",
    "DatasetLoader",
    "FASHION_MNIST_CLASSES",
    "MNIST_CLASSES",
    "SYSTEM_DIRS",
    "from_arrays",
    "load_dataset",
    "register_dataset",
    "candidate_dirs",
    "cache_dir",
    "find_idx_files",
]

#: The datasets read from files in the standard layouts (see :func:`candidate_dirs`).
BUILTIN_DATASETS: tuple[str, ...] = ("fashion-mnist", "mnist", "idx", "cifar10", "cifar100")

#: How the ``source`` of a dataset made by :func:`from_arrays` begins.
ARRAYS_SOURCE = "arrays"

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
    #: SHA-256 (hex) of the arrays a dataset was made from (:func:`from_arrays`); None for files read from disk.
    fingerprint: str | None = None


#: Loads a dataset: ``(data_dir, download) -> ArrayDataset``.
DatasetLoader = Callable[[Union[str, None], bool], ArrayDataset]


def _check_loader(name: str, obj: object) -> DatasetLoader | ArrayDataset:
    if isinstance(obj, ArrayDataset) or callable(obj):
        return obj
    raise TypeError(
        f"a dataset must be a loader (data_dir, download) -> ArrayDataset or an ArrayDataset, "
        f"got {type(obj).__name__} {obj!r}"
    )


#: Every dataset a config can name (``dataset = ...``); the built-ins first.
DATASETS: Registry[DatasetLoader | ArrayDataset] = Registry("dataset", check=_check_loader)


def register_dataset(name: str, loader: DatasetLoader | ArrayDataset, replace: bool = False) -> DatasetLoader | ArrayDataset:
    """Make ``loader`` available to configs as ``dataset = name``.

    ``loader(data_dir, download)`` returns an :class:`ArrayDataset` (``data_dir`` is the config's
    ``data_dir``, a string or None); an ArrayDataset itself (e.g. from :func:`from_arrays`) is
    served as it is. Registering a name that is taken raises ValueError unless ``replace``;
    returns ``loader``.
    """
    DATASETS.register(name, loader, replace=replace)
    return loader


def _unknown(name: str) -> ConfigError:
    return ConfigError(
        f"unknown dataset {name!r}; expected one of: {', '.join(n for n in DATASETS.names() if ':' not in n)}, "
        "or an import string such as 'mypackage.data:load'."
    )


def _canonical(name: str) -> str:
    """The key of a built-in file dataset; ConfigError for any other name."""
    key = canonical(name)
    if key not in BUILTIN_DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; expected one of: {', '.join(BUILTIN_DATASETS)}.")
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
    """Load dataset ``name``: a name in :data:`DATASETS` (case-insensitive), a plug-in or an import string.

    A built-in file dataset is looked for as :func:`candidate_dirs` describes; when it is not found
    and ``download`` is true, downloadable datasets (fashion-mnist) are fetched into
    ``cache_dir()/<name>`` first, and otherwise :class:`DataError` lists every directory tried.
    A registered loader is called as ``loader(data_dir, download)``; a registered ArrayDataset is
    returned as it is.
    """
    key = canonical(name)
    try:
        entry = DATASETS.get(key)
    except ConfigError as e:
        if str(e).startswith("unknown dataset"):
            raise _unknown(name) from None
        raise
    if isinstance(entry, ArrayDataset):
        return entry
    if key in BUILTIN_DATASETS and entry is _BUILTIN_LOADERS.get(key):
        return entry(data_dir, download)  # type: ignore[arg-type]
    try:
        ds = entry(None if data_dir is None else str(data_dir), bool(download))
    except FedmutualError:
        raise
    except Exception as e:
        raise DataError(f"dataset {key!r}: its loader failed ({type(e).__name__}: {e})") from e
    if not isinstance(ds, ArrayDataset):
        raise ConfigError(f"dataset {key!r}: its loader returned a {type(ds).__name__}, not an ArrayDataset")
    return ds


def _load_files(key: str, data_dir: str | os.PathLike | None = None, download: bool = False) -> ArrayDataset:
    """Load the built-in file dataset ``key`` (see :func:`load_dataset`)."""
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


_BUILTIN_LOADERS: dict[str, DatasetLoader] = {}
for _key in BUILTIN_DATASETS:
    _BUILTIN_LOADERS[_key] = partial(_load_files, _key)
    register_dataset(_key, _BUILTIN_LOADERS[_key])
del _key


# --- a user's own arrays ------------------------------------------------------------------------

def _as_array(value: object, what: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise ConfigError(f"from_arrays: {what} must be a NumPy array or a torch tensor, got {type(value).__name__}.")


def _images(x: np.ndarray, what: str) -> np.ndarray:
    if x.dtype.kind not in "iuf":
        raise DataError(f"from_arrays: {what} must hold real numbers (an integer or float dtype), got {x.dtype}.")
    if x.ndim == 2:
        x = x[:, None, None, :]
    elif x.ndim == 3:
        x = x[:, None]
    elif x.ndim != 4:
        raise DataError(
            f"from_arrays: {what} has shape {tuple(x.shape)}; expected images [N, H, W] or [N, C, H, W], "
            "or flat samples [N, D]."
        )
    if len(x) == 0:
        raise DataError(f"from_arrays: {what} is empty; both the training and the test set need samples.")
    if 0 in x.shape[1:]:
        raise DataError(f"from_arrays: {what} has shape {tuple(x.shape)}; every sample dimension must be >= 1.")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise DataError(f"from_arrays: {what} contains NaN or infinite values.")
    return x


def _labels(y: np.ndarray, n: int, what: str, images: str) -> np.ndarray:
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataError(
            f"from_arrays: {what} must be a 1-D array of integer class indices, got {y.dtype} of shape {tuple(y.shape)}."
        )
    if len(y) != n:
        raise DataError(f"from_arrays: {what} has {len(y)} labels but {images} has {n} samples; they must match.")
    if y.min() < 0:
        raise DataError(f"from_arrays: {what} contains the negative label {int(y.min())}; labels are 0..C-1.")
    return y


def _fingerprint(arrays: Sequence[np.ndarray]) -> str:
    """SHA-256 over each array's dtype, shape and bytes, in order."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{tuple(a.shape)};".encode())
        h.update(a.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def from_arrays(
    train_x: np.ndarray | torch.Tensor,
    train_y: np.ndarray | torch.Tensor,
    test_x: np.ndarray | torch.Tensor,
    test_y: np.ndarray | torch.Tensor,
    *,
    name: str = "arrays",
    classes: Sequence[str] | None = None,
    standardize: bool = True,
) -> ArrayDataset:
    """An :class:`ArrayDataset` made from a user's own arrays (NumPy arrays or torch tensors).

    Images are ``[N, C, H, W]`` or ``[N, H, W]`` (one channel); flat samples ``[N, D]`` (tabular
    data) become ``[N, 1, 1, D]``, which the ``mlp`` model and any model that flattens its input
    take as they are. The training and test images need the same sample shape and real values
    (integer or float, no NaN or infinity); labels are 1-D integer class indices ``0..C-1``, one
    per image, where ``C`` is ``len(classes)`` when class names are given and otherwise the
    largest label plus one. With ``standardize`` (the default) every channel is standardized with
    the training set's mean and standard deviation, as the built-in datasets are; otherwise the
    values are kept as float32 (``mean`` 0 and ``std`` 1 record that). The inputs are copied, never
    changed. ``source`` reads ``"arrays (sha256 <first 12 hex digits>)"`` and ``fingerprint``
    holds the full SHA-256 of the arrays as given, so records name the data truthfully. Refusals
    are a :class:`ConfigError` (arguments of the wrong kind) or a :class:`DataError` (the data).
    """
    key = canonical(name) if isinstance(name, str) else ""
    if not key or ":" in key or "," in key:
        raise ConfigError(f"from_arrays: name {name!r} is not a dataset name; use letters, digits, '-' and '_' (no ':' or ',').")
    if not isinstance(standardize, bool):
        raise ConfigError(f"from_arrays: standardize must be True or False, got {standardize!r}.")
    raw = [_as_array(v, w) for v, w in ((train_x, "train_x"), (train_y, "train_y"), (test_x, "test_x"), (test_y, "test_y"))]
    tx = _images(raw[0], "train_x")
    vx = _images(raw[2], "test_x")
    if tx.shape[1:] != vx.shape[1:]:
        raise DataError(
            f"from_arrays: the training samples are {tuple(tx.shape[1:])} but the test samples are "
            f"{tuple(vx.shape[1:])} (as [C, H, W]); both sets need the same sample shape."
        )
    ty = _labels(raw[1], len(tx), "train_y", "train_x")
    vy = _labels(raw[3], len(vx), "test_y", "test_x")
    top = int(max(ty.max(), vy.max()))
    names: list[str] | None = None
    if classes is not None:
        if isinstance(classes, str) or not all(isinstance(c, str) for c in classes):
            raise ConfigError(f"from_arrays: classes must be a list of class names (strings), got {classes!r}.")
        names = list(classes)
        if not names:
            raise ConfigError("from_arrays: classes is empty; give one name per class, or leave it out.")
        if top >= len(names):
            which = "train_y" if int(ty.max()) == top else "test_y"
            raise DataError(
                f"from_arrays: {which} contains the label {top}, but {len(names)} class names were given "
                f"(labels 0..{len(names) - 1})."
            )
    num_classes = len(names) if names is not None else top + 1
    fingerprint = _fingerprint(raw)
    source = f"{ARRAYS_SOURCE} (sha256 {fingerprint[:12]})"
    channels = tx.shape[1]
    if standardize:
        mean, std = _channel_stats(tx, source)
    else:
        mean, std = [0.0] * channels, [1.0] * channels

    def as_float(x: np.ndarray) -> torch.Tensor:
        t = torch.tensor(x, dtype=torch.float32)  # always a copy
        shape = (1, channels, 1, 1)
        t.sub_(torch.tensor(mean, dtype=torch.float32).view(shape))
        return t.div_(torch.tensor(std, dtype=torch.float32).view(shape))

    return ArrayDataset(
        name=key,
        train_x=as_float(tx),
        train_y=torch.tensor(ty, dtype=torch.int64),
        test_x=as_float(vx),
        test_y=torch.tensor(vy, dtype=torch.int64),
        num_classes=num_classes,
        input_shape=tuple(int(s) for s in tx.shape[1:]),  # type: ignore[arg-type]
        classes=names,
        source=source,
        mean=tuple(mean),
        std=tuple(std),
        fingerprint=fingerprint,
    )
