"""Every algorithm continues with the replies it has: lost, late, crashed and rejected ones are never used."""

import copy

import torch

from fedmutual.aggregation import median, weighted_mean
from fedmutual.algorithms import DFML, FML, DFedAvg, FedAvg
from fedmutual.algorithms.base import state_of
from fedmutual.algorithms.dfml import draw_round
from fedmutual.faults import RoundPlan, corrupt

FOUR = (40, 28, 17, 20)


def _logged(ctx):
    lines = []
    ctx.log = lines.append
    return lines


def test_fml_averages_only_the_memes_that_arrived(make_ctx):
    ctx = make_ctx(sizes=FOUR, algorithm="fml", faults={"deadline": 2.0}, attack={"kind": "nan", "clients": [3]})
    lines = _logged(ctx)
    alg = FML(ctx)
    ctx.begin_round(0, RoundPlan(crash={1}, delay={0: 1.0, 1: 1.0, 2: 3.5, 3: 1.0}, late={2}))
    alg.round(0, [0, 1, 2, 3])
    # client 1 crashed, client 2 missed the deadline, client 3 sent NaN: only client 0's meme counts
    assert ctx.events.crashed == [1] and ctx.events.late == [2]
    n = alg.global_[1].weight.numel()  # the first tensor of the MLP in message order: every value NaN
    assert ctx.events.rejected == [{"client": 3, "reason": f"tensor '1.weight' has {n} non-finite values (NaN or Inf)"}]
    expected = weighted_mean([state_of(alg.memes[0])])
    assert all(torch.equal(v, expected[k]) for k, v in state_of(alg.global_).items())
    assert any("client 1 crashed in its update (simulated)" in m for m in lines)
    assert any("client 2 missed the deadline (3.50 > 2.0)" in m for m in lines)
    assert any(f"rejected the message from client3 to server: tensor '1.weight' has {n} non-finite values" in m for m in lines)


def test_a_crashed_client_trained_half_its_steps(make_ctx):
    ctx = make_ctx(sizes=FOUR, algorithm="fml", local_epochs=1)
    ctx.log = lambda m: None
    steps = []
    alg = FML(ctx)
    ctx.begin_round(0, RoundPlan(crash={0}))
    ctx.on_step = lambda: steps.append(1)
    before = copy.deepcopy(state_of(alg.local[0]))
    alg.round(0, [0])
    assert len(steps) == 40 // 8 // 2  # 5 batches of 8, crashed after 2
    assert not torch.equal(before["1.weight"], alg.local[0].state_dict()["1.weight"])  # what it changed stays changed


def test_too_few_replies_skip_the_round_and_keep_the_global_model(make_ctx):
    ctx = make_ctx(sizes=FOUR, algorithm="fedavg", faults={"min_replies": 3})
    lines = _logged(ctx)
    alg = FedAvg(ctx)
    before = copy.deepcopy(state_of(alg.global_))
    ctx.begin_round(0, RoundPlan(crash={0, 1}))
    alg.round(0, [0, 1, 2, 3])
    assert ctx.events.skipped and ctx.events.crashed == [0, 1]
    assert all(torch.equal(v, before[k]) for k, v in state_of(alg.global_).items())
    assert "round 1: 2 valid replies of 4 reached server, fewer than faults.min_replies = 3; the round is skipped" in lines[-1]


def test_robust_rule_on_sign_flipped_memes(make_ctx):
    ctx = make_ctx(sizes=FOUR[:3], algorithm="fml", attack={"kind": "sign_flip", "clients": [0], "scale": 5.0},
                   aggregation={"rule": "median"})
    alg = FML(ctx)
    sent = copy.deepcopy(state_of(alg.global_))
    ctx.begin_round(0, RoundPlan())
    alg.round(0, [0, 1, 2])
    flipped = corrupt(ctx.cfg, state_of(alg.memes[0]), sent, "weights", 0, 0, "server")
    states = [flipped, state_of(alg.memes[1]), state_of(alg.memes[2])]
    for k, v in state_of(alg.global_).items():
        assert torch.equal(v, median(torch.stack([s[k] for s in states])))


