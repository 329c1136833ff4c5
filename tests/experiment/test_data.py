"""prepare_data with the config's data, a dataset and a partition given from Python, and the run records."""

import json

import numpy as np
import pytest
import torch

from fedmutual.config import Config, validate
from fedmutual.data import DATASETS, from_arrays, load_dataset, partition, stratified_subset, validation_splits
from fedmutual.errors import ConfigError
from fedmutual.experiment.data import (
    client_data,
    client_tasks,
    holdout_splits,
    partition_record,
    prepare_data,
    recorded_fields,
)


def _data(n=60, m=24, classes=3, seed=0, name="toy"):
    rng = np.random.default_rng(seed)
    return from_arrays(rng.integers(0, 256, (n, 2, 4, 4), dtype=np.uint8), np.arange(n) % classes,
                       rng.integers(0, 256, (m, 2, 4, 4), dtype=np.uint8), np.arange(m) % classes, name=name)


def test_the_config_data_keeps_its_seed_streams():
    cfg = Config(partition="shards:2", clients=4, limit_train=400, limit_test=120, seed=5)
    data = prepare_data(cfg)
    ds = load_dataset("fashion-mnist")
    ti = stratified_subset(ds.train_y.numpy(), 400, 5)
    vi = stratified_subset(ds.test_y.numpy(), 120, 6)
    ty, vy = ds.train_y.numpy()[ti], ds.test_y.numpy()[vi]
    parts = partition(ty, "shards:2", 4, 5)
    val = validation_splits(parts, ty, vy, 10, None, 5)
    assert torch.equal(data.train_x, ds.train_x[torch.from_numpy(ti)]) and np.array_equal(data.test_y.numpy(), vy)
    assert all(np.array_equal(a, b) for a, b in zip(data.parts, parts))
    assert all(np.array_equal(a, b) for a, b in zip(data.val, val))
    assert not data.val_on_train and data.partition == "shards:2" and recorded_fields(data) == {}
    rec = partition_record(data)
    assert rec["dataset"] == "fashion-mnist" and rec["source"] == ds.source and rec["fingerprint"] is None
    assert rec["partition"] == "shards:2" and rec["val_source"] == "test" and rec["assigned"] == rec["train"]


def test_a_dataset_and_an_explicit_partition_from_python():
    ds = _data()
    given = [np.arange(0, 60, 2), [1, 3, 5, 7], np.array([59, 9, 11])]
    data = prepare_data(Config(clients=3, seed=1), dataset=ds, partition=given)
    assert data.dataset is ds and DATASETS.get("toy") is ds  # registered for the process, so the record resolves
    assert [p.tolist() for p in data.parts] == [list(range(0, 60, 2)), [1, 3, 5, 7], [9, 11, 59]]
    assert all(len(v) == 8 for v in data.val)  # 24 test samples // 3 clients, drawn from the test set
    assert [p.tolist() for p in data.val] == [v.tolist() for v in validation_splits(data.parts, ds.train_y.numpy(), ds.test_y.numpy(), 3, None, 1)]
    fields = recorded_fields(data)
    assert fields == {"dataset": "toy", "partition": "explicit"}
    assert validate({"dataset": fields["dataset"], "clients": 3}).dataset == "toy"
    rec = partition_record(data)
    assert list(rec)[:3] == ["train_sizes", "val_sizes", "label_counts"]
    assert rec["train_sizes"] == [30, 4, 3] and rec["val_sizes"] == [8, 8, 8]
    assert rec["label_counts"][1] == [1, 2, 1]  # samples 1, 3, 5, 7 have labels 1, 0, 2, 1
    assert rec["train"][2] == [9, 11, 59] and rec["partition"] == "explicit"
    assert rec["dataset"] == "toy" and rec["source"] == ds.source and rec["fingerprint"] == ds.fingerprint
    json.dumps(rec)  # plain JSON: ints and lists only


def test_limits_apply_to_a_given_dataset_with_the_same_seed_streams():
    ds = _data(n=90, m=30)
    data = prepare_data(Config(clients=2, partition="iid", limit_train=40, limit_test=12, seed=3), dataset=ds)
    ti = stratified_subset(ds.train_y.numpy(), 40, 3)
    assert torch.equal(data.train_y, ds.train_y[torch.from_numpy(ti)]) and len(data.test_y) == 12
    assert recorded_fields(data) == {"dataset": "toy"}


