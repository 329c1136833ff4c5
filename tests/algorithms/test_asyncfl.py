import pytest
import torch

from fedmutual.algorithms.asyncfl import AsyncFL, layer_groups
from fedmutual.config import Config
from fedmutual.engine.runner import run
from fedmutual.models import build_model

CTX = dict(sizes=(30, 22, 17), shape=(1, 16, 16), model="lenet5", algorithm="asyncfl", local_epochs=1)


def test_layer_groups_of_the_authors_cnn():
    groups = layer_groups(build_model("dmlcnn", (1, 28, 28), 1))
    assert groups["conv"] == ["0.weight", "0.bias", "3.weight", "3.bias", "6.weight", "6.bias"]
    assert groups["dense"] == ["10.weight", "10.bias", "13.weight", "13.bias"]


def _equal(models, keys):
    return all(torch.equal(m.state_dict()[k], models[0].state_dict()[k]) for m in models[1:] for k in keys)


def test_conv_layers_two_rounds_then_dense_layers_accuracy_weighted(make_ctx):
    ctx = make_ctx(**CTX)
    alg = AsyncFL(ctx)
    conv, dense = alg.groups["conv"], alg.groups["dense"]
    assert _equal(alg.models, conv + dense)  # a common initialization
    for t in range(4):
        ctx.transport.log.clear()
        ctx.transport.messages.clear()
        stats = alg.round(t, [0, 1, 2])
        expected = dense if t == 2 else conv
        assert stats["dense_round"] == float(t == 2)
        msgs = list(zip(ctx.transport.log, [m for _, _, m in ctx.transport.messages]))
        uploads = [(float(meta["val_acc"]), m.tensors) for (_, dst, _, meta), m in msgs if dst == "server"]
        replies = [m.tensors for (src, _, _, _), m in msgs if src == "server"]
        assert len(uploads) == len(replies) == 3
        assert all(sorted(u) == sorted(expected) for _, u in uploads) and all(sorted(r) == sorted(expected) for r in replies)
        # each tensor is sum_k a_k W_k / sum_k a_k, the a_k being the uploaded validation accuracies
        total = sum(a for a, _ in uploads)
        for key in expected:
            by_hand = sum(a * u[key].double() for a, u in uploads) / total
            assert torch.allclose(replies[0][key].double(), by_hand, atol=1e-6)
        assert _equal(alg.models, expected)
        assert not _equal(alg.models, dense if expected is conv else conv)  # the other layers stay each client's own


def test_dense_every_is_configurable(make_ctx):
    alg = AsyncFL(make_ctx(**CTX, asyncfl={"dense_every": 2}))
    assert [alg.group(t) for t in range(4)] == ["conv", "dense", "conv", "dense"]


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
