import math

import pytest
import torch

from fedmutual.aggregation import weighted_mean
from fedmutual.algorithms.dfml import bundle, cyclic_alpha, draw_round, is_peak, unbundle
from fedmutual.engine.cohort import Member, run_cohort
from fedmutual.errors import ConfigError
from fedmutual.protocol import state_of
from fedmutual.runtimes.faults import RoundPlan

SIX = (30, 22, 17, 25, 12, 20)


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_cyclic_alpha_hand_computed():
    rise = [cyclic_alpha(t, 0.8, 10, "rise") for t in range(11)]
    assert rise[0] == 0.0 and rise[9] == pytest.approx(0.8) and rise[10] == 0.0
    assert rise[3] == pytest.approx(0.8 * 0.5 * (1 - math.cos(math.pi / 3)))  # 0.2
    assert rise[3] == pytest.approx(0.2)
    assert all(a < b for a, b in zip(rise[:9], rise[1:10]))  # rises over each period
    sym = [cyclic_alpha(t, 0.8, 4, "symmetric") for t in range(4)]
    assert sym == pytest.approx([0.0, 0.4, 0.8, 0.4])
    assert cyclic_alpha(7, 0.6, 10, "constant") == 0.6
    assert [t for t in range(20) if is_peak(t, 0.8, 10, "rise")] == [9, 19]
    assert [t for t in range(8) if is_peak(t, 0.8, 4, "symmetric")] == [2, 6]


def test_draw_depends_on_seed_and_round_only_and_every_client_aggregates():
    draws = [draw_round(0, t, 20, 5) for t in range(200)]
    assert draws == [draw_round(0, t, 20, 5) for t in range(200)]
    assert all(len(s) == 5 and a in s and s == sorted(set(s)) for s, a in draws)
    assert {a for _, a in draws} == set(range(20))
    assert draws != [draw_round(1, t, 20, 5) for t in range(200)]


def test_bundle_names_each_owners_tensors_and_unbundles_by_owner():
    a, b = {"w": torch.ones(2), "b": torch.zeros(1)}, {"w": torch.full((3,), 2.0)}
    named = bundle({5: a, 2: b})
    assert set(named) == {"5/w", "5/b", "2/w"}
    back = unbundle(named)
    assert list(back) == [2, 5] and back[5].keys() == a.keys() and all(torch.equal(back[5][k], a[k]) for k in a)


def test_the_round_of_the_drawn_aggregator(make_runtime):
    rt = make_runtime(sizes=SIX, algorithm="dfml", local_epochs=1, dfml={"participants": 3, "period": 3})
    for t in range(4):
        parts, a = draw_round(rt.cfg.seed, t, 6, 3)
        assert rt.alg.sample(t) == parts and rt.alg.coordinator(t) == a
        assert rt.run_round(t, parts, RoundPlan())["aggregator"] == float(a)
        assert rt.coord == a  # the aggregator's own state ran the round


def test_models_only_travel_between_owner_and_that_rounds_aggregator(make_runtime):
    rt = make_runtime(sizes=SIX, shape=(1, 16, 16), model="mlp,lenet5,cnn1", algorithm="dfml", local_epochs=1,
                      dfml={"participants": 3, "period": 3})
    rt.setup()
    for t in range(6):
        parts = rt.alg.sample(t)
        _, a = draw_round(rt.cfg.seed, t, 6, 3)
        rt.clear()
        rt.run_round(t, parts, RoundPlan())
        agg = f"client{a}"
        # each peer's model to the aggregator and back; the requests and acknowledgements carry nothing
        assert len(rt.traffic.log) == 2 * (len(parts) - 1)
        for (src, dst, nbytes, meta), (_, _, msg) in zip(rt.traffic.log, rt.messages):
            owner = f"client{meta['owner']}"
            assert {src, dst} == {owner, agg} and owner != agg
            model = rt.client_state(int(meta["owner"])).model
            assert nbytes > sum(p.numel() * 4 for p in model.parameters())
            assert set(msg.tensors) == set(model.state_dict())  # the owner's own architecture, under its own names
        ups = {src for src, dst, _, _ in rt.traffic.log if dst == agg}
        downs = {dst for src, dst, _, _ in rt.traffic.log if src == agg}
        assert ups == downs == {f"client{n}" for n in parts if n != a}
        sent, received = rt.traffic.reset()
        assert set(sent) | set(received) <= {f"client{k}" for k in parts}


