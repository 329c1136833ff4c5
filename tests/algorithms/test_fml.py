import torch

from fedmutual.algorithms import FML, FedAvg
from fedmutual.config import FMLConfig


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_fml_with_beta_one_equals_uniform_fedavg(make_ctx):
    fml = FML(make_ctx(algorithm="fml", fml=FMLConfig(alpha=0.3, beta=1.0)))
    avg = FedAvg(make_ctx(algorithm="fedavg", fedavg={"weighting": "uniform"}))
    assert torch.equal(_params(fml.global_model()), _params(avg.global_model()))
    for t in range(3):
        fml.round(t, [0, 1, 2])
        avg.round(t, [0, 1, 2])
        assert torch.allclose(_params(fml.global_model()), _params(avg.global_model()), atol=1e-6)
    assert not torch.equal(_params(avg.global_model()), _params(FedAvg(make_ctx()).global_model()))  # it trained


def test_fml_beta_below_one_differs_and_personalized_models_stay_home(make_ctx):
    ctx = make_ctx(algorithm="fml")
    fml = FML(ctx)
    avg = FedAvg(make_ctx(algorithm="fedavg", fedavg={"weighting": "uniform"}))
    fml.round(0, [0, 1, 2])
    avg.round(0, [0, 1, 2])
    assert not torch.allclose(_params(fml.global_model()), _params(avg.global_model()), atol=1e-4)
    sent, _ = ctx.transport.reset_counts()
    model_bytes = sum(p.numel() * 4 for p in fml.global_model().parameters())
    # each client uploads one model (the meme): its size plus a small header, never two models
    for k in range(3):
        assert model_bytes < sent[f"client{k}"] < model_bytes + 1024


def test_meme_optimizer_is_fresh_each_round_and_local_optimizer_persists(make_ctx):
    fml = FML(make_ctx(algorithm="fml"))
    fml.round(0, [0, 1, 2])
    state = fml.local_opt[0].state
    assert state and all("momentum_buffer" in s for s in state.values())
    # the meme is re-forked from the global model: after loading, a new round starts from global_t exactly
    g = _params(fml.global_model()).clone()
    fml.round(1, [0])
    assert not torch.equal(g, _params(fml.global_model()))


def test_partial_participation_only_trains_sampled_clients(make_ctx):
    fml = FML(make_ctx(algorithm="fml"))
    before = [_params(m).clone() for m in fml.local]
    fml.round(0, [1])
    after = [_params(m) for m in fml.local]
    assert torch.equal(before[0], after[0]) and torch.equal(before[2], after[2])
    assert not torch.equal(before[1], after[1])
    # with one participant, the global model is exactly its meme
    assert torch.equal(_params(fml.global_model()), _params(fml.memes[1]))
