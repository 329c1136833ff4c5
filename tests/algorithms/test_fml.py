import math

import pytest
import torch
from torch import nn

from fedmutual.algorithms import FML, FedAvg, Independent, Local
from fedmutual.algorithms.base import state_of
from fedmutual.config import FMLConfig, validate
from fedmutual.engine.cohort import Member
from fedmutual.engine.stacked import plan_cohort
from fedmutual.errors import ConfigError


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


# --- model heterogeneity (MH): personalized architectures and a global model of its own -----------

MH = dict(algorithm="fml", model="mlp,lenet5,cnn1", global_model="lenet5")


def _linear_sizes(model):
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]


def test_personalized_models_take_their_clients_architecture_and_the_memes_the_global_one(make_ctx):
    ctx = make_ctx(shape=(1, 12, 12), **MH)
    fml = FML(ctx)
    assert _linear_sizes(fml.local[0]) == [(144, 200), (200, 200), (200, 4)]  # MLP
    assert _linear_sizes(fml.local[1])[-1] == (84, 4)  # LeNet5
    assert _linear_sizes(fml.local[2])[-1] == (120, 4)  # CNN1
    assert _linear_sizes(fml.global_model())[-1] == (84, 4)
    fml.round(0, [0, 1, 2])
    assert all(_linear_sizes(fml.memes[k]) == _linear_sizes(fml.global_model()) for k in range(3))
    # every message, down and up, is exactly a global-model state: no personalized model travels
    keys = set(state_of(fml.global_model()))
    assert len(ctx.transport.messages) == 6
    for src, dst, msg in ctx.transport.messages:
        assert set(msg.tensors) == keys
        assert {k: v.shape for k, v in msg.tensors.items()} == {k: v.shape for k, v in state_of(fml.global_model()).items()}


def test_heterogeneous_clients_need_a_global_model(make_ctx):
    with pytest.raises(ConfigError, match="global_model: fml needs a global model, and the clients' models differ"):
        FML(make_ctx(shape=(1, 12, 12), algorithm="fml", model="mlp,lenet5"))
    with pytest.raises(ConfigError, match="global_model: unknown model 'resnet'"):
        validate({"global_model": "resnet"})
    with pytest.raises(ConfigError, match="global_model: unknown model part 'head'"):
        validate({"global_model": "cnn2:head"})
    with pytest.raises(ConfigError, match="global_model: model part 'mlp:features' has no trainable layers"):
        validate({"global_model": "mlp:features"})


def _train_rounds(ctx, rounds=2):
    fml = FML(ctx)
    for t in range(rounds):
        fml.round(t, [0, 1, 2])
    return fml


def test_mixed_pairs_stack_and_match_the_loop(make_ctx):
    ctx = make_ctx(shape=(1, 12, 12), **MH, engine="stacked")
    probe = FML(ctx)
    probe.round(0, [0, 1, 2])
    jobs = [ctx.job(k, 1, [_member(probe.local[k], ctx), _member(probe.memes[k], ctx)]) for k in range(3)]
    assert plan_cohort(jobs, "stacked").loop == []  # a (personalized, meme) pair of different architectures stacks
    stacked = _train_rounds(make_ctx(shape=(1, 12, 12), **MH, engine="stacked"))
    loop = _train_rounds(make_ctx(shape=(1, 12, 12), **MH, engine="loop"))
    assert torch.allclose(_params(stacked.global_model()), _params(loop.global_model()), atol=1e-5)
    for a, b in zip(stacked.local, loop.local):
        assert torch.allclose(_params(a), _params(b), atol=1e-5)
    assert not torch.equal(_params(loop.local[0]), _params(FML(make_ctx(shape=(1, 12, 12), **MH)).local[0]))  # it trained


def _member(model, ctx):
    return Member(model, ctx.optimizer(model), 0.5, 0.5)


def test_independent_is_local_and_starts_from_fmls_personalized_models(make_ctx):
    ctx = make_ctx(shape=(1, 12, 12), **{**MH, "algorithm": "independent"})
    ind, fml = Independent(ctx), FML(make_ctx(shape=(1, 12, 12), **MH))
    assert isinstance(ind, Local) and ind.name == "independent"
    for k in range(3):
        assert torch.equal(_params(ind.client_model(k)), _params(fml.client_model(k)))
    ind.round(0, [0, 1, 2])
    assert ctx.transport.messages == []


