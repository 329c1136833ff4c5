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