def test_an_explicit_partition_is_checked():
    with pytest.raises(ConfigError, match=r"partition \(given from Python\): index 3 is given to clients 0, 1"):
        prepare_data(Config(clients=2), dataset=_data(), partition=[[0, 3], [3, 4]])
    with pytest.raises(ConfigError, match=r"partition \(given from Python\): 1 index arrays for 2 clients"):
        prepare_data(Config(clients=2), dataset=_data(), partition=[np.arange(10)])
    with pytest.raises(ConfigError, match="client 1 gets index 60, outside the training set of 60 samples"):
        prepare_data(Config(clients=2), dataset=_data(), partition=[[0], [60]])


def test_held_out_validation_and_the_record_rerun_through_indices(tmp_path):
    cfg = Config(clients=3, partition="dirichlet:1.0", seed=2)
    data = prepare_data(cfg, dataset=_data(n=90), val_source="train")
    assert data.val_on_train
    expect = holdout_splits(partition(data.train_y.numpy(), "dirichlet:1.0", 3, 2), cfg.val_fraction, 2)
    assert all(np.array_equal(a, b) for a, b in zip(data.parts, expect[0]))
    assert all(np.array_equal(a, b) for a, b in zip(data.val, expect[1]))
    rec = partition_record(data)
    assert rec["val_source"] == "train"
    assert [sorted(t + v) for t, v in zip(rec["train"], rec["val"])] == rec["assigned"]
    path = tmp_path / "partition.json"
    path.write_text(json.dumps(rec))
    rerun_cfg = validate({**cfg.to_dict(), **recorded_fields(data), "partition": f"indices:{path}"})
    again = prepare_data(rerun_cfg, val_source="train")
    assert [p.tolist() for p in again.parts] == rec["train"] and [v.tolist() for v in again.val] == rec["val"]
    assert again.dataset is data.dataset


def test_from_arrays_names_must_not_hide_other_data():
    prepare_data(Config(clients=2), dataset=_data(seed=0, name="clash"))
    prepare_data(Config(clients=2), dataset=_data(seed=0, name="clash"))  # the same arrays again: fine
    with pytest.raises(ConfigError, match="dataset 'clash': this name already belongs to other data"):
        prepare_data(Config(clients=2), dataset=_data(seed=1, name="clash"))
    with pytest.raises(ConfigError, match="dataset 'mnist': this name already belongs to other data"):
        prepare_data(Config(clients=2), dataset=_data(name="mnist"))
    with pytest.raises(ConfigError, match="dataset: expected an ArrayDataset"):
        prepare_data(Config(clients=2), dataset=np.zeros(3))


def test_val_source_must_be_test_or_train():
    with pytest.raises(ConfigError, match="val_source: 'auto'; expected 'test' or 'train'"):
        prepare_data(Config(clients=2), dataset=_data(), val_source="auto")


def test_client_tasks_take_the_callers_word():
    cfg = Config(algorithm="fedavg", clients=2, task=["classes", "binary:0"])
    tasks = client_tasks(cfg, 3, allow_per_client=True)
    assert [t.num_classes for t in tasks] == [3, 2]
    with pytest.raises(ConfigError) as e:
        client_tasks(cfg, 3, allow_per_client=False, allowed=["local", "fml"])
    assert str(e.value) == ("task: fedavg trains one model for every client, so the clients need one task; "
                            "got binary:0; classes. Per-client tasks work with fml, local.")
    assert len(client_tasks(Config(clients=2), 3, allow_per_client=False)) == 2


def test_client_data_labels_each_client_by_its_task():
    cfg = Config(clients=2, task=["classes", "binary:2"], partition="iid")
    data = prepare_data(cfg, dataset=_data())
    task, clients = client_data(data, client_tasks(cfg, 3, True), torch.device("cpu"))
    assert task.spec == "classes"
    raw = data.train_y[torch.from_numpy(data.parts[1])]
    assert torch.equal(clients[1].y, (raw == 2).long()) and torch.equal(clients[0].x, data.train_x[torch.from_numpy(data.parts[0])])
    assert clients[0].test_y is not clients[1].test_y and len(clients[0].val_y) == len(data.val[0])
