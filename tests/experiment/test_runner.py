"""End-to-end runs on a real Fashion-MNIST subset."""

import dataclasses
import json

import pytest
import torch

from fedmutual.algorithms import FedAvg
from fedmutual.config import Config
from fedmutual.errors import NonFiniteLossError
from fedmutual.experiment.data import client_data, client_tasks, prepare_data
from fedmutual.experiment.runner import build, evaluate, run
from fedmutual.protocol import sample_participants
from fedmutual.registry import ALGORITHMS
from fedmutual.report.metrics import read_metrics

QUICK = dict(clients=5, limit_train=2500, limit_test=1000, rounds=2, progress=False)


def _replace_algorithm(monkeypatch, name, cls):
    """Make the registry's ``name`` resolve to ``cls`` for one test."""
    ALGORITHMS.names()  # the built-in algorithms are registered before one is replaced
    monkeypatch.setitem(ALGORITHMS._entries, name, cls)


def _without_timing(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_fml_learns_on_real_fashion_mnist(tmp_path):
    # 5 clients with 1,000 samples each; chance is 10%
    res = run(Config(algorithm="fml", partition="iid", clients=5, limit_train=5000, limit_test=2000,
                     rounds=3, local_epochs=3, batch_size=32, lr=0.03, out=str(tmp_path), progress=False), quiet=True)
    assert res.metrics[-1]["global_acc"] >= 0.70, res.metrics
    assert res.metrics[-1]["personal_acc_mean"] >= 0.65
    files = {p.name for p in res.run_dir.iterdir()}
    assert {"config.json", "metrics.jsonl", "summary.json", "accuracy.png", "partition.json"} <= files
    rows = read_metrics(res.run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3]
    for key in ("global_acc", "client_acc_global_test", "personal_acc", "bytes_up", "bytes_down", "seconds"):
        assert key in rows[0]
    assert len(rows[0]["client_acc_global_test"]) == 5 and len(rows[0]["personal_acc"]) == 5
    summary = json.loads((res.run_dir / "summary.json").read_text())
    assert summary["final_global_acc"] == rows[-1]["global_acc"]
    assert summary["best_global_acc"] == max(r["global_acc"] for r in rows)
    assert summary["status"] == "completed" and "error" not in summary


def test_bytes_are_the_serialized_model_size(tmp_path):
    res = run(Config(algorithm="fedavg", out=str(tmp_path), **QUICK), quiet=True)
    n_params = 61706  # LeNet5 on 1x28x28, 10 classes
    row = res.metrics[0]
    for up, down in zip(row["bytes_up_per_client"], row["bytes_down_per_client"]):
        assert 4 * n_params < up < 4 * n_params + 2048  # float32 payload plus the safetensors header
        assert 4 * n_params < down < 4 * n_params + 2048
    assert row["bytes_up"] == sum(row["bytes_up_per_client"])
    local = run(Config(algorithm="local", out=str(tmp_path), **QUICK), quiet=True)
    assert local.metrics[0]["bytes_up"] == 0 and local.metrics[0]["global_acc"] is None


def test_same_seed_same_metrics_and_rerun_from_config_json(tmp_path):
    cfg = Config(algorithm="fml", partition="dirichlet:0.5", out=str(tmp_path), **{**QUICK, "limit_train": 1000, "limit_test": 500})
    a, b = run(cfg, quiet=True), run(cfg, quiet=True)
    assert _without_timing(a.metrics) == _without_timing(b.metrics)
    again = run(Config.model_validate_json((a.run_dir / "config.json").read_text()), quiet=True)
    assert _without_timing(again.metrics) == _without_timing(a.metrics)
    other = run(cfg.model_copy(update={"seed": 1}), quiet=True)
    assert _without_timing(other.metrics) != _without_timing(a.metrics)


def test_client_sampling_is_seeded_and_partial():
    cfg = Config(clients=10, sample_fraction=0.3, seed=3)
    draws = [sample_participants(cfg, t) for t in range(5)]
    assert all(len(d) == 3 and len(set(d)) == 3 for d in draws)
    assert draws == [sample_participants(cfg, t) for t in range(5)]
    assert len({tuple(d) for d in draws}) > 1


def test_nan_loss_stops_cleanly_and_keeps_metrics(tmp_path, monkeypatch):
    class Poisoned(FedAvg):
        def train(self, me, msg, env):
            if env.round == 1 and env.k == 2:
                env.data.x[0] = float("nan")  # client 2's own data turns bad in round 2
            return super().train(me, msg, env)

    _replace_algorithm(monkeypatch, "fedavg", Poisoned)
    with pytest.raises(NonFiniteLossError, match="client 2 in round 2"):
        run(Config(algorithm="fedavg", out=str(tmp_path), **{**QUICK, "rounds": 3}), quiet=True)
    (run_dir,) = list(tmp_path.iterdir())
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["rounds_completed"] == 1
    assert summary["error"].startswith("non-finite loss (nan) on client 2 in round 2")


def test_any_exception_is_recorded_in_the_summary(tmp_path, monkeypatch):
    class Broken(FedAvg):
        def round(self, t, server, clients):
            if t == 1:
                raise RuntimeError("the coordinator broke")
            return (yield from super().round(t, server, clients))

    _replace_algorithm(monkeypatch, "fedavg", Broken)
    with pytest.raises(RuntimeError, match="the coordinator broke"):
        run(Config(algorithm="fedavg", out=str(tmp_path), **{**QUICK, "rounds": 3}), quiet=True)
    (run_dir,) = list(tmp_path.iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "RuntimeError: the coordinator broke"
    assert [r["round"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1] and summary["rounds_completed"] == 1


def test_dfml_same_seed_same_metrics_and_holdout_validation(tmp_path):
    cfg = Config(algorithm="dfml", model="mlp,lenet5", partition="dirichlet:0.5", clients=4, limit_train=1200, limit_test=400,
                 rounds=3, batch_size=64, out=str(tmp_path), progress=False, dfml={"participants": 3, "period": 3})
    a, b = run(cfg, quiet=True), run(cfg, quiet=True)
    assert _without_timing(a.metrics) == _without_timing(b.metrics)
    assert a.metrics[-1]["global_acc"] is None and len(a.metrics[-1]["current_acc_global_test"]) == 4
    assert [r["peak_round"] for r in a.metrics] == [0.0, 0.0, 1.0]
    record = json.loads((a.run_dir / "partition.json").read_text())
    # DFML holds out 20% of each client's own data for validation
    assert record["val_source"] == "train"
    for n_train, n_val in zip(record["train_sizes"], record["val_sizes"]):
        assert n_val == round(0.2 * (n_train + n_val))
    for train, val, assigned in zip(record["train"], record["val"], record["assigned"]):
        assert sorted(train + val) == sorted(assigned) and not set(train) & set(val)


def test_a_task_maps_labels_in_training_and_evaluation(tmp_path):
    # Upper-body clothing (T-shirt, pullover, coat, shirt) against the rest, as two softmax classes.
    # Unmapped evaluation labels (0..9) against 2-way predictions could not reach 80%.
    res = run(Config(algorithm="fedavg", partition="iid", task="groups:0,2,4,6|1,3,5,7,8,9", batch_size=32, lr=0.03, out=str(tmp_path),
                     **{**QUICK, "rounds": 3}), quiet=True)
    assert res.metrics[-1]["global_acc"] >= 0.80, res.metrics
    counts = json.loads((res.run_dir / "partition.json").read_text())["label_counts"]
    assert all(len(c) == 10 for c in counts)  # the partition is over the dataset's own classes


def test_each_client_is_labelled_and_evaluated_under_its_own_task():
    """Client 1's task groups T-shirt, pullover, coat and shirt (0, 2, 4, 6) against the rest."""
    from torch import nn

    cfg = Config(algorithm="local", partition="iid", clients=2, limit_train=400, limit_test=200, task=["classes", "groups:0,2,4,6|1,3,5,7,8,9"])
    data = prepare_data(cfg)
    tasks = client_tasks(cfg, 10, True)
    task, clients = client_data(data, tasks, torch.device("cpu"))
    assert task.spec == "classes" and [d.task.num_classes for d in clients] == [10, 2]
    upper = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0, 0, 0])  # dataset class -> class 0 (upper body) or 1, by hand
    for d, p, v in zip(clients, data.parts, data.val):
        raw_train, raw_val = data.train_y[torch.from_numpy(p)], data.test_y[torch.from_numpy(v)]
        expect = (raw_train, raw_val, data.test_y) if d.task.num_classes == 10 else (1 - upper[raw_train], 1 - upper[raw_val], 1 - upper[data.test_y])
        assert torch.equal(d.y, expect[0]) and torch.equal(d.val_y, expect[1]) and torch.equal(d.test_y, expect[2])

    class Always0(nn.Module):  # predicts class 0 of its task for every image
        def __init__(self, outputs):
            super().__init__()
            self.outputs = outputs

        def forward(self, x):
            return torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), self.outputs).float()

    b = build(cfg, data)
    states = [b.runtime.client_state(k) for k in range(2)]

    class Fixed:
        """Client k deploys a model that always answers class 0 of client k's task."""

        def global_model(self, server):
            return None

        def client_model(self, server, me):
            k = next(i for i, s in enumerate(states) if s is me)
            return Always0(10 if k == 0 else 2)

        def extra_models(self, server, me):
            return {}

    out = evaluate(dataclasses.replace(b, alg=Fixed()), cfg)
    share = lambda y, c: float((y == c).float().mean())  # noqa: E731
    assert out["global_acc"] is None
    assert out["client_acc_global_test"] == pytest.approx([share(data.test_y, 0), float(upper[data.test_y].float().mean())])
    assert out["client_acc_global_test"][1] == pytest.approx(0.4)  # 4 of 10 balanced classes are upper body
    assert out["personal_acc"] == pytest.approx([share(b.clients[0].val_y, 0), share(b.clients[1].val_y, 0)])


