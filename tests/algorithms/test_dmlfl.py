import math

import pytest
import torch

from fedmutual.aggregation import median
from fedmutual.algorithms.dmlfl import compress, consensus, decompress, unpack
from fedmutual.config import Config, validate
from fedmutual.errors import ConfigError
from fedmutual.experiment.runner import run
from fedmutual.runtimes.faults import RoundPlan

SIX = (30, 22, 17, 25, 12, 20)  # 126 samples: a public fold of 126 // 7 = 18
HET = dict(sizes=SIX, shape=(1, 16, 16), model="mlp,lenet5,cnn1", algorithm="dmlfl", local_epochs=1)


def _messages(rt):
    return [((src, dst, nbytes, meta), msg) for (src, dst, nbytes, meta), (_, _, msg) in zip(rt.traffic.log, rt.messages)]


def test_no_parameter_tensor_in_any_message_after_initialization(make_runtime):
    rt = make_runtime(**HET)
    rt.setup()
    init = _messages(rt)
    # the common initialization: one model per client, from the server, marked as such
    assert len(init) == 6 and all(meta == {"phase": "init"} and src == "server" for (src, _, _, meta), _ in init)
    assert sorted(dst for (_, dst, _, _), _ in init) == [f"client{k}" for k in range(6)]
    for (_, dst, _, _), msg in init:
        model = rt.client_state(int(dst[6:])).model
        assert msg.tensors.keys() == model.state_dict().keys()
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in msg.tensors.items())
    # clients of one architecture start from the same weights (clients 0 and 3 are both MLPs)
    assert all(torch.equal(v, rt.client_state(3).model.state_dict()[k]) for k, v in rt.client_state(0).model.state_dict().items())
    rt.clear()
    shapes = {tuple(p.shape) for k in range(6) for p in rt.client_state(k).model.state_dict().values()}
    for t in range(2):
        rt.run_round(t, list(range(6)), RoundPlan())
    msgs = _messages(rt)
    assert len(msgs) == 2 * 2 * 6  # per round: every client uploads once, the relay answers each once
    params = [p.detach().flatten() for k in range(6) for p in rt.client_state(k).model.parameters()]
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


def test_each_client_is_taught_by_the_others_published_predictions(make_runtime):
    rt = make_runtime(**HET)
    rt.setup()
    rt.clear()
    rt.run_round(0, list(range(6)), RoundPlan())
    msgs = _messages(rt)
    uploads = {src: m.tensors["probs"] for (src, dst, _, _), m in msgs if dst == "server"}
    assert sorted(uploads) == sorted(f"client{k}" for k in range(6))
    relays = [(dst, m) for (src, dst, _, _), m in msgs if src == "server"]
    assert sorted(dst for dst, _ in relays) == sorted(uploads)
    for dst, m in relays:
        assert set(m.tensors) == {f"{c}/probs" for c in uploads if c != dst}  # only the others' predictions
        for name, tensor in m.tensors.items():
            assert torch.equal(tensor, uploads[name.split("/")[0]])
        assert all(torch.equal(unpack(m.tensors, c)["probs"], uploads[c]) for c in uploads if c != dst)


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


def test_consensus_renormalizes_a_median_of_predictions():
    p = torch.tensor([[[0.7, 0.2, 0.1]], [[0.1, 0.8, 0.1]], [[0.4, 0.4, 0.2]]])  # three parties, one sample
    m = median(p)  # (0.4, 0.4, 0.1): sums to 0.9
    assert torch.allclose(m, torch.tensor([[0.4, 0.4, 0.1]]))
    assert torch.allclose(consensus(m), torch.tensor([[0.4, 0.4, 0.1]]) / 0.9)
    assert torch.equal(consensus(torch.tensor([[1.5], [-0.2]])), torch.tensor([[1.0], [0.0]]))  # binary: clamped


@pytest.mark.parametrize("spec, payload", [("none", 18 * 4 * 4), ("fp16", 18 * 4 * 2), ("topk:1", 18 * (4 + 1))])
def test_bytes_up_follow_the_compression(make_runtime, spec, payload):
    rt = make_runtime(**HET, dmlfl={"compression": spec})
    rt.setup()
    rt.traffic.reset()
    rt.run_round(0, list(range(6)), RoundPlan())
    sent, received = rt.traffic.reset()
    assert all(payload < sent[f"client{k}"] < payload + 250 for k in range(6))
    assert all(5 * payload < received[f"client{k}"] < 5 * (payload + 250) for k in range(6))