@pytest.mark.parametrize("engine", ["loop", "stacked"])
def test_mutual_step_between_different_architectures_has_the_hand_computed_gradients(engine):
    """One FML step, personalized = a linear layer, meme = linear -> ReLU -> linear, against the gradients by hand.

    x = (1, 2), y = 0, two classes. z_local = W x = (0.5, 0.1); the meme's hidden unit
    h = relu(v·x) = relu(0.5 + 0.5) = 1 and z_meme = u·h = (1, -1). With SGD at lr 1 and
    no momentum or decay, each parameter moves by minus its gradient:
        dL_local/dz_local = alpha·(p_local - e_y) + (1 - alpha)·(p_local - p_meme),  dW = dz ⊗ x
        dL_meme/dz_meme   = beta ·(p_meme - e_y)  + (1 - beta) ·(p_meme - p_local),  du = dz·h,  dv = (u·dz)·x
    (the teacher is detached: neither loss reaches the other model).
    """
    from fedmutual.engine.cohort import ClientJob, run_cohort, sgd

    alpha, beta = 0.3, 0.6
    local = nn.Sequential(nn.Linear(2, 2, bias=False))
    meme = nn.Sequential(nn.Linear(2, 1, bias=False), nn.ReLU(), nn.Linear(1, 2, bias=False))
    with torch.no_grad():
        local[0].weight.copy_(torch.tensor([[0.1, 0.2], [0.3, -0.1]]))
        meme[0].weight.copy_(torch.tensor([[0.5, 0.25]]))
        meme[2].weight.copy_(torch.tensor([[1.0], [-1.0]]))
    members = [Member(local, sgd(local, 1.0, 0.0, 0.0), alpha, 1 - alpha), Member(meme, sgd(meme, 1.0, 0.0, 0.0), beta, 1 - beta)]
    job = ClientJob(0, members, torch.tensor([[1.0, 2.0]]), torch.tensor([0]), epochs=1, batch_size=1, shuffle_seed=0)
    (result,) = run_cohort([job], 0, engine=engine)

    def softmax(z):
        e = [math.exp(v) for v in z]
        return [v / sum(e) for v in e]

    x, onehot, h, u, v = (1.0, 2.0), (1.0, 0.0), 1.0, (1.0, -1.0), (0.5, 0.25)
    p_l, p_m = softmax([0.5, 0.1]), softmax([1.0, -1.0])
    dz_l = [alpha * (p_l[c] - onehot[c]) + (1 - alpha) * (p_l[c] - p_m[c]) for c in range(2)]
    dz_m = [beta * (p_m[c] - onehot[c]) + (1 - beta) * (p_m[c] - p_l[c]) for c in range(2)]
    W0 = [[0.1, 0.2], [0.3, -0.1]]
    W1 = [[W0[c][i] - dz_l[c] * x[i] for i in range(2)] for c in range(2)]
    u1 = [[u[c] - dz_m[c] * h] for c in range(2)]
    dh = sum(u[c] * dz_m[c] for c in range(2))
    v1 = [[v[i] - dh * x[i] for i in range(2)]]
    flat = lambda rows: [a for row in rows for a in row]  # noqa: E731
    assert local[0].weight.flatten().tolist() == pytest.approx(flat(W1), abs=1e-6)
    assert meme[2].weight.flatten().tolist() == pytest.approx(flat(u1), abs=1e-6)
    assert meme[0].weight.flatten().tolist() == pytest.approx(flat(v1), abs=1e-6)
    kl = lambda p, q: sum(a * math.log(a / b) for a, b in zip(p, q))  # noqa: E731
    loss_l = alpha * -math.log(p_l[0]) + (1 - alpha) * kl(p_m, p_l)
    loss_m = beta * -math.log(p_m[0]) + (1 - beta) * kl(p_l, p_m)
    assert result.loss == pytest.approx([loss_l, loss_m], abs=1e-6)


# --- objective heterogeneity (OH): a shared encoder, per-client adaptor heads and tasks -------------

OH = dict(algorithm="fml", model="lenet5,cnn1", global_model="lenet5:features")


def _oh_ctx(make_ctx, **kw):
    """Two clients on the same 4-class data: client 0 learns the 4 classes, client 1 two groups of them."""
    from fedmutual.data.tasks import parse_task

    ctx = make_ctx(sizes=(40, 28), shape=(1, 12, 12), **{**OH, **kw})
    for d, spec in zip(ctx.clients, ("classes", "groups:0,3|1,2")):
        d.task = parse_task(spec, 4)
        d.y, d.val_y = d.task.apply(d.y), d.task.apply(d.val_y)
    return ctx


