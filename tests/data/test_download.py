"""Downloads from a real local HTTP server: good, corrupt, truncated, cut off, missing."""

import functools
import hashlib
import shutil
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from fedmutual.data import DOWNLOADS, download_dataset, load_dataset, write_idx
from fedmutual.data import datasets as datasets_module
from fedmutual.data import download as download_module
from fedmutual.errors import ConfigError, DataError

FASHION = Path("/usr/share/datasets/fashion-mnist")
FILES = list(DOWNLOADS["fashion-mnist"])


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class _CutOffHandler(_QuietHandler):
    """Announces 1000 bytes, sends 10, then closes the connection."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"0123456789")
        self.wfile.flush()
        self.close_connection = True


def _serve(root: Path, handler=_QuietHandler):
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    server, url = _serve(root)
    yield root, url
    server.shutdown()
    server.server_close()


def _small_files(root: Path) -> dict[str, str]:
    """Four tiny IDX files under the Fashion-MNIST names; returns their sha256."""
    rng = np.random.default_rng(0)
    write_idx(root / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (30, 4, 4), dtype=np.uint8), gzip=True)
    write_idx(root / "train-labels-idx1-ubyte.gz", (np.arange(30) % 10).astype(np.uint8), gzip=True)
    write_idx(root / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (10, 4, 4), dtype=np.uint8), gzip=True)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", (np.arange(10) % 10).astype(np.uint8), gzip=True)
    return {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in FILES}


def _leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir()) if dest.exists() else []


def test_pinned_urls_are_the_official_ones():
    host = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
    assert FILES == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                     "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    for f, (url, sha) in DOWNLOADS["fashion-mnist"].items():
        assert url == host + f
        assert len(sha) == 64 and int(sha, 16) >= 0


def test_good_download(served, tmp_path):
    root, url = served
    sums = _small_files(root)
    dest = tmp_path / "dest"
    assert download_dataset("fashion-mnist", dest, base_url=url, checksums=sums, progress=False) == dest
    assert _leftovers(dest) == sorted(FILES)
    for f in FILES:
        assert (dest / f).read_bytes() == (root / f).read_bytes()
    ds = load_dataset("idx", dest)
    assert len(ds.train_y) == 30 and len(ds.test_y) == 10


def test_progress_goes_to_stderr(served, tmp_path, capsys):
    root, url = served
    sums = _small_files(root)
    download_dataset("fashion-mnist", tmp_path / "dest", base_url=url, checksums=sums, progress=True)
    captured = capsys.readouterr()
    assert "train-images-idx3-ubyte.gz" in captured.err
    assert captured.out == ""


def test_real_fashion_mnist_files_pass_the_pinned_checksums(served, tmp_path):
    root, url = served
    for f in FILES:
        shutil.copy(FASHION / f, root / f)
    dest = tmp_path / "dest"
    download_dataset("fashion-mnist", dest, base_url=url, progress=False)
    assert _leftovers(dest) == sorted(FILES)
    ds = load_dataset("fashion-mnist", dest)
    assert ds.source == str(dest)
    assert len(ds.train_y) == 60000 and int(ds.train_y[0]) == 9


def test_load_dataset_downloads_into_the_cache(served, tmp_path, monkeypatch):
    root, url = served
    for f in FILES:
        shutil.copy(FASHION / f, root / f)
    monkeypatch.delenv("FEDMUTUAL_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(datasets_module.SYSTEM_DIRS, "fashion-mnist", tmp_path / "not-installed")
    mirror = {f: (f"{url}/{f}", sha) for f, (_, sha) in DOWNLOADS["fashion-mnist"].items()}
    monkeypatch.setitem(download_module.DOWNLOADS, "fashion-mnist", mirror)
    with pytest.raises(DataError, match="dataset fashion-mnist not found"):
        load_dataset("fashion-mnist")
    ds = load_dataset("fashion-mnist", download=True)
    assert ds.source == str(tmp_path / "cache" / "fedmutual" / "fashion-mnist")
    assert ds.train_x.shape == (60000, 1, 28, 28)


def test_corrupted_file_is_deleted_and_named(served, tmp_path):
    root, url = served
    sums = _small_files(root)
    data = bytearray((root / "t10k-images-idx3-ubyte.gz").read_bytes())
    data[-12] ^= 0x55
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()
    dest = tmp_path / "dest"
    with pytest.raises(DataError) as e:
        download_dataset("fashion-mnist", dest, base_url=url, checksums=sums, progress=False)
    msg = str(e.value)
    assert (f"t10k-images-idx3-ubyte.gz downloaded from {url}/t10k-images-idx3-ubyte.gz is corrupt or "
            f"incomplete: expected sha256 {sums['t10k-images-idx3-ubyte.gz']}, got {actual}.") in msg
    assert "The file was deleted; nothing was kept." in msg
    assert "sudo apt-get install dataset-fashion-mnist" in msg
    # the files before it were verified and kept; no partial file is left
    assert _leftovers(dest) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]


def test_truncated_file_against_the_pinned_checksums(served, tmp_path):
    """With the pinned checksums, the decompressed content is checked as well."""
    root, url = served
    _small_files(root)
    data = (root / "train-images-idx3-ubyte.gz").read_bytes()
    (root / "train-images-idx3-ubyte.gz").write_bytes(data[: len(data) // 2])
    dest = tmp_path / "dest"
    with pytest.raises(DataError) as e:
        download_dataset("fashion-mnist", dest, base_url=url, progress=False)
    msg = str(e.value)
    official = DOWNLOADS["fashion-mnist"]["train-images-idx3-ubyte.gz"][1]
    assert f"expected sha256 {official}, got {hashlib.sha256(data[: len(data) // 2]).hexdigest()}" in msg
    assert "Its decompressed content does not match either" in msg
    assert "got none (not a valid gzip file)" in msg
    assert _leftovers(dest) == []


def test_connection_cut_short(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    server, url = _serve(root, _CutOffHandler)
    try:
        with pytest.raises(DataError) as e:
            download_dataset("fashion-mnist", tmp_path / "dest", base_url=url, progress=False)
    finally:
        server.shutdown()
        server.server_close()
    msg = str(e.value)
    assert f"downloading train-images-idx3-ubyte.gz from {url}/train-images-idx3-ubyte.gz failed" in msg
    assert "cut short" in msg and "nothing was kept" in msg
    assert _leftovers(tmp_path / "dest") == []


def test_404_names_the_url_and_the_alternatives(served, tmp_path):
    root, url = served
    with pytest.raises(DataError) as e:
        download_dataset("fashion-mnist", tmp_path / "dest", base_url=url + "/", progress=False)
    msg = str(e.value)
    assert f"downloading train-images-idx3-ubyte.gz from {url}/train-images-idx3-ubyte.gz failed: HTTP 404" in msg
    assert "sudo apt-get install dataset-fashion-mnist" in msg
    assert "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/" in msg
    assert _leftovers(tmp_path / "dest") == []


def test_connection_refused(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(DataError) as e:
        download_dataset("fashion-mnist", tmp_path / "dest", base_url=url, progress=False)
    msg = str(e.value)
    assert f"from {url}/train-images-idx3-ubyte.gz failed: " in msg and "Connection refused" in msg
    assert "Check the network connection" in msg


def test_valid_files_already_there_are_kept_and_bad_ones_replaced(served, tmp_path):
    root, url = served
    sums = _small_files(root)
    dest = tmp_path / "dest"
    dest.mkdir()
    shutil.copy(root / "train-images-idx3-ubyte.gz", dest)
    (dest / "t10k-labels-idx1-ubyte.gz").write_bytes(b"stale")
    (root / "train-images-idx3-ubyte.gz").unlink()  # would be a 404 if it were fetched again
    download_dataset("fashion-mnist", dest, base_url=url, checksums=sums, progress=False)
    assert (dest / "t10k-labels-idx1-ubyte.gz").read_bytes() == (root / "t10k-labels-idx1-ubyte.gz").read_bytes()
    assert _leftovers(dest) == sorted(FILES)


def test_only_fashion_mnist_is_downloadable(tmp_path):
    with pytest.raises(DataError, match="fedmutual cannot download 'cifar10'; it can download only: fashion-mnist. "
                                        "Get cifar10 from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"):
        download_dataset("cifar10", tmp_path)


def test_checksums_for_unknown_files_are_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="checksums given for train-images.gz, which fashion-mnist does not have"):
        download_dataset("fashion-mnist", tmp_path, checksums={"train-images.gz": "0" * 64})
