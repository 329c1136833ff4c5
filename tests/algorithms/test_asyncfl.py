import pytest
import torch

from fedmutual.algorithms.asyncfl import layer_groups
from fedmutual.config import Config
from fedmutual.experiment.runner import run
from fedmutual.models import build_model
from fedmutual.runtimes.faults import RoundPlan

CTX = dict(sizes=(30, 22, 17), shape=(1, 16, 16), model="lenet5", algorithm="asyncfl", local_epochs=1)


def test_layer_groups_of_the_authors_cnn():
    groups = layer_groups(build_model("dmlcnn", (1, 28, 28), 1))
    assert groups["conv"] == ["0.weight", "0.bias", "3.weight", "3.bias", "6.weight", "6.bias"]
    assert groups["dense"] == ["10.weight", "10.bias", "13.weight", "13.bias"]


def _models(rt):
    return [rt.client_state(k).model for k in range(len(rt.envs))]


def _equal(models, keys):
    return all(torch.equal(m.state_dict()[k], models[0].state_dict()[k]) for m in models[1:] for k in keys)


def _exchange(rt):
    """(val_acc, tensors) of each upload that reached the server, and the tensors of each reply, by client."""
    uploads = {src: (float(meta["val_acc"]), msg.tensors)
               for (src, dst, _, meta), (_, _, msg) in zip(rt.traffic.log, rt.messages) if dst == "server"}
    replies = {dst: msg.tensors for src, dst, msg in rt.messages if src == "server"}
    return uploads, replies


def test_conv_layers_two_rounds_then_dense_layers_accuracy_weighted(make_runtime):
    rt = make_runtime(**CTX)
    groups = layer_groups(_models(rt)[0])
    conv, dense = groups["conv"], groups["dense"]
    rt.setup()
    assert _equal(_models(rt), conv + dense)  # a common initialization
    for t in range(4):
        rt.clear()
        stats = rt.run_round(t, [0, 1, 2], RoundPlan())
        expected = dense if t == 2 else conv
        assert stats["dense_round"] == float(t == 2)
        uploads, replies = _exchange(rt)
        assert sorted(uploads) == sorted(replies) == ["client0", "client1", "client2"]
        assert all(sorted(u) == sorted(expected) for _, u in uploads.values())
        assert all(sorted(r) == sorted(expected) for r in replies.values())
        # each tensor is sum_k a_k W_k / sum_k a_k, the a_k being the uploaded validation accuracies
        total = sum(a for a, _ in uploads.values())
        for key in expected:
            by_hand = sum(a * u[key].double() for a, u in uploads.values()) / total
            assert all(torch.allclose(r[key].double(), by_hand, atol=1e-6) for r in replies.values())
        assert stats["val_acc_mean"] == pytest.approx(total / 3)
        assert _equal(_models(rt), expected)
        assert not _equal(_models(rt), dense if expected is conv else conv)  # the other layers stay each client's own


def test_the_weights_and_val_acc_mean_are_those_of_the_replies_that_arrived(make_runtime):
    rt = make_runtime(**CTX, faults={"deadline": 2.0})
    rt.setup()
    rt.clear()
    conv = layer_groups(_models(rt)[0])["conv"]
    stats = rt.run_round(0, [0, 1, 2], RoundPlan(delay={0: 1.0, 1: 3.0, 2: 1.0}, late={1}))
    assert rt.events.late == [1]
    uploads, replies = _exchange(rt)
    assert sorted(uploads) == sorted(replies) == ["client0", "client2"]  # the late client gets nothing back
    (a0, u0), (a2, u2) = uploads["client0"], uploads["client2"]
    assert stats["val_acc_mean"] == pytest.approx((a0 + a2) / 2)
    for key in conv:
        by_hand = (a0 * u0[key].double() + a2 * u2[key].double()) / (a0 + a2)
        assert torch.allclose(rt.client_state(0).model.state_dict()[key].double(), by_hand, atol=1e-6)
    models = _models(rt)
    assert _equal([models[0], models[2]], conv) and not _equal([models[0], models[1]], conv)


def test_dense_every_is_configurable(make_runtime):
    rt = make_runtime(**CTX, asyncfl={"dense_every": 2})
    assert [rt.alg.group(t) for t in range(4)] == ["conv", "dense", "conv", "dense"]
    assert [make_runtime(**CTX).alg.group(t) for t in range(6)] == ["conv", "conv", "dense"] * 2  # every third by default


def test_a_model_without_conv_layers_exchanges_nothing_in_conv_rounds(make_runtime):
    rt = make_runtime(**{**CTX, "model": "mlp"}, asyncfl={"dense_every": 2})
    rt.setup()
    rt.clear()
    before = [m.state_dict()["1.weight"].clone() for m in _models(rt)]
    stats = rt.run_round(0, [0, 1, 2], RoundPlan())
    assert rt.traffic.log == [] and stats["dense_round"] == 0.0 and stats["val_acc_mean"] != stats["val_acc_mean"]  # NaN
    assert all(not torch.equal(b, m.state_dict()["1.weight"]) for b, m in zip(before, _models(rt)))  # they trained
    stats = rt.run_round(1, [0, 1, 2], RoundPlan())
    assert stats["dense_round"] == 1.0 and len(rt.traffic.log) == 6 and _equal(_models(rt), ["1.weight", "1.bias"])


def test_binary_fashion_mnist_run_sends_only_the_rounds_layers(tmp_path):
    cfg = Config(algorithm="asyncfl", task="binary:0,2,4,6", model="dmlcnn", clients=3, partition="iid", limit_train=600,
                 limit_test=500, rounds=3, batch_size=32, lr=1e-3, optimizer="adam", weight_decay=0.0, local_data="folds",
                 out=str(tmp_path), progress=False, threads=1)
    rows = run(cfg, quiet=True).metrics
    conv = sum(n * 4 for n in (9 * 32 + 32, 32 * 9 * 64 + 64, 64 * 9 * 64 + 64))
    dense = ((3 * 3 * 64) * 64 + 64 + 65) * 4
    init = conv + dense
    assert all(init + conv < down < init + conv + 1500 for down in rows[0]["bytes_down_per_client"])  # with the initial model
    assert all(conv < up < conv + 500 for up in rows[0]["bytes_up_per_client"] + rows[1]["bytes_up_per_client"])
    assert all(dense < up < dense + 500 for up in rows[2]["bytes_up_per_client"])
    assert rows[-1]["client_acc_global_test_mean"] >= 0.7, rows
