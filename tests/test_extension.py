"""Extending fedmutual from outside the package: an algorithm, a model and a dataset of a user's own.

``tests/plugins/mypkg`` stands for a user's package: ``mypkg.algos:FedAvgM`` (an algorithm with its own
``[fedavgm]`` settings table), ``mypkg.nets:TinyBN`` (a flat ``nn.Sequential`` with BatchNorm),
``mypkg.arrays:tiny_fmnist`` (a loader returning ``from_arrays`` of a slice of the real Fashion-MNIST) and
``mypkg.parts:label_skew`` (a partitioner with an argument). Configs name them by import string; the
command line runs them in a fresh process, whose ``config.json`` reruns them in another; ``compare``, the
isolation runtime and resume take them in process; and a dataset and a partition given from Python are
recorded truthfully and rerun from the record. Runs are tiny: 3 clients, 300 training and 100 test
images, 1 to 3 rounds, one thread.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fedmutual
from fedmutual import Config
from fedmutual.config import load_file, validate
from fedmutual.data import DATASETS, PARTITIONS, from_arrays
from fedmutual.errors import ConfigError
from fedmutual.models import MODELS
from fedmutual.protocol import Message, Replies, state_of
from fedmutual.registry import ALGORITHMS
from fedmutual.runtimes.inprocess import InProcess
from fedmutual.runtimes.isolated import Isolated

PLUGINS = Path(__file__).parent / "plugins"

ALGORITHM, MODEL, DATASET = "mypkg.algos:FedAvgM", "mypkg.nets:TinyBN", "mypkg.arrays:tiny_fmnist"

BASE = dict(algorithm=ALGORITHM, model=MODEL, dataset=DATASET, clients=3, rounds=2, partition="shards:2",
            batch_size=32, lr=0.05, seed=1, threads=1, checkpoint_every=0, progress=False)


@pytest.fixture(autouse=True)
def _user_package(monkeypatch):
    """``mypkg`` importable; whatever a test registers in the public registries is undone afterwards."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    registries = (ALGORITHMS, MODELS, DATASETS, PARTITIONS)
    for r in registries:
        r.names()  # loads the built-in entries first, so that they are part of what is restored
    saved = [(r, dict(r._entries)) for r in registries]
    yield
    for r, entries in saved:
        r._entries.clear()
        r._entries.update(entries)
    for name in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
        del sys.modules[name]  # the next import registers FedAvgM again


def _cfg(tmp_path: Path, **over) -> Config:
    return validate({**BASE, "out": str(tmp_path / "runs"), **over})


def _without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- the command line, in fresh processes


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLUGINS), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-m", "fedmutual", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _run_dir_of(out: str) -> Path:
    lines = [line for line in out.splitlines() if line.startswith("run directory: ")]
    assert len(lines) == 1, out
    return Path(lines[0].removeprefix("run directory: "))


