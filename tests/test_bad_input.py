"""Bad input anywhere: one plain message, exit status 2, no traceback, and no run directory half-written."""

import gzip
from pathlib import Path

import numpy as np
import pytest

from fedmutual.cli import main
from fedmutual.data import write_idx


def make_set(d: Path, n_train=20, n_test=10, train_labels=None) -> Path:
    """A small dataset in the MNIST file layout (gzipped), 8x8 images, 10 classes."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y = np.arange(n_train) % 10 if train_labels is None else np.asarray(train_labels)
    write_idx(d / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, 8, 8), dtype=np.uint8), gzip=True)
    write_idx(d / "train-labels-idx1-ubyte.gz", y.astype(np.uint8), gzip=True)
    write_idx(d / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (n_test, 8, 8), dtype=np.uint8), gzip=True)
    write_idx(d / "t10k-labels-idx1-ubyte.gz", (np.arange(n_test) % 10).astype(np.uint8), gzip=True)
    return d


@pytest.fixture(autouse=True)
def _no_user_data(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDMUTUAL_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def refused(capsys, tmp_path, *args) -> str:
    """Run the CLI; assert exit 2, no traceback and nothing written; return the error text."""
    out = tmp_path / "runs"
    code = main(["run", "--no-progress", "--threads", "1", "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("fedmutual: error: ") and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir()), "a refused run left files behind"
    return err


def test_truncated_dataset_file(tmp_path, capsys):
    d = make_set(tmp_path / "d")
    p = d / "train-images-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-7]))
    err = refused(capsys, tmp_path, "--dataset", "idx", "--data-dir", str(d))
    assert f"{p} is truncated: the header declares shape (20, 8, 8) of uint8 (1280 data bytes) but only 1273 data bytes follow" in err


def test_truncated_gzip_stream(tmp_path, capsys):
    d = make_set(tmp_path / "d")
    p = d / "t10k-labels-idx1-ubyte.gz"
    p.write_bytes(p.read_bytes()[:-12])
    err = refused(capsys, tmp_path, "--dataset", "idx", "--data-dir", str(d))
    assert f"{p} is a truncated gzip file (the compressed stream ends early)" in err


def test_unreadable_dataset_file(tmp_path, capsys):
    d = make_set(tmp_path / "d")
    p = d / "train-labels-idx1-ubyte.gz"
    p.write_bytes(b"\x1f\x8b" + b"\x00" * 30)  # a gzip header followed by garbage
    err = refused(capsys, tmp_path, "--dataset", "idx", "--data-dir", str(d))
    assert f"{p} is a corrupt gzip file" in err


def test_wrong_magic(tmp_path, capsys):
    d = make_set(tmp_path / "d")
    p = d / "t10k-images-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(b"\x08\x03" + gzip.decompress(p.read_bytes())[2:]))
    err = refused(capsys, tmp_path, "--dataset", "idx", "--data-dir", str(d))
    assert f"{p} is not an IDX file: its magic number starts with bytes 0x08 0x03, expected 0x00 0x00" in err


def test_label_outside_the_class_range(tmp_path, capsys):
    labels = np.arange(20) % 10
    labels[3] = 12
    d = make_set(tmp_path / "d", train_labels=labels)
    err = refused(capsys, tmp_path, "--dataset", "fashion-mnist", "--data-dir", str(d))
    assert "train-labels-idx1-ubyte.gz contains the label 12, but fashion-mnist has 10 classes (labels 0..9)" in err


def test_shards_that_would_leave_clients_empty(tmp_path, capsys):
    d = make_set(tmp_path / "d")
    err = refused(capsys, tmp_path, "--dataset", "idx", "--data-dir", str(d), "--clients", "12", "--partition", "shards:2")
    assert ("partition 'shards:2' with 12 clients needs 24 shards, but there are only 20 training samples "
            "(each shard needs at least one). Use fewer clients or fewer shards per client.") in err


def test_dirichlet_that_leaves_clients_nearly_empty(tmp_path, capsys):
    d = make_set(tmp_path / "d", n_train=40)
    err = refused(capsys, tmp_path, "--dataset", "idx", "--data-dir", str(d), "--clients", "10", "--partition", "dirichlet:0.01")
    assert "dirichlet:0.01 could not give each of the 10 clients at least 4 samples" in err and "Use fewer clients" in err


def test_more_clients_than_samples(tmp_path, capsys):
    d = make_set(tmp_path / "d")
    err = refused(capsys, tmp_path, "--dataset", "idx", "--data-dir", str(d), "--clients", "30", "--partition", "iid")
    assert "clients: 30 clients but only 20 training samples; use fewer clients or more data" in err
    err = refused(capsys, tmp_path, "--clients", "8", "--limit-train", "5")
    assert "clients: 8 clients but limit_train is 5; every client needs at least one sample" in err


@pytest.mark.parametrize("args, message", [
    (["--lr", "0"], "lr: Input should be greater than 0 (got 0.0)"),
    (["--lr", "-0.1"], "lr: Input should be greater than 0 (got -0.1)"),
    (["--rounds", "0"], "rounds: Input should be greater than or equal to 1 (got 0)"),
    (["--batch-size", "0"], "batch_size: Input should be greater than or equal to 1 (got 0)"),
    (["--set", "faults.dropout=1.5"], "faults.dropout: Input should be less than or equal to 1 (got 1.5)"),
    (["--set", "aggregation.trim=0.5"], "aggregation.trim: Input should be less than 0.5 (got 0.5)"),
    (["--set", "aggregation.rule=mode"], "aggregation.rule: invalid value 'mode'; allowed: 'mean', 'median' or 'trimmed_mean'"),
    (["--set", "attack.kind=flip"], "attack.kind: invalid value 'flip'; allowed:"),
    (["--clients", "5", "--set", "attack.clients=[1, 7]"], "attack.clients: [7] are not clients; allowed: 0..4"),
    (["--clients", "5", "--set", "faults.min_replies=6"], "faults.min_replies: 6, but at most 5 clients take part in a round"),
    (["--clients", "10", "--set", "sample_fraction=0.2", "--set", "faults.min_replies=3"],
     "faults.min_replies: 3, but at most 2 clients take part in a round (10 clients, sample_fraction 0.2)"),
    (["--checkpoint-every", "-1"], "checkpoint_every: Input should be greater than or equal to 0 (got -1)"),
    (["--set", "fml.alpha=1.5"], "fml.alpha.value: Input should be less than or equal to 1 (got 1.5)"),
    (["--set", "fedavg.weighting=equal"], "fedavg.weighting: invalid value 'equal'; allowed: 'samples' or 'uniform'"),
    (["--set", "dmlfl.public_size=100"], "dmlfl.public_size: this setting moved to public.size"),
    (["--set", "public.size=0"], "public.size: Input should be greater than or equal to 1 (got 0)"),
    (["--algorithm", "fedsgd"], "algorithm: unknown algorithm 'fedsgd'; allowed: fedavg, fedprox, local, "),
])
def test_numbers_that_make_no_sense(tmp_path, capsys, args, message):
    assert message in refused(capsys, tmp_path, *args)


def test_refusals_found_after_loading_write_nothing(tmp_path, capsys):
    d = make_set(tmp_path / "d")
    err = refused(capsys, tmp_path, "--dataset", "idx", "--data-dir", str(d), "--clients", "2", "--partition", "iid",
                  "--algorithm", "fedavg", "--model", "mlp,lenet5")
    assert "model: fedavg averages weights, so every client needs the same architecture" in err
    err = refused(capsys, tmp_path, "--dataset", "idx", "--data-dir", str(d), "--clients", "2", "--partition", "iid",
                  "--model", "mlp", "--set", "attack.kind=constant_label", "--set", "attack.label=10")
    assert "attack.label: 10, but the task has 10 classes (labels 0..9)" in err


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path), "--rounds", "3", "--set", "lr=0.1"]) == 2
    err = capsys.readouterr().err
    assert f"--resume continues a run with the config in {tmp_path}/config.json; drop --rounds, --set" in err
