import math

import pytest
import torch

from fedmutual.algorithms.dmlfl import DMLFL, compress, decompress
from fedmutual.config import Config, validate
from fedmutual.engine.runner import run
from fedmutual.errors import ConfigError

SIX = (30, 22, 17, 25, 12, 20)  # 126 samples: a public fold of 126 // 7 = 18
HET = dict(sizes=SIX, shape=(1, 16, 16), model="mlp,lenet5,cnn1", algorithm="dmlfl", local_epochs=1)


def _messages(ctx):
    return list(zip(ctx.transport.log, [m for _, _, m in ctx.transport.messages]))


def test_no_parameter_tensor_in_any_message_after_initialization(make_ctx):
    ctx = make_ctx(**HET)
    alg = DMLFL(ctx)
    init = _messages(ctx)
    # the common initialization: one model per client, from the server, marked as such
    assert len(init) == 6 and all(meta == {"phase": "init"} and src == "server" for (src, _, _, meta), _ in init)
    assert sorted(dst for (_, dst, _, _), _ in init) == [f"client{k}" for k in range(6)]
    for (_, dst, _, _), msg in init:
        assert msg.tensors.keys() == alg.models[int(dst[6:])].state_dict().keys()
    ctx.transport.log.clear()
    ctx.transport.messages.clear()
    shapes = {tuple(p.shape) for m in alg.models for p in m.state_dict().values()}
    for t in range(2):
        alg.round(t, list(range(6)))
    msgs = _messages(ctx)
    assert len(msgs) == 2 * 2 * 6  # per round: every client uploads once, the relay answers each once
    params = [p.detach().flatten() for m in alg.models for p in m.parameters()]
    for (src, dst, nbytes, meta), msg in msgs:
        assert "phase" not in meta and meta["round"] in ("1", "2")
        for name, tensor in msg.tensors.items():
            assert name.split("/")[-1] == "probs"
            assert tensor.shape == (18, 4) and tuple(tensor.shape) not in shapes  # one row per public sample
            assert torch.allclose(tensor.sum(1), torch.ones(18)) and bool((tensor >= 0).all())  # probabilities
            assert not any(p.numel() == tensor.numel() and torch.equal(p, tensor.flatten()) for p in params)
        if dst == "server":
            assert list(msg.tensors) == ["probs"] and 18 * 4 * 4 < nbytes < 18 * 4 * 4 + 200
        else:
            assert len(msg.tensors) == 5 and src == "server"  # the five other clients' predictions


def test_each_client_is_taught_by_the_others_published_predictions(make_ctx):
    ctx = make_ctx(**HET)
    alg = DMLFL(ctx)
    ctx.transport.log.clear()
    ctx.transport.messages.clear()
    alg.round(0, list(range(6)))
    msgs = _messages(ctx)
    uploads = {src: m.tensors["probs"] for (src, dst, _, _), m in msgs if dst == "server"}
    for (src, dst, _, _), m in msgs:
        if src == "server":
            assert set(m.tensors) == {f"{c}/probs" for c in uploads if c != dst}
            for name, tensor in m.tensors.items():
                assert torch.equal(tensor, uploads[name.split("/")[0]])


def test_compression_round_trips():
    probs = torch.tensor([[0.6, 0.3, 0.05, 0.05], [0.1, 0.2, 0.3, 0.4]])
    assert torch.equal(decompress(compress(probs, "none"), 4), probs)
    half = compress(probs, "fp16")
    assert half["probs"].dtype == torch.float16 and torch.allclose(decompress(half, 4), probs, atol=1e-3)
    top = compress(probs, "topk:2")
    assert top["topk_probs"].shape == (2, 2) and top["topk_classes"].dtype == torch.uint8
    # the two largest are kept; the rest share the remaining mass equally
    expected = torch.tensor([[0.6, 0.3, 0.05, 0.05], [0.15, 0.15, 0.3, 0.4]])
    assert torch.allclose(decompress(top, 4), expected, atol=1e-6)
    assert torch.allclose(decompress(top, 4).sum(1), torch.ones(2))


@pytest.mark.parametrize("spec, payload", [("none", 18 * 4 * 4), ("fp16", 18 * 4 * 2), ("topk:1", 18 * (4 + 1))])
def test_bytes_up_follow_the_compression(make_ctx, spec, payload):
    ctx = make_ctx(**HET, dmlfl={"compression": spec})
    alg = DMLFL(ctx)
    ctx.transport.reset_counts()
    alg.round(0, list(range(6)))
    sent, received = ctx.transport.reset_counts()
    assert all(payload < sent[f"client{k}"] < payload + 250 for k in range(6))
    assert all(5 * payload < received[f"client{k}"] < 5 * (payload + 250) for k in range(6))


def test_static_unlabelled_public_set_and_partition_local_data(make_ctx):
    ctx = make_ctx(**HET, dmlfl={"public": "static", "public_labels": False, "public_size": 20, "collab_epochs": 2})
    alg = DMLFL(ctx)
    before = [p.detach().clone() for p in alg.models[0].parameters()]
    x0 = ctx.round_data().public_set(0)[0]
    stats = [alg.round(t, list(range(6))) for t in range(2)]
    assert torch.equal(ctx.round_data().public_set(1)[0], x0)
    assert all(s["public_size"] == 20 and s["train_loss_collab"] >= 0 for s in stats)  # a KL only: never negative
    assert any(not torch.equal(a, b) for a, b in zip(before, alg.models[0].parameters()))
    # each client trains on its partition without the public samples it holds
    n_local = sum(len(ctx.local_data(k, 0)[1]) for k in range(6))
    assert n_local == sum(SIX) - 20


