"""The label heat map is a real PNG of the expected size."""

import struct

import numpy as np
import pytest

from fedmutual.errors import DataError
from fedmutual.report.heatmap import save_label_heatmap

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_small_table_with_class_names(tmp_path):
    table = np.array([[6000, 0, 0, 0, 6000, 0, 0, 0, 0, 0]] * 5)
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    p = tmp_path / "map.png"
    save_label_heatmap(table, p, classes, title="fashion-mnist · shards:2 · K=5")
    data = p.read_bytes()
    # figure size (2 + 0.6*10) x (1.5 + 0.35*5) inches at 100 dpi
    assert _png_size(data) == (800, 325)
    assert len(data) > 10_000


def test_large_table_without_annotations(tmp_path):
    rng = np.random.default_rng(0)
    table = rng.integers(0, 600, (100, 10))
    p = tmp_path / "big.png"
    save_label_heatmap(table, p)
    data = p.read_bytes()
    assert _png_size(data) == (800, 2400)  # height capped at 24 inches
    assert len(data) > 10_000


def test_counts_are_written_into_small_tables(tmp_path, monkeypatch):
    from fedmutual.report import heatmap

    table = np.array([[1, 2], [3, 4]])
    save_label_heatmap(table, tmp_path / "annotated.png")
    monkeypatch.setattr(heatmap, "ANNOTATE_MAX_CELLS", 0)
    save_label_heatmap(table, tmp_path / "plain.png")
    assert (tmp_path / "annotated.png").read_bytes() != (tmp_path / "plain.png").read_bytes()


def test_bad_input(tmp_path):
    with pytest.raises(DataError, match="3 class names given for a table with 2 classes"):
        save_label_heatmap(np.ones((2, 2)), tmp_path / "x.png", ["a", "b", "c"])
    with pytest.raises(DataError, match="must be a non-empty 2-D array \\[clients, classes\\], got shape \\(4,\\)"):
        save_label_heatmap(np.ones(4), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