def test_evaluation_of_a_seeded_client_sample_measures_what_a_full_evaluation_measures(tmp_path):
    """With more clients than eval_clients, each evaluated round measures a seeded sample (all clients at the
    last round); the sampled clients' numbers are those a full evaluation gives, since evaluating draws nothing
    that training uses."""
    base = dict(algorithm="fml", clients=10, rounds=3, limit_train=600, limit_test=200, batch_size=32, threads=1,
                progress=False, checkpoint_every=0, out=str(tmp_path))
    full = run(Config(**base, eval_clients=None, name="full"), quiet=True).metrics
    some = run(Config(**base, eval_clients=3, name="some"), quiet=True).metrics
    again = run(Config(**base, eval_clients=3, name="again"), quiet=True).metrics
    chosen = [[k for k, v in enumerate(r["personal_acc"]) if v is not None] for r in some]
    assert [len(c) for c in chosen] == [3, 3, 10] and chosen[0] != chosen[1]
    assert [r["evaluated_clients"] for r in some] == [3, 3, 10] and [r["evaluated_clients"] for r in full] == [10] * 3
    assert chosen == [[k for k, v in enumerate(r["personal_acc"]) if v is not None] for r in again]  # seeded
    for f, s, ks in zip(full, some, chosen):
        assert s["global_acc"] == f["global_acc"]
        for key in ("personal_acc", "client_acc_global_test"):
            assert [s[key][k] for k in ks] == [f[key][k] for k in ks]
            assert all(s[key][k] is None for k in range(10) if k not in ks)
        assert s["personal_acc_mean"] == pytest.approx(sum(f["personal_acc"][k] for k in ks) / len(ks), abs=1e-12)
    assert some[-1] == {**full[-1], "seconds": some[-1]["seconds"]}  # the last round measures everything
