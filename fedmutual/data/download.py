"""Downloading datasets into the user's cache, verified by SHA-256.

Each file is streamed into a hidden temporary file next to its destination,
checked against its pinned checksum and only then renamed into place, so a
failed or corrupted download never leaves a file that looks like data.
Only Fashion-MNIST is downloadable; the other datasets are placed by hand.

Two checksums are pinned per Fashion-MNIST file: the SHA-256 of the official
``.gz`` file (as published and as served by the official host) and the
SHA-256 of its decompressed content. A file is accepted when either matches:
mirrors (and Debian's ``dataset-fashion-mnist`` package) recompress the same
data into different ``.gz`` bytes, and what matters is the data.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import BinaryIO

from fedmutual.errors import ConfigError, DataError

__all__ = ["DOWNLOADS", "CONTENT_SHA256", "OFFICIAL_URLS", "download_dataset", "cache_dir", "sha256_file"]

_FASHION_HOST = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com"

#: Official download page of each dataset, for error messages.
OFFICIAL_URLS: dict[str, str] = {
    "fashion-mnist": _FASHION_HOST + "/",
    "mnist": "http://yann.lecun.com/exdb/mnist/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}

#: dataset -> {file name: (official URL, SHA-256 of the official file)}.
#: These are the checksums Zalando's files have on the official host (the same
#: values are pinned by tensorflow-datasets).
DOWNLOADS: dict[str, dict[str, tuple[str, str]]] = {
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": (
            f"{_FASHION_HOST}/train-images-idx3-ubyte.gz",
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        ),
        "train-labels-idx1-ubyte.gz": (
            f"{_FASHION_HOST}/train-labels-idx1-ubyte.gz",
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        ),
        "t10k-images-idx3-ubyte.gz": (
            f"{_FASHION_HOST}/t10k-images-idx3-ubyte.gz",
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        ),
        "t10k-labels-idx1-ubyte.gz": (
            f"{_FASHION_HOST}/t10k-labels-idx1-ubyte.gz",
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        ),
    },
}

#: dataset -> {file name: SHA-256 of the gunzipped content}. Computed from
#: Debian's dataset-fashion-mnist files, which hold the official data
#: recompressed (their .gz bytes differ from the official ones).
CONTENT_SHA256: dict[str, dict[str, str]] = {
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}

_CHUNK = 1 << 20
_TIMEOUT_S = 60


def cache_dir() -> Path:
    """fedmutual's download cache: ``$XDG_CACHE_HOME/fedmutual`` or ``~/.cache/fedmutual``.

    A relative ``XDG_CACHE_HOME`` is ignored, as the XDG specification asks.
    """
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "fedmutual"


def _hash_stream(f: BinaryIO) -> str:
    h = hashlib.sha256()
    while chunk := f.read(_CHUNK):
        h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as f:
        return _hash_stream(f)


def _content_sha256(path: Path) -> str | None:
    """SHA-256 of a gzip file's decompressed content; None if it is not a valid gzip."""
    with open(path, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            return None
    try:
        with gzip.open(path, "rb") as g:
            return _hash_stream(g)
    except (OSError, EOFError, zlib.error):
        return None


def _manual(name: str, dest: Path) -> str:
    lines = []
    if name == "fashion-mnist":
        lines.append(
            "install Debian's copy (sudo apt-get install dataset-fashion-mnist), which "
            "fedmutual finds in /usr/share/datasets/fashion-mnist"
        )
    url = OFFICIAL_URLS.get(name)
    files = ", ".join(DOWNLOADS.get(name, {}))
    if url:
        lines.append(f"download {files or 'the files'} by hand from {url} into {dest}")
    return "Alternatives: " + "; or ".join(lines) + "."


def _matches(path: Path, name: str, fname: str, expected: str, use_content: bool) -> tuple[bool, str, str | None]:
    """(accepted, file sha256, content sha256 or None if not computed)."""
    actual = sha256_file(path)
    if actual == expected:
        return True, actual, None
    if use_content and fname in CONTENT_SHA256.get(name, {}):
        content = _content_sha256(path)
        return content == CONTENT_SHA256[name][fname], actual, content
    return False, actual, None


def _progress_bar(total: int | None, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency, but optional here
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=False)


def _fetch(url: str, tmp: Path, fname: str, name: str, dest: Path, progress: bool) -> None:
    """Stream ``url`` into ``tmp``; network problems become DataError."""
    fail = f"downloading {fname} from {url} failed"
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as resp, open(tmp, "wb") as out:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            bar = _progress_bar(total, fname, progress)
            got = 0
            try:
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    got += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
            if total is not None and got != total:
                raise DataError(
                    f"{fail}: the server announced {total} bytes but sent {got}; the "
                    f"transfer was cut short and nothing was kept. Run it again. {_manual(name, dest)}"
                )
    except urllib.error.HTTPError as e:
        raise DataError(f"{fail}: HTTP {e.code} {e.reason}. {_manual(name, dest)}") from None
    except urllib.error.URLError as e:
        raise DataError(
            f"{fail}: {e.reason}. Check the network connection (or the --download "
            f"mirror). {_manual(name, dest)}"
        ) from None
    except http.client.IncompleteRead as e:
        raise DataError(
            f"{fail}: the connection closed after {len(e.partial)} bytes of the file "
            f"(the transfer was cut short; nothing was kept). Run it again. {_manual(name, dest)}"
        ) from None
    except (http.client.HTTPException, TimeoutError, ConnectionError) as e:
        raise DataError(
            f"{fail}: {type(e).__name__}: {e}; nothing was kept. Run it again. {_manual(name, dest)}"
        ) from None
    except OSError as e:
        raise DataError(f"{fail}: cannot write {tmp}: {e.strerror or e}.") from None


def download_dataset(
    name: str,
    dest: Path | None = None,
    base_url: str | None = None,
    checksums: dict[str, str] | None = None,
    progress: bool = True,
) -> Path:
    """Download a dataset's files into ``dest`` (default ``cache_dir()/name``).

    ``base_url`` replaces the official host (``<base_url>/<file name>``), for
    mirrors and tests. ``checksums`` replaces the pinned SHA-256 of the named
    files (then only the file bytes are compared, not the decompressed
    content). Files already present and valid are kept. Returns ``dest``.
    """
    key = name.strip().lower()
    if key not in DOWNLOADS:
        allowed = ", ".join(DOWNLOADS)
        raise DataError(
            f"fedmutual cannot download {name!r}; it can download only: {allowed}. "
            f"Get {name} from {OFFICIAL_URLS.get(key, 'its official site')} and place it "
            "as described in docs/data.md."
        )
    files = DOWNLOADS[key]
    checksums = dict(checksums or {})
    unknown = sorted(set(checksums) - set(files))
    if unknown:
        raise ConfigError(
            f"checksums given for {', '.join(unknown)}, which {key} does not have; "
            f"its files are {', '.join(files)}."
        )
    dest = Path(dest) if dest is not None else cache_dir() / key
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"cannot create the download directory {dest}: {e.strerror or e}. Choose a "
            "writable place (set XDG_CACHE_HOME, or FEDMUTUAL_DATA and place the files there)."
        ) from None

    for fname, (url, official) in files.items():
        if base_url is not None:
            url = base_url.rstrip("/") + "/" + fname
        expected = checksums.get(fname, official)
        use_content = fname not in checksums
        target = dest / fname
        if target.is_file() and _matches(target, key, fname, expected, use_content)[0]:
            continue
        fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=f".{fname}.", suffix=".part")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            _fetch(url, tmp, fname, key, dest, progress)
            ok, actual, content = _matches(tmp, key, fname, expected, use_content)
            if not ok:
                detail = ""
                if use_content and fname in CONTENT_SHA256.get(key, {}):
                    got = content if content is not None else "none (not a valid gzip file)"
                    detail = (
                        f" Its decompressed content does not match either: expected "
                        f"sha256 {CONTENT_SHA256[key][fname]}, got {got}."
                    )
                raise DataError(
                    f"{fname} downloaded from {url} is corrupt or incomplete: expected "
                    f"sha256 {expected}, got {actual}.{detail} The file was deleted; "
                    f"nothing was kept. Run the download again. {_manual(key, dest)}"
                )
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return dest