def test_the_aggregator_sends_back_what_it_trained(make_runtime):
    rt = make_runtime(sizes=SIX, model="mlp", algorithm="dfml", local_epochs=1, dfml={"participants": 3, "period": 3})
    rt.setup()
    parts, a = draw_round(rt.cfg.seed, 0, 6, 3)
    sent = {n: state_of(rt.client_state(n).model) for n in parts}
    sent = {n: {k: v.clone() for k, v in s.items()} for n, s in sent.items()}
    rt.run_round(0, parts, RoundPlan())
    assert len(rt.messages) == 4
    for (src, dst, _, meta), (_, _, msg) in zip(rt.traffic.log, rt.messages):
        owner = int(meta["owner"])
        if dst == f"client{a}":  # the peer's model as it was before the round
            assert src == f"client{owner}" and all(torch.equal(v, sent[owner][k]) for k, v in msg.tensors.items())
        else:  # the model trained at the aggregator, which its owner now holds
            assert dst == f"client{owner}" and meta["round"] == "0"
            assert all(torch.equal(v, rt.client_state(owner).model.state_dict()[k]) for k, v in msg.tensors.items())
            assert not torch.equal(msg.tensors["1.weight"], sent[owner]["1.weight"])
    assert not torch.equal(rt.client_state(a).model.state_dict()["1.weight"], sent[a]["1.weight"])  # it trained its own too


def test_peak_models_under_partial_participation(make_runtime):
    rt = make_runtime(sizes=SIX, algorithm="dfml", local_epochs=1, dfml={"participants": 3, "period": 3})
    rt.setup()
    initial = [_params(rt.client_state(n).model).clone() for n in range(6)]
    expected = [p.clone() for p in initial]
    trained = [False] * 6
    for t in range(9):
        parts = rt.alg.sample(t)
        rt.run_round(t, parts, RoundPlan())
        for n in parts:
            if is_peak(t, 0.8, 3, "rise") or not trained[n]:
                expected[n] = _params(rt.client_state(n).model).clone()
            trained[n] = True
        for n in range(6):
            assert torch.equal(_params(rt.client_state(n).peak), expected[n]), (t, n)
    # a client that trained but not at a peak round keeps an older peak than its current model
    assert any(not torch.equal(_params(rt.client_state(n).peak), _params(rt.client_state(n).model)) for n in range(6))
    me = rt.client_state(0)
    assert rt.alg.client_model(rt.server_state(), me) is me.peak
    assert rt.alg.extra_models(rt.server_state(), me) == {"current": me.model}


def test_dfedavg_averages_the_locally_trained_models(make_runtime):
    rt = make_runtime(sizes=SIX, algorithm="dfedavg", local_epochs=1, dfedavg={"participants": 4})
    t = 0
    parts, a = rt.alg.sample(t), rt.alg.coordinator(t)
    assert a in parts
    # train a twin of the same round by hand: local steps, then the sample-weighted mean
    twin = make_runtime(sizes=SIX, algorithm="dfedavg", local_epochs=1, dfedavg={"participants": 4})
    jobs = []
    for k in parts:
        me, env = twin.client_state(k), twin.envs[k]
        env.round = t
        jobs.append(env.job([Member(me.model, me.opt)]))
    run_cohort(jobs, t, engine=twin.engine)
    expected = weighted_mean([state_of(twin.client_state(k).model) for k in parts], [float(SIX[k]) for k in parts])
    rt.setup()
    rt.run_round(t, parts, RoundPlan())
    for k in parts:
        for key, v in state_of(rt.client_state(k).model).items():
            assert torch.allclose(v, expected[key], atol=1e-6)
    others = [k for k in range(6) if k not in parts]
    assert others and all(torch.equal(_params(rt.client_state(k).model), _params(twin.client_state(k).model)) for k in others)
    # the peers' models went to the aggregator with their sample counts; the average came back to them
    ups = [(src, meta) for src, dst, _, meta in rt.traffic.log if dst == f"client{a}"]
    assert sorted(ups) == sorted((f"client{n}", {"round": "0", "num_samples": str(SIX[n])}) for n in parts if n != a)
    assert sorted(dst for src, dst, _, _ in rt.traffic.log if src == f"client{a}") == sorted(f"client{n}" for n in parts if n != a)


def test_dfedavg_refuses_heterogeneous_models(make_runtime):
    with pytest.raises(ConfigError, match="dfedavg averages weights, so every client needs the same architecture"):
        make_runtime(sizes=SIX, shape=(1, 16, 16), model="mlp,lenet5", algorithm="dfedavg")