def test_oh_only_the_encoder_travels_and_heads_and_personalized_models_stay(make_ctx):
    ctx = _oh_ctx(make_ctx)
    fml = FML(ctx)
    assert fml.global_model() is None  # an encoder has no task of its own
    heads = [fml.memes[k].head for k in range(2)]
    assert [h.out_features for h in heads] == [4, 2] and [_linear_sizes(m)[-1][1] for m in fml.local] == [4, 2]
    before = [h.weight.detach().clone() for h in heads]
    for t in range(2):
        fml.round(t, [0, 1])
    encoder = {k: v.shape for k, v in state_of(fml.global_).items()}
    assert set(encoder) == {"0.weight", "0.bias", "3.weight", "3.bias"}  # LeNet5's two convs
    assert len(ctx.transport.messages) == 8
    private = [state_of(m) for m in fml.local] + [state_of(h) for h in heads]
    for src, dst, msg in ctx.transport.messages:
        assert {k: v.shape for k, v in msg.tensors.items()} == encoder, (src, dst)
        for state in private:  # no personalized or head tensor, under any name
            assert not any(v.shape == w.shape and torch.equal(v, w) for v in msg.tensors.values() for w in state.values())
    sent, _ = ctx.transport.reset_counts()
    payload = sum(v.numel() * 4 for v in state_of(fml.global_).values())
    assert all(payload < sent[f"client{k}"] / 2 < payload + 1024 for k in range(2))  # two uploads of the encoder only
    # heads trained and persisted across rounds; the global encoder is the mean of the memes' encoders
    assert all(not torch.equal(b, h.weight) for b, h in zip(before, heads))
    for key, v in state_of(fml.global_).items():
        mean = (state_of(fml.memes[0].encoder)[key] + state_of(fml.memes[1].encoder)[key]) / 2
        assert torch.allclose(v, mean, atol=1e-6)
    # what is evaluated in place of a global model: the global encoder with each client's own head
    memes = fml.extra_models()["meme"]
    x = ctx.clients[0].x[:3]
    assert [m(x).shape[-1] for m in memes] == [4, 2]
    assert torch.equal(memes[1](x), fml.memes[1].head(fml.global_(x)))


def test_oh_adaptor_heads_can_have_hidden_layers(make_ctx):
    fml = FML(_oh_ctx(make_ctx, fml=FMLConfig(adaptor_hidden=[16])))
    assert [_linear_sizes(fml.memes[k].head) for k in range(2)] == [[(16, 16), (16, 4)], [(16, 16), (16, 2)]]  # 16 features on 12x12 inputs
    fml.round(0, [0, 1])


def test_oh_runs_the_same_on_either_engine(make_ctx):
    runs = {}
    for engine in ("loop", "stacked"):
        fml = FML(_oh_ctx(make_ctx, engine=engine))
        for t in range(2):
            fml.round(t, [0, 1])
        runs[engine] = fml
    a, b = runs["loop"], runs["stacked"]
    assert torch.allclose(_params(a.global_), _params(b.global_), atol=1e-5)
    for k in range(2):
        assert torch.allclose(_params(a.memes[k].head), _params(b.memes[k].head), atol=1e-5)
        assert torch.allclose(_params(a.local[k]), _params(b.local[k]), atol=1e-5)


def test_clients_on_different_tasks_need_a_partial_global_model(make_ctx):
    with pytest.raises(ConfigError, match="task: the clients' tasks differ .* give FML a partial global model"):
        FML(_oh_ctx(make_ctx, global_model="lenet5"))


def test_two_clients_on_different_tasks_end_to_end_on_real_fashion_mnist(tmp_path):
    """Client 0 learns the 10 classes, client 1 upper-body clothing (T-shirt, pullover, coat, shirt)
    against the rest, sharing LeNet5's conv layers. Each is trained and evaluated under its own task:
    client 1's two-way predictions compared with the unmapped labels 0..9 could not reach 80%."""
    from fedmutual.engine.runner import run

    tasks = ["classes", "groups:0,2,4,6|1,3,5,7,8,9"]
    cfg = validate(dict(algorithm="fml", partition="iid", clients=2, model="lenet5,cnn1", global_model="lenet5:features",
                        task=tasks, limit_train=1200, limit_test=600, rounds=3, batch_size=32, lr=0.03,
                        out=str(tmp_path), progress=False, threads=1))
    res = run(cfg, quiet=True)
    last = res.metrics[-1]
    assert last["global_acc"] is None and len(last["meme_acc_global_test"]) == 2
    assert last["client_acc_global_test"][1] >= 0.8 and last["personal_acc"][1] >= 0.8, last
    assert last["client_acc_global_test"][0] >= 0.4, last  # 10 classes; chance is 10%
    encoder_bytes = 4 * (6 * 1 * 25 + 6 + 16 * 6 * 25 + 16)  # LeNet5's two convs, float32
    assert all(encoder_bytes < up < encoder_bytes + 1024 for up in last["bytes_up_per_client"])
    alone = run(cfg.model_copy(update={"algorithm": "independent"}), quiet=True)
    assert alone.metrics[-1]["bytes_up"] == 0 and alone.metrics[-1]["client_acc_global_test"][1] >= 0.8
    with pytest.raises(ConfigError, match="task: fedavg trains one model for every client"):
        run(validate({**cfg.to_dict(), "algorithm": "fedavg", "model": "lenet5"}), quiet=True)