def test_dfml_aggregator_proceeds_with_the_peers_that_reached_it(make_ctx):
    ctx = make_ctx(sizes=(30, 25, 20, 15, 12, 10), model="mlp", algorithm="dfml", local_epochs=1,
                   dfml={"participants": 4}, faults={"deadline": 1.5})
    ctx.log = lambda m: None
    alg = DFML(ctx)
    t = 0
    parts, a = draw_round(ctx.cfg.seed, t, 6, 4)
    late, crashed_peer = [n for n in parts if n != a][:2]
    before = {n: copy.deepcopy(state_of(alg.models[n])) for n in parts}
    ctx.transport.log.clear()
    ctx.begin_round(t, RoundPlan(late={late}, delay={late: 2.0}))
    alg.round(t, parts)
    arrived = [n for n in parts if n not in (a, late)]
    # models went to the aggregator from every peer but the late one, and came back to those
    trips = [(src, dst) for src, dst, _, _ in ctx.transport.log]
    assert sorted(trips) == sorted([(f"client{n}", f"client{a}") for n in arrived] + [(f"client{a}", f"client{n}") for n in arrived])
    assert all(torch.equal(v, before[late][k]) for k, v in state_of(alg.models[late]).items())
    for n in arrived + [a]:
        assert not torch.equal(before[n]["1.weight"], alg.models[n].state_dict()["1.weight"])
    assert ctx.events.late == [late]
    # the aggregator itself crashing: nobody's model changes hands, the round ends
    ctx.begin_round(1, RoundPlan(crash=set(draw_round(ctx.cfg.seed, 1, 6, 4)[1:])))
    ctx.transport.log.clear()
    parts1, a1 = draw_round(ctx.cfg.seed, 1, 6, 4)
    keep = {n: copy.deepcopy(state_of(alg.models[n])) for n in parts1 if n != a1}
    alg.round(1, parts1)
    assert ctx.events.crashed == [a1] and all(dst == f"client{a1}" for _, dst, _, _ in ctx.transport.log)
    assert all(torch.equal(v, keep[n][k]) for n in keep for k, v in state_of(alg.models[n]).items())


def test_dfedavg_averages_the_peers_that_arrived(make_ctx):
    ctx = make_ctx(sizes=(30, 25, 20, 15), algorithm="dfedavg", local_epochs=1, dfedavg={"participants": 4, "weighting": "uniform"})
    ctx.log = lambda m: None
    alg = DFedAvg(ctx)
    parts, a = draw_round(ctx.cfg.seed, 0, 4, 4)
    crashed = [n for n in parts if n != a][0]
    ctx.begin_round(0, RoundPlan(crash={crashed}))
    alg.round(0, parts)
    avg = state_of(alg.models[a])
    assert ctx.events.crashed == [crashed]
    assert not torch.equal(state_of(alg.models[crashed])["1.weight"], avg["1.weight"])  # kept its own model
    for n in parts:
        if n not in (crashed, a):
            assert torch.equal(state_of(alg.models[n])["1.weight"], avg["1.weight"])


def test_shared_predictions_gathered_and_reduced_robustly(make_ctx):
    """The path a prediction-sharing method (DML-FL) takes: gather probabilities, combine them with the configured rule."""
    ctx = make_ctx(sizes=(10, 10, 10, 10, 10), attack={"kind": "constant_label", "clients": [4], "label": 3},
                   aggregation={"rule": "median"})
    ctx.begin_round(0, RoundPlan())
    g = torch.Generator().manual_seed(1)
    honest = {k: torch.softmax(torch.randn(6, 4, generator=g), -1) for k in range(5)}
    like = {"probs": torch.empty(6, 4)}
    got = ctx.gather("client0", {k: {"probs": p} for k, p in honest.items()}, like=like, content="probabilities")
    assert sorted(got) == [0, 1, 2, 3, 4]
    assert torch.equal(got[4].tensors["probs"], torch.nn.functional.one_hot(torch.full((6,), 3), 4).float())
    stacked = torch.stack([got[k].tensors["probs"] for k in sorted(got)])
    assert torch.equal(ctx.reduce(stacked), median(stacked))
    # a reply of the wrong shape is refused, naming the client
    bad = ctx.gather("client0", {1: {"probs": torch.ones(5, 4) / 4}}, like=like, content="probabilities")
    assert bad == {} and ctx.events.rejected[-1] == {"client": 1, "reason": "tensor 'probs' has shape [5, 4], expected [6, 4]"}
    assert ctx.events.skipped  # 0 valid replies < min_replies = 1


def test_dmlfl_uses_the_predictions_it_has(tmp_path):
    """DML-FL on real Fashion-MNIST: NaN predictions are rejected and crashed clients publish nothing; the run goes on."""
    from fedmutual.config import Config
    from fedmutual.engine.runner import run

    cfg = Config(algorithm="dmlfl", clients=4, model="mlp", limit_train=800, limit_test=200, rounds=3, batch_size=32,
                 partition="iid", progress=False, threads=1, out=str(tmp_path), dmlfl={"public_size": 100},
                 attack={"kind": "nan", "clients": [1]}, faults={"crash": 0.3}, aggregation={"rule": "median"})
    res = run(cfg, quiet=True)
    for row in res.metrics:
        f = row["faults"]
        if 1 not in f["crashed"]:
            assert {"client": 1, "reason": "tensor 'probs' has 400 non-finite values (NaN or Inf)"} in f["rejected"]
        assert row["bytes_up_per_client"][1] > 0 or 1 in f["crashed"]
        for k in f["crashed"]:
            assert row["bytes_up_per_client"][k] == 0  # a crashed client publishes nothing
    assert any(row["faults"]["crashed"] for row in res.metrics)
    assert res.summary["status"] == "completed" and res.metrics[-1]["client_acc_global_test_mean"] > 0.5
