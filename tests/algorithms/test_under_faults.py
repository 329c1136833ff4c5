"""Every algorithm continues with the replies it has: lost, late, crashed and rejected ones are never used."""

import copy

import torch

from fedmutual.aggregation import median, weighted_mean
from fedmutual.algorithms.dfml import draw_round
from fedmutual.algorithms.dmlfl import DMLFL
from fedmutual.protocol import Algorithm, Ask, Message, handles, state_of
from fedmutual.runtimes.faults import RoundPlan, corrupt

FOUR = (40, 28, 17, 20)


def _copy(model):
    return copy.deepcopy(state_of(model))


def _same(a, b):
    return all(torch.equal(v, b[k]) for k, v in a.items())


def test_fml_averages_only_the_memes_that_arrived(make_runtime):
    rt = make_runtime(sizes=FOUR, algorithm="fml", faults={"deadline": 2.0}, attack={"kind": "nan", "clients": [3]})
    rt.setup()
    rt.run_round(0, [0, 1, 2, 3], RoundPlan(crash={1}, delay={0: 1.0, 1: 1.0, 2: 3.5, 3: 1.0}, late={2}))
    g = rt.server_state().global_
    # client 1 crashed, client 2 missed the deadline, client 3 sent NaN: only client 0's meme counts
    assert rt.events.crashed == [1] and rt.events.late == [2]
    n = g[1].weight.numel()  # the first tensor of the MLP in message order: every value NaN
    assert rt.events.rejected == [{"client": 3, "reason": f"tensor '1.weight' has {n} non-finite values (NaN or Inf)"}]
    assert not rt.events.skipped
    expected = weighted_mean([state_of(rt.client_state(0).meme)])
    assert all(torch.equal(v, expected[k]) for k, v in state_of(g).items())
    # what reached the server: client 0's meme and client 3's NaN, which was rejected; nothing from 1 or 2
    assert [(src, msg is None) for src, dst, msg in rt.messages if dst == "server"] == [("client0", False), ("client3", True)]
    lines = rt.lines
    assert any("client 1 crashed in its update (simulated)" in m for m in lines)
    assert any("client 2 missed the deadline (3.50 > 2.0)" in m for m in lines)
    assert any(f"rejected the message from client3 to server: tensor '1.weight' has {n} non-finite values" in m for m in lines)


def test_a_crashed_client_trained_half_its_steps_and_is_down_for_the_round(make_runtime):
    rt = make_runtime(sizes=FOUR, algorithm="fml", local_epochs=1)
    rt.setup()
    steps = []
    rt.on_step = lambda: steps.append(1)
    before = _copy(rt.client_state(0).local)
    g = _copy(rt.server_state().global_)
    rt.run_round(0, [0], RoundPlan(crash={0}))
    assert len(steps) == 40 // 8 // 2  # 5 batches of 8, crashed after 2
    assert not torch.equal(before["1.weight"], rt.client_state(0).local.state_dict()["1.weight"])  # what it changed stays changed
    assert rt.events.crashed == [0] and rt.down == {0}
    # the global model went down to it; nothing came back, so the round is skipped and the global model kept
    assert [(src, dst) for src, dst, _, _ in rt.traffic.log] == [("server", "client0")]
    assert rt.events.skipped and _same(state_of(rt.server_state().global_), g)


def test_too_few_replies_skip_the_round_and_keep_the_global_model(make_runtime):
    rt = make_runtime(sizes=FOUR, algorithm="fedavg", faults={"min_replies": 3})
    rt.setup()
    before = _copy(rt.server_state().global_)
    rt.run_round(0, [0, 1, 2, 3], RoundPlan(crash={0, 1}))
    assert rt.events.skipped and rt.events.crashed == [0, 1]
    assert _same(state_of(rt.server_state().global_), before)
    assert sorted(src for src, dst, _, _ in rt.traffic.log if dst == "server") == ["client2", "client3"]  # two arrived
    line = rt.lines[-1]
    assert line.startswith("fedmutual: round 1: 2 valid replies of ")
    assert line.endswith(" reached server, fewer than faults.min_replies = 3; the round is skipped")
    # one more reply is enough
    rt2 = make_runtime(sizes=FOUR, algorithm="fedavg", faults={"min_replies": 3})
    rt2.setup()
    rt2.run_round(0, [0, 1, 2, 3], RoundPlan(crash={0}))
    assert not rt2.events.skipped and not _same(state_of(rt2.server_state().global_), before)


def test_the_skip_line_counts_every_client_the_round_asked(make_runtime):
    """The line says how many of the clients asked replied valid, as before the restructuring ("2 of 4")."""
    rt = make_runtime(sizes=FOUR, algorithm="fedavg", faults={"min_replies": 3})
    rt.setup()
    rt.run_round(0, [0, 1, 2, 3], RoundPlan(crash={0, 1}))
    assert "round 1: 2 valid replies of 4 reached server, fewer than faults.min_replies = 3; the round is skipped" in rt.lines[-1]


