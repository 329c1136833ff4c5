"""The command line as a user meets it: exit codes and messages."""

import json
import os
import subprocess
import sys

import pytest

from fedmutual.cli import main


def fedmutual(*args, env=None, cwd=None):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "fedmutual", *args], capture_output=True, text=True, env=e, cwd=cwd, timeout=300)


def test_invalid_value_exits_2_with_one_plain_message():
    r = fedmutual("run", "--algorithm", "fedsgd")
    assert r.returncode == 2
    assert "algorithm: unknown algorithm 'fedsgd'; allowed: fedavg, fedprox, local, " in r.stderr
    assert r.stderr.startswith("fedmutual: error: ") and "Traceback" not in r.stderr


def test_unknown_key_exits_2():
    r = fedmutual("run", "--set", "fml.gamma=3")
    assert r.returncode == 2 and "fml.gamma: unknown key" in r.stderr and "Traceback" not in r.stderr


def test_missing_dataset_names_every_place_and_how_to_get_it(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = fedmutual("run", "--dataset", "mnist", "--data-dir", str(empty),
                  env={"FEDMUTUAL_DATA": str(tmp_path / "nowhere"), "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert str(empty) in r.stderr and str(tmp_path / "nowhere") in r.stderr and str(tmp_path / "cache") in r.stderr
    assert "--download" in r.stderr or "download" in r.stderr.lower()


def test_debug_shows_the_traceback():
    r = fedmutual("--debug", "run", "--algorithm", "fedsgd")
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_run_and_compare_write_their_files(tmp_path):
    common = ["--clients", "3", "--limit-train", "900", "--limit-test", "300", "--rounds", "1", "--out", str(tmp_path), "--no-progress"]
    r = fedmutual("run", *common, "--name", "one")
    assert r.returncode == 0, r.stderr
    assert f"run directory: {tmp_path / 'one'}" in r.stdout
    assert json.loads((tmp_path / "one" / "config.json").read_text())["clients"] == 3
    r = fedmutual("compare", "--algorithms", "fedavg,fml", *common, "--name", "cmp")
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| fedavg |" in md and "| fml |" in md
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000


def test_partition_prints_the_label_table_and_saves_a_heat_map(tmp_path):
    png = tmp_path / "p.png"
    r = fedmutual("partition", "--partition", "shards:2", "--clients", "5", "--png", str(png))
    assert r.returncode == 0, r.stderr
    assert "shards:2" in r.stdout and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_fml_with_independent_writes_per_client_results(tmp_path):
    r = fedmutual("compare", "--algorithms", "fml,independent", "--clients", "2", "--model", "mlp,lenet5", "--global-model", "lenet5",
                  "--partition", "iid", "--limit-train", "600", "--limit-test", "300", "--rounds", "2", "--threads", "1",
                  "--out", str(tmp_path), "--name", "mh", "--no-progress")
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "mh" / "compare.md").read_text()
    fml = [json.loads(line) for line in (tmp_path / "mh" / "fml" / "metrics.jsonl").read_text().splitlines()]
    alone = [json.loads(line) for line in (tmp_path / "mh" / "independent" / "metrics.jsonl").read_text().splitlines()]
    best = lambda rows, k: max(r["personal_acc"][k] for r in rows)  # noqa: E731
    row = f"| 1: lenet5 | {100 * best(fml, 1):.2f} | {100 * fml[-1]['personal_acc'][1]:.2f} | {100 * best(alone, 1):.2f} |"
    assert row in md, md
    for name in ("clients.png", "clients-curves.png"):
        assert (tmp_path / "mh" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same report from the two run directories
    r = fedmutual("clients", str(tmp_path / "mh" / "fml"), str(tmp_path / "mh" / "independent"), "--out", str(tmp_path / "again"))
    assert r.returncode == 0, r.stderr
    assert row in (tmp_path / "again" / "clients.md").read_text() and (tmp_path / "again" / "clients.png").is_file()
    r = fedmutual("clients", str(tmp_path / "nothing"), str(tmp_path / "mh" / "fml"))
    assert r.returncode == 2 and "not a run directory" in r.stderr


def test_heterogeneous_models_without_a_global_model_exit_2_and_write_nothing(tmp_path):
    r = fedmutual("run", "--algorithm", "fml", "--model", "mlp,lenet5", "--limit-train", "100", "--limit-test", "50", "--rounds", "1",
                  "--no-progress", "--out", str(tmp_path / "runs"))
    assert r.returncode == 2 and "global_model: fml needs a global model" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()


def test_moved_setting_exits_2_saying_where_it_went():
    r = fedmutual("run", "--algorithm", "dmlfl", "--set", "dmlfl.public_size=500")
    assert r.returncode == 2 and "dmlfl.public_size: this setting moved to public.size" in r.stderr and "Traceback" not in r.stderr


def test_an_os_error_exits_2_with_one_plain_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    r = fedmutual("run", "--limit-train", "100", "--limit-test", "50", "--rounds", "1", "--model", "mlp", "--no-progress",
                  "--out", str(blocker))
    assert r.returncode == 2, r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith("fedmutual: error: NotADirectoryError: ") and str(blocker) in line
    r = fedmutual("--debug", "run", "--limit-train", "100", "--limit-test", "50", "--rounds", "1", "--model", "mlp", "--no-progress",
                  "--out", str(blocker))
    assert r.returncode == 2 and "Traceback" in r.stderr and r.stderr.splitlines()[-1].startswith("fedmutual: error: NotADirectoryError")


@pytest.mark.parametrize("debug", [False, True])
def test_a_failed_checkpoint_write_exits_2_and_the_summary_records_it(tmp_path, capsys, monkeypatch, debug):
    from fedmutual.experiment import checkpoint

    real = checkpoint.write

    def write(directory, rounds_done, *args, **kwargs):
        if rounds_done == 2:
            raise OSError(28, "No space left on device")
        return real(directory, rounds_done, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "write", write)
    code = main([*(["--debug"] if debug else []), "run", "--clients", "3", "--limit-train", "300", "--limit-test", "100", "--rounds", "3",
                 "--model", "mlp", "--threads", "1", "--no-progress", "--out", str(tmp_path), "--name", "disk"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "fedmutual: error: OSError: [Errno 28] No space left on device\n" in err
    assert ("Traceback" in err) == debug
    summary = json.loads((tmp_path / "disk" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "OSError: [Errno 28] No space left on device"
    rows = [json.loads(line) for line in (tmp_path / "disk" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["round"] == 1 and rows[0]["global_acc"] is not None
    assert [p.name for p in (tmp_path / "disk" / "checkpoints").iterdir()] == ["round-000001"]


def test_a_bug_keeps_its_traceback(tmp_path, capsys, monkeypatch):
    """Exceptions that are neither fedmutual's errors nor the machine's are bugs: they propagate with their traceback."""
    from fedmutual.experiment import runner

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(runner, "evaluate", broken)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        main(["run", "--clients", "2", "--limit-train", "100", "--limit-test", "50", "--rounds", "1", "--model", "mlp",
              "--threads", "1", "--no-progress", "--out", str(tmp_path), "--name", "bug"])
    summary = json.loads((tmp_path / "bug" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "ZeroDivisionError: a bug"
