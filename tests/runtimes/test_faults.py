"""Fault draws and attacks: seeded, at the configured rates, per tensor name, and with hand-checked corruptions."""

import math

import pytest
import torch

from fedmutual.config import Config
from fedmutual.runtimes.faults import attackers, corrupt, plan_round
from fedmutual.seeding import torch_generator


def test_plan_is_seeded_and_per_client():
    cfg = Config(clients=20, faults={"dropout": 0.3, "crash": 0.2, "straggler": 0.5, "slowdown": 3.0, "deadline": 2.0})
    a = plan_round(cfg, 4, list(range(20)))
    assert a == plan_round(cfg, 4, list(range(20)))
    assert plan_round(cfg, 5, list(range(20))) != a
    # a client's draw does not depend on who else was sampled
    sub = plan_round(cfg, 4, [3, 7])
    assert (3 in sub.dropped) == (3 in a.dropped) and (7 in sub.crash) == (7 in a.crash)
    assert set(a.dropped).isdisjoint(a.crash) and set(a.dropped).isdisjoint(a.delay)
    assert a.delay and a.late  # 50% stragglers among 20 clients: the checks below have cases to check
    for k, d in a.delay.items():
        assert 1.0 <= d <= 3.0 and ((d > 2.0) == (k in a.late))


def test_rates_over_many_draws():
    cfg = Config(clients=50, faults={"dropout": 0.3, "crash": 0.1})
    plans = [plan_round(cfg, t, list(range(50))) for t in range(40)]
    dropped = sum(len(p.dropped) for p in plans) / 2000
    crashed = sum(len(p.crash) for p in plans) / sum(50 - len(p.dropped) for p in plans)
    assert abs(dropped - 0.3) < 0.03 and abs(crashed - 0.1) < 0.02
    assert all(not p.late for p in plans)  # no deadline: nobody is late


def test_attackers_explicit_and_drawn():
    assert attackers(Config(clients=10)) == set()
    assert attackers(Config(clients=10, attack={"kind": "sign_flip", "clients": [2, 5]})) == {2, 5}
    drawn = attackers(Config(clients=10, attack={"kind": "sign_flip", "count": 3}))
    assert len(drawn) == 3 and drawn == attackers(Config(clients=10, seed=0, attack={"kind": "noise", "count": 3}))
    both = attackers(Config(clients=10, attack={"kind": "sign_flip", "clients": [9], "count": 2}))
    assert 9 in both and len(both) == 2


def test_sign_flip_pushes_the_update_the_other_way():
    cfg = Config(attack={"kind": "sign_flip", "scale": 2.0})
    ref = {"w": torch.tensor([1.0, -1.0]), "n": torch.tensor(3)}
    x = {"w": torch.tensor([1.5, 0.0]), "n": torch.tensor(3)}
    out = corrupt(cfg, x, ref, "weights", 0, 1, "server")
    # ref - 2·(x - ref): 1 - 2·0.5 = 0, -1 - 2·1 = -3
    assert out["w"].tolist() == [0.0, -3.0] and int(out["n"]) == 3
    # without a reference: -scale·x
    assert corrupt(cfg, x, None, "weights", 0, 1, "server")["w"].tolist() == [-3.0, 0.0]


def test_noise_is_seeded_with_the_configured_scale():
    cfg = Config(attack={"kind": "noise", "scale": 0.5})
    x = {"w": torch.zeros(20000)}
    a = corrupt(cfg, x, None, "weights", 3, 1, "server")["w"]
    assert torch.equal(a, corrupt(cfg, x, None, "weights", 3, 1, "server")["w"])
    assert not torch.equal(a, corrupt(cfg, x, None, "weights", 4, 1, "server")["w"])
    assert abs(float(a.std()) - 0.5) < 0.02 and abs(float(a.mean())) < 0.02
    assert not torch.equal(a, corrupt(cfg, x, None, "weights", 3, 1, "client0")["w"])  # the receiver is part of the stream


def test_noise_draws_per_tensor_name_whatever_the_order_of_the_message():
    cfg = Config(seed=7, attack={"kind": "noise", "scale": 1.0})
    a = corrupt(cfg, {"w": torch.zeros(50), "b": torch.zeros(50)}, None, "weights", 2, 4, "server")
    b = corrupt(cfg, {"b": torch.zeros(50), "w": torch.zeros(50)}, None, "weights", 2, 4, "server")
    assert torch.equal(a["w"], b["w"]) and torch.equal(a["b"], b["b"])
    assert not torch.equal(a["w"], a["b"])  # two tensors of one message get draws of their own
    # the draw of tensor "w" is the stream (seed, "attack", round, client, receiver, "w")
    g = torch_generator(7, "attack", 2, 4, "server", "w")
    assert torch.equal(a["w"], torch.randn(50, generator=g, dtype=torch.float64).float())
    alone = corrupt(cfg, {"w": torch.zeros(50)}, None, "weights", 2, 4, "server")
    assert torch.equal(alone["w"], a["w"])  # a tensor's noise does not depend on the other tensors sent with it


def test_prediction_attacks():
    p = {"p": torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])}
    const = corrupt(Config(attack={"kind": "constant_label", "label": 2}), p, None, "probabilities", 0, 0, "x")["p"]
    assert const.tolist() == [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]
    logits = corrupt(Config(attack={"kind": "constant_label", "label": 1}), p, None, "logits", 0, 0, "x")["p"]
    assert logits.softmax(-1)[:, 1].min() > 0.999
    rand = corrupt(Config(attack={"kind": "noise"}), p, None, "probabilities", 0, 0, "x")["p"]
    assert torch.allclose(rand.sum(-1), torch.ones(2)) and bool((rand >= 0).all()) and not torch.equal(rand, p["p"])
    # constant_label leaves weights alone
    w = {"w": torch.ones(3)}
    assert torch.equal(corrupt(Config(attack={"kind": "constant_label"}), w, None, "weights", 0, 0, "x")["w"], w["w"])
    nan = corrupt(Config(attack={"kind": "nan"}), w, None, "weights", 0, 0, "x")["w"]
    assert all(math.isnan(v) for v in nan.tolist())
    with pytest.raises(ValueError, match="unknown message content 'labels'"):
        corrupt(Config(attack={"kind": "nan"}), w, None, "labels", 0, 0, "x")


def test_binary_prediction_attacks():
    p = {"p": torch.tensor([[0.9], [0.2], [0.6]])}  # one sigmoid output per sample
    one = corrupt(Config(attack={"kind": "constant_label", "label": 1}), p, None, "probabilities", 0, 0, "x")["p"]
    assert one.tolist() == [[1.0], [1.0], [1.0]]
    zero = corrupt(Config(attack={"kind": "constant_label", "label": 0}), p, None, "probabilities", 0, 0, "x")["p"]
    assert zero.tolist() == [[0.0], [0.0], [0.0]]
    logit = corrupt(Config(attack={"kind": "constant_label", "label": 1}), p, None, "logits", 0, 0, "x")["p"]
    assert logit.sigmoid().min() > 0.999
    rand = corrupt(Config(attack={"kind": "noise"}), p, None, "probabilities", 0, 0, "x")["p"]
    assert rand.shape == (3, 1) and bool(((rand >= 0) & (rand <= 1)).all()) and not torch.equal(rand, p["p"])