def test_robust_rule_on_sign_flipped_memes(make_runtime):
    rt = make_runtime(sizes=FOUR[:3], algorithm="fml", attack={"kind": "sign_flip", "clients": [0], "scale": 5.0},
                      aggregation={"rule": "median"})
    rt.setup()
    sent = _copy(rt.server_state().global_)
    rt.run_round(0, [0, 1, 2], RoundPlan())
    memes = [state_of(rt.client_state(k).meme) for k in range(3)]
    flipped = corrupt(rt.cfg, memes[0], sent, "weights", 0, 0, "server")
    # the attacker's upload is its meme pushed the other way about the global model it received: ref - 5 (x - ref)
    (_, _, up0), = [m for m in rt.messages if m[0] == "client0"]
    assert _same(up0.tensors, flipped)
    assert torch.allclose(flipped["1.weight"], sent["1.weight"] - 5 * (memes[0]["1.weight"] - sent["1.weight"]), atol=1e-6)
    states = [flipped, memes[1], memes[2]]
    for k, v in state_of(rt.server_state().global_).items():
        assert torch.equal(v, median(torch.stack([s[k] for s in states])))


def test_dfml_aggregator_proceeds_with_the_peers_that_reached_it(make_runtime):
    rt = make_runtime(sizes=(30, 25, 20, 15, 12, 10), model="mlp", algorithm="dfml", local_epochs=1,
                      dfml={"participants": 4}, faults={"deadline": 1.5})
    rt.setup()
    seed, t = rt.cfg.seed, 0
    parts, a = draw_round(seed, t, 6, 4)
    late = [n for n in parts if n != a][0]
    before = {n: _copy(rt.client_state(n).model) for n in parts}
    rt.run_round(t, parts, RoundPlan(late={late}, delay={late: 2.0}))
    arrived = [n for n in parts if n not in (a, late)]
    # models went to the aggregator from every peer but the late one, and came back to those
    trips = [(src, dst) for src, dst, _, _ in rt.traffic.log]
    assert sorted(trips) == sorted([(f"client{n}", f"client{a}") for n in arrived] + [(f"client{a}", f"client{n}") for n in arrived])
    assert _same(state_of(rt.client_state(late).model), before[late])
    for n in arrived + [a]:
        assert not torch.equal(before[n]["1.weight"], rt.client_state(n).model.state_dict()["1.weight"])
    assert rt.events.late == [late]
    # the aggregator itself crashing in its training: nobody's model changes hands, the round ends
    rt.clear()
    parts1, a1 = draw_round(seed, 1, 6, 4)
    keep = {n: _copy(rt.client_state(n).model) for n in parts1 if n != a1}
    stats = rt.run_round(1, parts1, RoundPlan(crash={a1}))
    assert rt.events.crashed == [a1] and "peak_round" not in stats
    assert rt.traffic.log and all(dst == f"client{a1}" for _, dst, _, _ in rt.traffic.log)  # the peers' models reached it
    assert all(_same(state_of(rt.client_state(n).model), keep[n]) for n in keep)


def test_dfml_a_peer_crashing_in_local_training_sends_nothing_for_the_round(make_runtime):
    rt = make_runtime(sizes=(30, 25, 20, 15, 12, 10), model="mlp", algorithm="dfml", local_epochs=1,
                      dfml={"participants": 4, "local_train_before_send": True})
    rt.setup()
    parts, a = draw_round(rt.cfg.seed, 0, 6, 4)
    crashed = [n for n in parts if n != a][0]
    rt.run_round(0, parts, RoundPlan(crash={crashed}))
    assert rt.events.crashed == [crashed]
    assert all(crashed != int(src[6:]) and crashed != int(dst[6:]) for src, dst, _, _ in rt.traffic.log)
    assert sorted(src for src, dst, _, _ in rt.traffic.log if dst == f"client{a}") == sorted(
        f"client{n}" for n in parts if n not in (a, crashed))


def test_dfedavg_averages_the_peers_that_arrived(make_runtime):
    rt = make_runtime(sizes=(30, 25, 20, 15), algorithm="dfedavg", local_epochs=1,
                      dfedavg={"participants": 4, "weighting": "uniform"})
    rt.setup()
    parts, a = draw_round(rt.cfg.seed, 0, 4, 4)
    crashed = [n for n in parts if n != a][0]
    rt.run_round(0, parts, RoundPlan(crash={crashed}))
    avg = state_of(rt.client_state(a).model)
    assert rt.events.crashed == [crashed]
    assert not torch.equal(state_of(rt.client_state(crashed).model)["1.weight"], avg["1.weight"])  # kept its own model
    # down for the rest of the round: it is neither asked for its model nor sent the average
    assert all(f"client{crashed}" not in (src, dst) for src, dst, _, _ in rt.traffic.log)
    ups = [msg for src, dst, msg in rt.messages if dst == f"client{a}"]
    assert len(ups) == 2
    # the uniform mean of the aggregator's model and the two that arrived, which those two now hold
    own = [rt.client_state(n).model for n in parts if n not in (crashed, a)]
    for n in parts:
        if n not in (crashed, a):
            assert torch.equal(state_of(rt.client_state(n).model)["1.weight"], avg["1.weight"])
    assert all(_same(state_of(m), avg) for m in own)