def test_invalid_combinations_are_config_errors(make_ctx):
    with pytest.raises(ConfigError, match="dmlfl.kl: kl = 'faithful' is for a binary model"):
        DMLFL(make_ctx(**HET, dmlfl={"kl": "faithful"}))
    with pytest.raises(ConfigError, match=r"dmlfl.compression: invalid compression 'topk:0'"):
        validate({"algorithm": "dmlfl", "dmlfl": {"compression": "topk:0"}})
    with pytest.raises(ConfigError, match=r"dmlfl.public_dataset: unknown dataset 'svhn'"):
        validate({"algorithm": "dmlfl", "dmlfl": {"public_dataset": "svhn"}})


REAL = dict(algorithm="dmlfl", clients=5, partition="iid", limit_train=900, limit_test=500, rounds=2, batch_size=32,
            lr=1e-3, optimizer="adam", weight_decay=0.0, local_data="folds", progress=False, threads=1)


def _accs(rows):
    return [{k: v for k, v in r.items() if "acc" in k} for r in rows]


def test_binary_fashion_mnist_learns_and_the_same_seed_gives_the_same_metrics(tmp_path):
    # upper-body clothing (T-shirt, pullover, coat, shirt) against the rest; 40% positives, so always
    # answering "not upper-body" scores 60%
    cfg = Config(**REAL, task="binary:0,2,4,6", model="dmlcnn", dmlfl={"kl": "faithful"}, out=str(tmp_path))
    a, b = run(cfg, quiet=True), run(cfg, quiet=True)
    assert a.metrics[-1]["client_acc_global_test_mean"] >= 0.75, a.metrics
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in a.metrics] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in b.metrics]
    row = a.metrics[-1]
    assert row["public_size"] == 150 and all(150 * 4 < up < 150 * 4 + 200 for up in row["bytes_up_per_client"])
    with pytest.raises(ConfigError, match="dmlfl.kl: kl = 'softmax' needs at least two outputs"):
        run(cfg.model_copy(update={"dmlfl": cfg.dmlfl.model_copy(update={"kl": "softmax"})}), quiet=True)


def test_heterogeneous_ten_class_run_gives_the_same_metrics_on_either_engine(tmp_path):
    metrics = {}
    for engine in ("loop", "stacked"):
        cfg = Config(**{**REAL, "clients": 4, "optimizer": "sgd", "lr": 0.05}, model="mlp,cnn1", engine=engine,
                     out=str(tmp_path / engine))
        metrics[engine] = run(cfg, quiet=True).metrics
    assert _accs(metrics["loop"]) == _accs(metrics["stacked"])
    for a, b in zip(metrics["loop"], metrics["stacked"]):
        assert a["train_loss_collab"] == pytest.approx(b["train_loss_collab"], abs=1e-5)
    assert metrics["loop"][-1]["client_acc_global_test_mean"] >= 0.4  # chance is 0.1
    assert math.isfinite(metrics["loop"][-1]["train_loss_collab"])


def test_public_set_from_a_second_dataset_unlabelled(tmp_path):
    # Fashion-MNIST's own 60 000 training images as the second source: the clients keep the whole
    # (limited) training set, and 200 public samples a round come from the other source.
    cfg = Config(**{**REAL, "rounds": 2, "local_data": "partition"}, model="mlp", out=str(tmp_path),
                 dmlfl={"public_dataset": "fashion_mnist", "public_size": 200, "public_labels": False})
    res = run(cfg, quiet=True)
    assert res.metrics[-1]["public_size"] == 200
    assert all(200 * 10 * 4 < up < 200 * 10 * 4 + 200 for up in res.metrics[-1]["bytes_up_per_client"])


def test_second_dataset_public_set_leaves_the_partitions_whole(make_ctx):
    ctx = make_ctx(sizes=(30, 22, 17), shape=(1, 28, 28), algorithm="dmlfl",
                   dmlfl={"public_dataset": "fashion-mnist", "public_size": 50, "public_labels": False})
    px, _ = ctx.round_data().public_set(0)
    assert px.shape == (50, 1, 28, 28) and not torch.equal(px, ctx.round_data().public_set(1)[0])
    for k, d in enumerate(ctx.clients):
        assert ctx.local_data(k, 0)[0] is d.x
    with pytest.raises(ConfigError, match=r"public_dataset: fashion-mnist has inputs of shape \(1, 28, 28\)"):
        make_ctx(sizes=(30, 22), shape=(1, 8, 8), algorithm="dmlfl", dmlfl={"public_dataset": "fashion-mnist"}).round_data()


def test_partial_participation_only_participants_publish_and_learn(make_ctx):
    ctx = make_ctx(**HET, sample_fraction=0.5)
    alg = DMLFL(ctx)
    ctx.transport.log.clear()
    parts = alg.sample(0)
    assert len(parts) == 3
    before = [[p.detach().clone() for p in m.parameters()] for m in alg.models]
    alg.round(0, parts)
    assert sorted(src for src, dst, _, _ in ctx.transport.log if dst == "server") == [f"client{k}" for k in parts]
    for (src, dst, _, _), (_, _, msg) in zip(ctx.transport.log, ctx.transport.messages[-6:]):
        if src == "server":
            assert len(msg.tensors) == 2  # the two other participants' predictions
    for k, m in enumerate(alg.models):
        changed = any(not torch.equal(a, b) for a, b in zip(before[k], m.parameters()))
        assert changed == (k in parts)
