import torch

from fedmutual.aggregation import weighted_mean
from fedmutual.protocol import state_of
from fedmutual.runtimes.faults import RoundPlan


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_fedavg_global_is_the_sample_weighted_mean_of_client_models(make_runtime):
    rt = make_runtime(algorithm="fedavg")
    rt.setup()
    sent = state_of(rt.server_state().global_)
    sent = {k: v.clone() for k, v in sent.items()}
    rt.run_round(0, [0, 1, 2], RoundPlan())
    states = [state_of(rt.client_state(k).model) for k in range(3)]
    expected = weighted_mean(states, [40, 28, 17])
    for key, v in state_of(rt.server_state().global_).items():
        assert torch.allclose(v, expected[key], atol=1e-7)
    uniform = weighted_mean(states)
    assert not torch.allclose(state_of(rt.server_state().global_)["1.weight"], uniform["1.weight"], atol=1e-6)
    # down: the global model of round 0 to each client; up: each client's weights and its sample count
    trips = [(src, dst, meta) for src, dst, _, meta in rt.traffic.log]
    assert trips == [("server", f"client{k}", {"round": "0"}) for k in range(3)] + \
        [(f"client{k}", "server", {"num_samples": str(n)}) for k, n in zip(range(3), (40, 28, 17))]
    model_bytes = sum(v.numel() * 4 for v in sent.values())
    for (src, dst, msg), (_, _, nbytes, _) in zip(rt.messages, rt.traffic.log):
        assert set(msg.tensors) == set(sent) and model_bytes < nbytes < model_bytes + 1024
        if src == "server":
            assert all(torch.equal(msg.tensors[k], sent[k]) for k in sent)
        else:
            assert all(torch.equal(msg.tensors[k], states[int(src[6:])][k]) for k in sent)


def test_fedprox_with_mu_zero_is_fedavg_and_mu_pulls_towards_global(make_runtime):
    avg = make_runtime(algorithm="fedavg")
    prox0 = make_runtime(algorithm="fedprox", fedprox={"mu": 0.0})
    prox = make_runtime(algorithm="fedprox", fedprox={"mu": 5.0})
    start = _params(avg.server_state().global_).clone()
    for rt in (avg, prox0, prox):
        assert torch.equal(_params(rt.server_state().global_), start)  # the same initial global model
        rt.setup()
        rt.run_round(0, [0, 1, 2], RoundPlan())
    g = lambda rt: _params(rt.server_state().global_)  # noqa: E731
    assert torch.allclose(g(avg), g(prox0), atol=1e-7)
    # the proximal term keeps the update smaller
    assert (g(prox) - start).norm() < (g(avg) - start).norm()


def test_local_sends_nothing(make_runtime):
    rt = make_runtime(algorithm="local")
    rt.setup()
    before = [_params(rt.client_state(k).model).clone() for k in range(3)]
    stats = rt.run_round(0, [0, 1, 2], RoundPlan())
    # the requests and acknowledgements carry nothing, so they cost nothing
    assert rt.traffic.reset() == ({}, {}) and rt.traffic.log == []
    assert rt.alg.global_model(rt.server_state()) is None
    assert all(not torch.equal(b, _params(rt.client_state(k).model)) for k, b in enumerate(before))  # each trained
    assert stats["train_loss"] > 0


def test_fedavg_and_local_train_a_binary_task_with_bce_on_real_fashion_mnist(tmp_path):
    from fedmutual.config import Config
    from fedmutual.experiment.runner import run

    # upper-body clothing against the rest: 60% of the test set is "not upper-body"
    base = dict(task="binary:0,2,4,6", model="mlp", clients=3, partition="iid", limit_train=1500, limit_test=1000,
                rounds=2, batch_size=32, lr=0.05, out=str(tmp_path), progress=False, threads=1)
    for algorithm in ("fedavg", "local"):
        rows = run(Config(algorithm=algorithm, **base), quiet=True).metrics
        assert rows[-1]["client_acc_global_test_mean"] >= 0.85, (algorithm, rows)
        assert all(0 < r["train_loss"] < 0.7 for r in rows[1:])  # BCE below log 2 = 0.693: learning


def test_with_folds_every_algorithm_trains_on_dml_fl_s_client_folds(make_runtime):
    a = make_runtime(sizes=(30, 22, 17), algorithm="fedavg", local_data="folds")
    b = make_runtime(sizes=(30, 22, 17), algorithm="dmlfl", local_data="folds")

    def local(rt, k, t):
        env = rt.envs[k]
        env.round = t
        return env.local_data()

    for t in range(2):
        for k in range(3):
            (xa, ya), (xb, yb) = local(a, k, t), local(b, k, t)
            # 69 samples: a public fold of 69 // 4 = 17 and three client folds of (69 - 17) // 3 = 17
            assert len(ya) == 17 and torch.equal(xa, xb) and torch.equal(ya, yb)
        assert not torch.equal(local(a, 0, 0)[0], local(a, 0, 1)[0])
    env = a.envs[0]
    env.round = 1
    job = env.job([])
    assert torch.equal(job.x, local(a, 0, 1)[0])
    # and a round trains on them: a client's job is built on its fold of the round
    seen = []
    handler = a.alg.train

    def spy(me, msg, env):
        work = handler(me, msg, env)
        seen.append((env.k, work.job.x.clone()))
        return work

    a.alg.train = spy  # the runtime looks the handler up by name on the algorithm
    a.setup()
    a.run_round(1, [0, 1, 2], RoundPlan())
    assert [k for k, _ in seen] == [0, 1, 2]
    assert all(torch.equal(x, local(b, k, 1)[0]) for k, x in seen)