class Probe(Algorithm):
    """A method that gathers predictions of a given shape (as DML-FL's relay would) and keeps what it got."""

    name = "probe"

    def __init__(self, run):
        super().__init__(run)
        self.got = {}

    def round(self, t, server, clients):
        like = {"probs": torch.empty(6, 4)}
        self.got["all"] = yield Ask("share.probs", {k: Message() for k in clients}, like=like, content="probabilities", gather=True)
        self.got["bad"] = yield Ask("share.bad", {1: Message()}, like=like, content="probabilities", gather=True)
        return {}

    @handles("share.probs")
    def share(self, me, msg, env):
        g = torch.Generator().manual_seed(env.k)
        return Message({"probs": torch.softmax(torch.randn(6, 4, generator=g), -1)})

    @handles("share.bad")
    def bad(self, me, msg, env):
        return Message({"probs": torch.ones(5, 4) / 4})

    def client_model(self, server, me):
        return None


def test_shared_predictions_gathered_and_reduced_robustly(make_runtime):
    """The path a prediction-sharing method takes: gather probabilities, combine them with the configured rule."""
    rt = make_runtime(sizes=(10, 10, 10, 10, 10), algorithm_class=Probe,
                      attack={"kind": "constant_label", "clients": [4], "label": 3}, aggregation={"rule": "median"})
    rt.setup()
    rt.run_round(0, [0, 1, 2, 3, 4], RoundPlan())
    got = rt.alg.got["all"]
    assert sorted(got) == [0, 1, 2, 3, 4]
    assert torch.equal(got[4].tensors["probs"], torch.nn.functional.one_hot(torch.full((6,), 3), 4).float())
    honest = {k: torch.softmax(torch.randn(6, 4, generator=torch.Generator().manual_seed(k)), -1) for k in range(4)}
    assert all(torch.equal(got[k].tensors["probs"], honest[k]) for k in range(4))
    stacked = torch.stack([got[k].tensors["probs"] for k in sorted(got)])
    assert torch.equal(rt.alg.run.reduce(stacked), median(stacked))
    # a reply of the wrong shape is refused, naming the client
    assert rt.alg.got["bad"] == {} and rt.events.rejected[-1] == {"client": 1, "reason": "tensor 'probs' has shape [5, 4], expected [6, 4]"}
    assert rt.events.skipped  # 0 valid replies < min_replies = 1
    assert any("rejected the message from client1 to server: tensor 'probs' has shape [5, 4], expected [6, 4]" in m for m in rt.lines)


def test_dmlfl_relays_the_predictions_that_arrived(make_runtime):
    rt = make_runtime(sizes=(30, 22, 17, 25), algorithm="dmlfl", local_epochs=1,
                      attack={"kind": "nan", "clients": [1]}, faults={"deadline": 2.0})
    rt.setup()
    rt.clear()
    rt.run_round(0, [0, 1, 2, 3], RoundPlan(delay={0: 1.0, 1: 1.0, 2: 1.0, 3: 3.0}, late={3}))
    rows = len(rt.alg.run.public_set(0)[1])
    assert rt.events.late == [3] and rt.events.rejected == [
        {"client": 1, "reason": f"tensor 'probs' has {rows * 4} non-finite values (NaN or Inf)"}]
    relays = {dst: set(msg.tensors) for src, dst, msg in rt.messages if src == "server"}
    # the late client still hears the others (the relay's messages are on time); nobody hears client 1 or 3
    assert relays == {"client0": {"client2/probs"}, "client1": {"client0/probs", "client2/probs"},
                      "client2": {"client0/probs"}, "client3": {"client0/probs", "client2/probs"}}


class ShortPredictions(DMLFL):
    """DML-FL whose client 1 publishes predictions for 3 public samples instead of all of them."""

    @handles("train.local")
    def train_local(self, me, msg, env):
        work = super().train_local(me, msg, env)
        if env.k == 1:
            work.reply = lambda result: Message({"probs": torch.full((3, 4), 0.25)}, {"round": str(env.round + 1)})
        return work