def test_the_cli_runs_import_strings_and_their_config_json_reruns_in_a_fresh_process(tmp_path):
    toml = tmp_path / "mine.toml"
    toml.write_text(f"""\
algorithm = "{ALGORITHM}"
model = "{MODEL}"
dataset = "{DATASET}"
clients = 3
rounds = 2
partition = "shards:2"
batch_size = 32
lr = 0.05
seed = 1
threads = 1
checkpoint_every = 0
progress = false
out = "{tmp_path / 'runs'}"
name = "cli"

[fedavgm]
server_momentum = 0.9
""")
    first = _cli("run", "--config", str(toml), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = _run_dir_of(first.stdout)
    rows = _read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["global_acc"] is not None and math.isfinite(r["train_loss"]) for r in rows)
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in rows)
    recorded = json.loads((run_dir / "config.json").read_text())
    assert (recorded["algorithm"], recorded["model"], recorded["dataset"]) == (ALGORITHM, MODEL, DATASET)
    assert recorded["fedavgm"] == {"server_momentum": 0.9, "server_lr": 1.0}
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert json.loads((run_dir / "partition.json").read_text())["dataset"] == "tiny-fmnist"

    again = _cli("run", "--config", str(run_dir / "config.json"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun_dir = _run_dir_of(again.stdout)
    assert rerun_dir != run_dir
    assert _without_seconds(_read_metrics(rerun_dir)) == _without_seconds(rows)
    assert json.loads((rerun_dir / "config.json").read_text()) == recorded


# ---------------------------------------------------------------- the settings table


def test_the_algorithm_brings_its_own_settings_table(tmp_path):
    cfg = _cfg(tmp_path, fedavgm={"server_momentum": 0.5})
    assert cfg.algorithm == ALGORITHM and cfg.table("fedavgm").server_momentum == 0.5
    assert cfg.table("fedavgm").server_lr == 1.0
    with pytest.raises(ConfigError, match=r"fedavgm\.server_momentum: .*less than 1"):
        _cfg(tmp_path, fedavgm={"server_momentum": 1.5})
    with pytest.raises(ConfigError, match=r"fedavgm\.momentum: unknown key"):
        _cfg(tmp_path, fedavgm={"momentum": 0.5})
    # importing the module registered the class under its name, too
    assert validate({**BASE, "algorithm": "fedavgm"}).algorithm_class() is cfg.algorithm_class()


def test_registered_names_work_like_import_strings(tmp_path):
    from mypkg import arrays, nets

    fedmutual.register_model("tinybn", nets.TinyBN)
    arrays.register()
    cfg = _cfg(tmp_path, model="TinyBN", dataset="tiny_fmnist")
    assert (cfg.model, cfg.dataset) == ("tinybn", "tiny-fmnist")
    assert MODELS.get("tinybn") is nets.TinyBN and DATASETS.get("tiny-fmnist") is arrays.tiny_fmnist


def test_a_partitioner_by_import_string_with_an_argument_and_by_name(tmp_path):
    from fedmutual.experiment.data import prepare_data
    from mypkg.parts import label_skew

    data = prepare_data(_cfg(tmp_path, partition="mypkg.parts:label_skew:2"))
    y = data.train_y.numpy()
    held = [sorted(set(y[p].tolist())) for p in data.parts]
    assert held == [[0, 1], [2, 3], [4, 5]]  # classes 6..9 are nobody's
    assert sum(len(p) for p in data.parts) == int(np.isin(y, range(6)).sum())
    fedmutual.register_partition("label-skew", label_skew)
    again = prepare_data(_cfg(tmp_path, partition="label_skew:2"))
    assert all(np.array_equal(a, b) for a, b in zip(again.parts, data.parts))
    with pytest.raises(ValueError, match="built-in partition"):
        fedmutual.register_partition("shards", label_skew)


# ---------------------------------------------------------------- the round, driven by hand


def test_the_server_update_is_fedavgm_by_hand(tmp_path):
    """The coordinator's round is a generator: fed replies by hand, it applies momentum as the paper says."""
    from fedmutual.experiment.runner import build

    alg = build(_cfg(tmp_path, fedavgm={"server_momentum": 0.9, "server_lr": 0.5}), log=lambda m: None).alg
    server = alg.init_server()
    params = {n for n, _ in server.global_.named_parameters()}

    def one_round(t: int, shifts: dict[int, float], samples: dict[int, int]) -> tuple[dict, dict]:
        before = {n: v.clone() for n, v in state_of(server.global_).items()}
        gen = alg.round(t, server, [0, 1, 2])
        ask = next(gen)
        assert ask.kind == "train.global" and ask.gather and sorted(ask.to) == [0, 1, 2]
        assert ask.like is not None and set(ask.like) == set(before)
        replies = Replies({k: Message({n: v + shifts[k] if v.is_floating_point() else v for n, v in before.items()},
                                      {"num_samples": str(samples[k])}) for k in shifts})
        with pytest.raises(StopIteration) as stop:
            gen.send(replies)
        assert set(stop.value.value) == {"train_loss"}
        return before, state_of(server.global_)

    # round 1: the mean shift is (1·0.1 + 3·0.5)/4 = 0.4, so v = -0.4 and global += 0.5·0.4
    before, after = one_round(0, {0: 0.1, 2: 0.5}, {0: 1, 2: 3})
    for n, v in after.items():
        if not v.is_floating_point():
            assert torch.equal(v, before[n])
        elif n in params:
            assert torch.allclose(v, before[n] + 0.2, atol=1e-6) and torch.allclose(server.velocity[n], torch.full_like(v, -0.4))
        else:  # BatchNorm statistics: the average itself
            assert torch.allclose(v, before[n] + 0.4, atol=1e-6)
    # round 2: another mean shift of 0.4: v = 0.9·(-0.4) - 0.4 = -0.76, global += 0.5·0.76
    before, after = one_round(1, {0: 0.4, 1: 0.4}, {0: 5, 1: 7})
    for n in params:
        assert torch.allclose(after[n], before[n] + 0.38, atol=1e-6)
    # a round without replies (skipped by the runtime) changes nothing
    velocity = {n: v.clone() for n, v in server.velocity.items()}
    before, after = one_round(2, {}, {})
    assert all(torch.equal(after[n], before[n]) for n in after)
    assert all(torch.equal(server.velocity[n], velocity[n]) for n in velocity)


# ---------------------------------------------------------------- in process: compare and the isolation runtime


def test_compare_runs_a_builtin_and_an_import_string_side_by_side(tmp_path):
    """With no server momentum and a server learning rate of 1, FedAvgM is FedAvg (up to rounding)."""
    cfg = _cfg(tmp_path, fedavgm={"server_momentum": 0.0}, name="cmp")
    result = fedmutual.compare(cfg, ["fedavg", ALGORITHM], quiet=True)
    assert list(result.runs) == ["fedavg", ALGORITHM]
    assert ALGORITHM in result.table and "fedavg" in result.table
    assert (result.out_dir / "compare.md").is_file() and (result.out_dir / "compare.png").is_file()
    plain, mine = (result.runs[a].metrics for a in ("fedavg", ALGORITHM))
    assert [r["round"] for r in mine] == [1, 2]
    assert json.loads((result.runs[ALGORITHM].run_dir / "config.json").read_text())["algorithm"] == ALGORITHM
    for a, b in zip(plain, mine):
        assert a["bytes_up"] == b["bytes_up"] and a["bytes_down"] == b["bytes_down"]
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert abs(b["global_acc"] - a["global_acc"]) <= 0.02


def test_the_new_algorithm_runs_the_same_with_nothing_shared_between_parties(tmp_path):
    """Server momentum is server state: it must survive being serialized between every call."""
    from fedmutual.experiment.runner import run

    cfg = dict(BASE, out=str(tmp_path / "runs"), rounds=3, faults={"crash": 0.3})
    alone = run(validate({**cfg, "name": "isolated"}), quiet=True, runtime=Isolated)
    shared = run(validate({**cfg, "name": "in-process"}), quiet=True, runtime=InProcess)
    assert _without_seconds(alone.metrics) == _without_seconds(shared.metrics)
    assert any(r["faults"]["crashed"] for r in shared.metrics)  # the scenario does exercise a crash


def test_an_interrupted_run_of_the_new_algorithm_resumes_to_the_uninterrupted_metrics(tmp_path):
    """The server's momentum is part of its checkpointed state: without it round 3 would differ."""
    from fedmutual.experiment.runner import resume, run

    cfg = _cfg(tmp_path, rounds=3, checkpoint_every=1)
    full = run(cfg.model_copy(update={"name": "full"}), quiet=True)
    base = ALGORITHMS.get(ALGORITHM)

    class Interrupted(base):  # type: ignore[misc, valid-type]
        def round(self, t, state, clients):
            out = yield from super().round(t, state, clients)
            if t == 2:
                raise KeyboardInterrupt  # as Ctrl-C after round 3's training, before its metrics
            return out

    ALGORITHMS._entries[ALGORITHM] = Interrupted  # the import string now names the interrupted class
    try:
        with pytest.raises(KeyboardInterrupt):
            run(cfg.model_copy(update={"name": "cut"}), quiet=True)
    finally:
        ALGORITHMS._entries[ALGORITHM] = base
    cut = tmp_path / "runs" / "cut"
    assert json.loads((cut / "summary.json").read_text())["status"] == "interrupted"
    state = json.loads((cut / "checkpoints" / "round-000002" / "state.json").read_text())
    assert set(state["parties"]) == {"server", "client0", "client1", "client2"} and "velocity" in state["parties"]["server"]
    again = resume(cut, quiet=True)
    assert again.summary["status"] == "completed"
    assert _without_seconds(_read_metrics(cut)) == _without_seconds(full.metrics)


def test_fml_with_a_partial_global_model_of_a_batchnorm_model_runs_stacked(tmp_path):
    from fedmutual.experiment.runner import run

    # at BASE's lr of 0.05 this BatchNorm net's loss grows, and float rounding is amplified chaotically (plain
    # local training alone moved 1.5e-4 between the engines); the stable lr of 0.01 compares the arithmetic
    cfg = dict(BASE, out=str(tmp_path / "runs"), algorithm="fml", global_model=f"{MODEL}:encoder", rounds=1, lr=0.01)
    loop = run(validate({**cfg, "engine": "loop", "name": "loop"}), quiet=True).metrics
    stacked = run(validate({**cfg, "engine": "stacked", "name": "stacked"}), quiet=True).metrics
    assert stacked[0]["train_loss_local"] == pytest.approx(loop[0]["train_loss_local"], rel=1e-4)
    assert stacked[0]["train_loss_meme"] == pytest.approx(loop[0]["train_loss_meme"], rel=1e-4)
    assert all(abs(a - b) <= 0.02 for a, b in zip(stacked[0]["personal_acc"], loop[0]["personal_acc"]))


# ---------------------------------------------------------------- data and a partition given from Python


def test_data_and_a_partition_from_python_are_recorded_and_rerun(tmp_path):
    from mypkg.arrays import raw

    ds = from_arrays(*raw(), name="fmnist-slice")
    given = [np.arange(0, 300, 3), np.arange(1, 300, 3)[:60], np.array([2, 5, 8, 11, 14, 17, 20, 299])]
    cfg = _cfg(tmp_path, partition="iid", name="given")
    first = fedmutual.run(cfg, quiet=True, data=ds, partition=given)
    run_dir = first.run_dir
    recorded = json.loads((run_dir / "config.json").read_text())
    assert recorded["dataset"] == "fmnist-slice"
    assert recorded["partition"] == f"indices:{(run_dir / 'partition.json').resolve()}"
    part = json.loads((run_dir / "partition.json").read_text())
    assert part["partition"] == "explicit" and part["dataset"] == "fmnist-slice"
    assert part["source"] == ds.source and part["fingerprint"] == ds.fingerprint
    assert part["assigned"] == part["train"] == [sorted(g.tolist()) for g in given]
    assert part["train_sizes"] == [100, 60, 8]
    assert [r["round"] for r in first.metrics] == [1, 2]

    again = fedmutual.run(validate(load_file(run_dir / "config.json")), quiet=True)
    assert again.run_dir != run_dir
    assert _without_seconds(again.metrics) == _without_seconds(first.metrics)
    part2 = json.loads((again.run_dir / "partition.json").read_text())
    assert part2["train"] == part["train"] and part2["val"] == part["val"] and part2["fingerprint"] == ds.fingerprint


def test_every_config_json_of_a_compare_with_a_plugin_reruns_in_a_fresh_process(tmp_path):
    cfg = _cfg(tmp_path, rounds=1, name="cmp")
    result = fedmutual.compare(cfg, ["fedavg", ALGORITHM], quiet=True)
    run_dir = result.runs["fedavg"].run_dir
    again = _cli("run", "--config", str(run_dir / "config.json"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _without_seconds(_read_metrics(_run_dir_of(again.stdout))) == _without_seconds(result.runs["fedavg"].metrics)
