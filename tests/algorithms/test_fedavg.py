import torch

from fedmutual.aggregation import weighted_mean
from fedmutual.algorithms import FedAvg, FedProx, Local
from fedmutual.algorithms.base import state_of


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_fedavg_global_is_the_sample_weighted_mean_of_client_models(make_ctx):
    alg = FedAvg(make_ctx(algorithm="fedavg"))
    alg.round(0, [0, 1, 2])
    states = [state_of(alg.work[k]) for k in range(3)]
    expected = weighted_mean(states, [40, 28, 17])
    for key, v in state_of(alg.global_model()).items():
        assert torch.allclose(v, expected[key], atol=1e-7)
    uniform = weighted_mean(states)
    assert not torch.allclose(state_of(alg.global_model())["1.weight"], uniform["1.weight"], atol=1e-6)


def test_fedprox_with_mu_zero_is_fedavg_and_mu_pulls_towards_global(make_ctx):
    avg = FedAvg(make_ctx(algorithm="fedavg"))
    prox0 = FedProx(make_ctx(algorithm="fedprox", fedprox={"mu": 0.0}))
    prox = FedProx(make_ctx(algorithm="fedprox", fedprox={"mu": 5.0}))
    start = _params(avg.global_model()).clone()
    for alg in (avg, prox0, prox):
        alg.round(0, [0, 1, 2])
    assert torch.allclose(_params(avg.global_model()), _params(prox0.global_model()), atol=1e-7)
    # the proximal term keeps the update smaller
    assert (_params(prox.global_model()) - start).norm() < (_params(avg.global_model()) - start).norm()


def test_local_sends_nothing(make_ctx):
    ctx = make_ctx(algorithm="local")
    alg = Local(ctx)
    alg.round(0, [0, 1, 2])
    assert ctx.transport.reset_counts() == ({}, {})
    assert alg.global_model() is None


def test_fedavg_and_local_train_a_binary_task_with_bce_on_real_fashion_mnist(tmp_path):
    from fedmutual.config import Config
    from fedmutual.engine.runner import run

    # upper-body clothing against the rest: 60% of the test set is "not upper-body"
    base = dict(task="binary:0,2,4,6", model="mlp", clients=3, partition="iid", limit_train=1500, limit_test=1000,
                rounds=2, batch_size=32, lr=0.05, out=str(tmp_path), progress=False, threads=1)
    for algorithm in ("fedavg", "local"):
        rows = run(Config(algorithm=algorithm, **base), quiet=True).metrics
        assert rows[-1]["client_acc_global_test_mean"] >= 0.85, (algorithm, rows)
        assert all(0 < r["train_loss"] < 0.7 for r in rows[1:])  # BCE below log 2 = 0.693: learning


def test_with_folds_every_algorithm_trains_on_dml_fl_s_client_folds(make_ctx):
    a = make_ctx(sizes=(30, 22, 17), algorithm="fedavg", local_data="folds")
    b = make_ctx(sizes=(30, 22, 17), algorithm="dmlfl", local_data="folds")
    for t in range(2):
        for k in range(3):
            (xa, ya), (xb, yb) = a.local_data(k, t), b.local_data(k, t)
            assert len(ya) == 17 and torch.equal(xa, xb) and torch.equal(ya, yb)
        assert not torch.equal(a.local_data(0, 0)[0], a.local_data(0, 1)[0])
    job = a.job(0, 1, [])
    assert torch.equal(job.x, a.local_data(0, 1)[0])