def test_dmlfl_rejects_predictions_of_the_wrong_shape(make_runtime):
    rt = make_runtime(sizes=(30, 22, 17), algorithm="dmlfl", algorithm_class=ShortPredictions, local_epochs=1)
    rt.setup()
    rt.run_round(0, [0, 1, 2], RoundPlan())
    rows = len(rt.alg.run.public_set(0)[1])
    assert rt.events.rejected == [{"client": 1, "reason": f"tensor 'probs' has shape [3, 4], expected [{rows}, 4]"}]
    relays = {dst: set(msg.tensors) for src, dst, msg in rt.messages if src == "server"}
    assert relays == {"client0": {"client2/probs"}, "client1": {"client0/probs", "client2/probs"}, "client2": {"client0/probs"}}


def test_dmlfl_relays_a_constant_label_attackers_one_hot_predictions(make_runtime):
    rt = make_runtime(sizes=(30, 22, 17, 25), algorithm="dmlfl", local_epochs=1,
                      attack={"kind": "constant_label", "clients": [2], "label": 1}, aggregation={"rule": "median"})
    rt.setup()
    rt.clear()
    rt.run_round(0, [0, 1, 2, 3], RoundPlan())
    rows = len(rt.alg.run.public_set(0)[1])
    hot = torch.nn.functional.one_hot(torch.ones(rows, dtype=torch.long), 4).float()
    relayed = [msg.tensors["client2/probs"] for src, dst, msg in rt.messages if src == "server" and dst != "client2"]
    assert len(relayed) == 3 and all(torch.equal(p, hot) for p in relayed)


def test_empty_messages_cost_nothing_and_are_never_late(make_runtime):
    rt = make_runtime(algorithm="local", faults={"deadline": 2.0})
    rt.setup()
    before = _copy(rt.client_state(1).model)
    stats = rt.run_round(0, [0, 1, 2], RoundPlan(delay={0: 1.0, 1: 3.0, 2: 1.0}, late={1}))
    assert rt.events.late == [] and rt.traffic.log == [] and rt.traffic.reset() == ({}, {})
    assert not _same(state_of(rt.client_state(1).model), before)  # the late client trained as usual
    assert stats["train_loss"] > 0


def test_noise_is_drawn_per_tensor_name(make_runtime):
    rt = make_runtime(attack={"kind": "noise", "clients": [0], "scale": 0.5})
    x = torch.zeros(3, 2)
    ab = corrupt(rt.cfg, {"a": x, "b": x}, None, "weights", 0, 0, "server")
    ba = corrupt(rt.cfg, {"b": x, "a": x}, None, "weights", 0, 0, "server")
    assert torch.equal(ab["a"], ba["a"]) and torch.equal(ab["b"], ba["b"])  # the order of a message's tensors does not matter
    assert not torch.equal(ab["a"], ab["b"])  # two tensors of the same values, under different names, get different noise
    other = corrupt(rt.cfg, {"a": x}, None, "weights", 1, 0, "server")
    assert not torch.equal(other["a"], ab["a"])  # another round, another draw


def test_dmlfl_uses_the_predictions_it_has(tmp_path):
    """DML-FL on real Fashion-MNIST: NaN predictions are rejected and crashed clients publish nothing; the run goes on."""
    from fedmutual.config import Config
    from fedmutual.experiment.runner import run
    from fedmutual.models import build_model
    from fedmutual.protocol import encode

    cfg = Config(algorithm="dmlfl", clients=4, model="mlp", limit_train=800, limit_test=200, rounds=3, batch_size=32,
                 partition="iid", progress=False, threads=1, out=str(tmp_path), public={"size": 100}, seed=2,
                 attack={"kind": "nan", "clients": [1]}, faults={"crash": 0.3}, aggregation={"rule": "median"})
    res = run(cfg, quiet=True)
    init = len(encode(Message(state_of(build_model("mlp", (1, 28, 28), 10)), {"phase": "init"})))  # counted in round 1
    for row in res.metrics:
        f = row["faults"]
        if 1 not in f["crashed"]:
            assert {"client": 1, "reason": "tensor 'probs' has 1000 non-finite values (NaN or Inf)"} in f["rejected"]
        assert row["bytes_up_per_client"][1] > 0 or 1 in f["crashed"]
        for k in f["crashed"]:
            assert row["bytes_up_per_client"][k] == 0  # a crashed client publishes nothing
            # and, down for the round, is relayed nothing (round 1 also carries the common initialization)
            assert row["bytes_down_per_client"][k] == (init if row["round"] == 1 else 0)
    # seed 2 draws crashes of client 1 (rounds 1 and 3), of others (all three rounds), and a round with client 1 up
    assert [row["faults"]["crashed"] for row in res.metrics] == [[1, 2], [0], [0, 1]]
    assert res.summary["status"] == "completed" and res.metrics[-1]["client_acc_global_test_mean"] > 0.5