def test_static_unlabelled_public_set_and_partition_local_data(make_runtime):
    rt = make_runtime(**HET, public={"mode": "static", "labels": False, "size": 20}, dmlfl={"collab_epochs": 2})
    rt.setup()
    before = [p.detach().clone() for p in rt.client_state(0).model.parameters()]
    x0 = rt.alg.run.public_set(0)[0]
    stats = [rt.run_round(t, list(range(6)), RoundPlan()) for t in range(2)]
    assert torch.equal(rt.alg.run.public_set(1)[0], x0)
    assert all(s["public_size"] == 20 and s["train_loss_collab"] >= 0 for s in stats)  # a KL only: never negative
    assert any(not torch.equal(a, b) for a, b in zip(before, rt.client_state(0).model.parameters()))
    # each client trains on its partition without the public samples it holds
    n_local = sum(len(env.local_data()[1]) for env in rt.envs)
    assert n_local == sum(SIX) - 20
    assert all(len(env.local_data()[1]) <= n for env, n in zip(rt.envs, SIX))


def test_a_dynamic_public_set_is_a_fresh_fold_every_round(make_runtime):
    rt = make_runtime(**HET)
    (x0, y0), (x1, _) = rt.alg.run.public_set(0), rt.alg.run.public_set(1)
    assert len(y0) == 18 and not torch.equal(x0, x1)
    assert torch.equal(rt.alg.run.public_set(0)[0], x0)  # every party derives the same one


def test_invalid_combinations_are_config_errors(make_runtime):
    with pytest.raises(ConfigError, match="dmlfl.kl: kl = 'faithful' is for a binary model"):
        make_runtime(**HET, dmlfl={"kl": "faithful"})
    with pytest.raises(ConfigError, match=r"dmlfl.compression: invalid compression 'topk:0'"):
        validate({"algorithm": "dmlfl", "dmlfl": {"compression": "topk:0"}})
    with pytest.raises(ConfigError, match=r"public.dataset: unknown dataset 'svhn'"):
        validate({"algorithm": "dmlfl", "public": {"dataset": "svhn"}})
    for old, new in [("public", "public.mode"), ("public_size", "public.size"), ("public_labels", "public.labels"),
                     ("public_dataset", "public.dataset")]:
        with pytest.raises(ConfigError, match=f"dmlfl.{old}: this setting moved to {new}"):
            validate({"algorithm": "dmlfl", "dmlfl": {old: "static"}})


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
        run(Config(**REAL, task="binary:0,2,4,6", model="dmlcnn", dmlfl={"kl": "softmax"}, out=str(tmp_path)), quiet=True)


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
                 public={"dataset": "fashion_mnist", "size": 200, "labels": False})
    res = run(cfg, quiet=True)
    assert res.metrics[-1]["public_size"] == 200
    assert all(200 * 10 * 4 < up < 200 * 10 * 4 + 200 for up in res.metrics[-1]["bytes_up_per_client"])


def test_second_dataset_public_set_leaves_the_partitions_whole(make_runtime):
    rt = make_runtime(sizes=(30, 22, 17), shape=(1, 28, 28), algorithm="dmlfl",
                      public={"dataset": "fashion-mnist", "size": 50, "labels": False})
    px, _ = rt.alg.run.public_set(0)
    assert px.shape == (50, 1, 28, 28) and not torch.equal(px, rt.alg.run.public_set(1)[0])
    for env in rt.envs:
        assert env.local_data()[0] is env.data.x
    with pytest.raises(ConfigError, match=r"public\.dataset: fashion-mnist has inputs of shape \(1, 28, 28\), the run's dataset \(1, 8, 8\)"):
        make_runtime(sizes=(30, 22), shape=(1, 8, 8), algorithm="dmlfl", public={"dataset": "fashion-mnist"})


def test_partial_participation_only_participants_publish_and_learn(make_runtime):
    rt = make_runtime(**HET, sample_fraction=0.5)
    rt.setup()
    rt.clear()
    parts = rt.alg.sample(0)
    assert len(parts) == 3
    before = [[p.detach().clone() for p in rt.client_state(k).model.parameters()] for k in range(6)]
    rt.run_round(0, parts, RoundPlan())
    assert sorted(src for src, dst, _, _ in rt.traffic.log if dst == "server") == [f"client{k}" for k in parts]
    relays = [(dst, msg) for src, dst, msg in rt.messages if src == "server"]
    assert sorted(dst for dst, _ in relays) == [f"client{k}" for k in parts]
    assert all(len(msg.tensors) == 2 for _, msg in relays)  # the two other participants' predictions
    for k in range(6):
        changed = any(not torch.equal(a, b) for a, b in zip(before[k], rt.client_state(k).model.parameters()))
        assert changed == (k in parts)
