import copy
import math

import pytest
import torch
from torch import nn

from fedmutual.algorithms import Local
from fedmutual.config import validate
from fedmutual.engine.cohort import ClientJob, Member, run_cohort, sgd
from fedmutual.engine.stacked import plan_cohort
from fedmutual.errors import ConfigError
from fedmutual.protocol import state_of
from fedmutual.runtimes.faults import RoundPlan


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _global(rt):
    return rt.server_state().global_


def _rounds(rt, rounds, clients=(0, 1, 2)):
    rt.setup()
    for t in range(rounds):
        rt.run_round(t, list(clients), RoundPlan())
    return rt


def test_fml_with_beta_one_equals_uniform_fedavg(make_runtime):
    fml = make_runtime(algorithm="fml", fml={"alpha": 0.3, "beta": 1.0})
    avg = make_runtime(algorithm="fedavg", fedavg={"weighting": "uniform"})
    start = _params(_global(avg)).clone()
    assert torch.equal(_params(_global(fml)), start)
    fml.setup()
    avg.setup()
    for t in range(3):
        fml.run_round(t, [0, 1, 2], RoundPlan())
        avg.run_round(t, [0, 1, 2], RoundPlan())
        assert torch.allclose(_params(_global(fml)), _params(_global(avg)), atol=1e-6)
    assert not torch.equal(_params(_global(avg)), start)  # it trained


def test_fml_beta_below_one_differs_and_personalized_models_stay_home(make_runtime):
    rt = _rounds(make_runtime(algorithm="fml"), 1)
    avg = _rounds(make_runtime(algorithm="fedavg", fedavg={"weighting": "uniform"}), 1)
    assert not torch.allclose(_params(_global(rt)), _params(_global(avg)), atol=1e-4)
    sent, _ = rt.traffic.reset()
    model_bytes = sum(p.numel() * 4 for p in _global(rt).parameters())
    # each client uploads one model (the meme): its size plus a small header, never two models
    for k in range(3):
        assert model_bytes < sent[f"client{k}"] < model_bytes + 1024
    locals_ = [state_of(rt.client_state(k).local) for k in range(3)]
    for src, dst, msg in rt.messages:  # not one tensor of a personalized model travels
        assert not any(torch.equal(v, w) for v in msg.tensors.values() for s in locals_ for w in s.values() if v.shape == w.shape)
    # what each client uploaded is its meme, with its sample count; the global model is their unweighted mean
    ups = [(src, msg) for src, dst, msg in rt.messages if dst == "server"]
    assert [(src, msg.meta) for src, msg in ups] == [(f"client{k}", {"num_samples": str(n)}) for k, n in enumerate((40, 28, 17))]
    for src, msg in ups:
        assert all(torch.equal(v, state_of(rt.client_state(int(src[6:])).meme)[key]) for key, v in msg.tensors.items())
    mean = {key: sum(m.tensors[key].double() for _, m in ups) / 3 for key in state_of(_global(rt))}
    assert all(torch.allclose(v.double(), mean[key], atol=1e-6) for key, v in state_of(_global(rt)).items())


def test_a_client_round_is_a_mutual_job_with_a_fresh_meme_and_the_persisted_local_optimizer(make_runtime):
    """Round 1 of client 0, assembled by hand: the meme forked from global_1 with a new optimizer, the personalized model
    with the optimizer it kept from round 0 (its momentum buffers), trained together on the client's data."""
    rt = _rounds(make_runtime(algorithm="fml"), 1)
    me = rt.client_state(0)
    opt = me.local_opt
    assert opt.state and all("momentum_buffer" in s for s in opt.state.values())
    local, local_opt = copy.deepcopy((me.local, me.local_opt))  # one memo: the copied optimizer steps the copied model
    meme = copy.deepcopy(me.meme)
    meme.load_state_dict(state_of(_global(rt)))
    with torch.no_grad():  # whatever the client's meme holds now is overwritten by the global model it receives
        for p in me.meme.parameters():
            p.fill_(float("nan"))
    env = rt.envs[0]
    env.round = 1
    job = env.job([Member(local, local_opt, 0.5, 0.5), Member(meme, rt.alg.run.optimizer(meme), 0.5, 0.5)], temperature=1.0)
    run_cohort([job], 1, engine=rt.engine)
    rt.run_round(1, [0], RoundPlan())
    assert rt.client_state(0).local_opt is opt  # the same optimizer, kept across rounds
    assert torch.allclose(_params(rt.client_state(0).local), _params(local), atol=1e-6)
    assert torch.allclose(_params(rt.client_state(0).meme), _params(meme), atol=1e-6)
    # with one participant, the global model is exactly its meme
    assert torch.equal(_params(_global(rt)), _params(rt.client_state(0).meme))


def test_partial_participation_only_trains_sampled_clients(make_runtime):
    rt = make_runtime(algorithm="fml")
    rt.setup()
    before = [_params(rt.client_state(k).local).clone() for k in range(3)]
    rt.run_round(0, [1], RoundPlan())
    after = [_params(rt.client_state(k).local) for k in range(3)]
    assert torch.equal(before[0], after[0]) and torch.equal(before[2], after[2])
    assert not torch.equal(before[1], after[1])
    assert {(src, dst) for src, dst, _, _ in rt.traffic.log} == {("server", "client1"), ("client1", "server")}
    # with one participant, the global model is exactly its meme
    assert torch.equal(_params(_global(rt)), _params(rt.client_state(1).meme))


# --- model heterogeneity (MH): personalized architectures and a global model of its own -----------

MH = dict(algorithm="fml", model="mlp,lenet5,cnn1", global_model="lenet5")


def _linear_sizes(model):
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]


def test_personalized_models_take_their_clients_architecture_and_the_memes_the_global_one(make_runtime):
    rt = make_runtime(shape=(1, 12, 12), **MH)
    local = [rt.client_state(k).local for k in range(3)]
    assert _linear_sizes(local[0]) == [(144, 200), (200, 200), (200, 4)]  # MLP
    assert _linear_sizes(local[1])[-1] == (84, 4)  # LeNet5
    assert _linear_sizes(local[2])[-1] == (120, 4)  # CNN1
    assert _linear_sizes(_global(rt))[-1] == (84, 4)
    _rounds(rt, 1)
    assert all(_linear_sizes(rt.client_state(k).meme) == _linear_sizes(_global(rt)) for k in range(3))
    # every message, down and up, is exactly a global-model state: no personalized model travels
    shapes = {k: v.shape for k, v in state_of(_global(rt)).items()}
    assert len(rt.messages) == len(rt.traffic.log) == 6
    for src, dst, msg in rt.messages:
        assert {k: v.shape for k, v in msg.tensors.items()} == shapes, (src, dst)


def test_heterogeneous_clients_need_a_global_model(make_runtime):
    with pytest.raises(ConfigError, match="global_model: fml needs a global model, and the clients' models differ"):
        make_runtime(shape=(1, 12, 12), algorithm="fml", model="mlp,lenet5")
    with pytest.raises(ConfigError, match="global_model: unknown model 'resnet'"):
        validate({"global_model": "resnet"})
    with pytest.raises(ConfigError, match="global_model: unknown model part 'head'"):
        validate({"global_model": "cnn2:head"})
    with pytest.raises(ConfigError, match="global_model: model part 'mlp:features' has no trainable layers"):
        validate({"global_model": "mlp:features"})


def test_mixed_pairs_stack_and_match_the_loop(make_runtime):
    probe = _rounds(make_runtime(shape=(1, 12, 12), **MH, engine="stacked"), 1)
    run = probe.alg.run
    jobs = []
    for k in range(3):
        me, env = probe.client_state(k), probe.envs[k]
        env.round = 1
        jobs.append(env.job([Member(me.local, run.optimizer(me.local), 0.5, 0.5), Member(me.meme, run.optimizer(me.meme), 0.5, 0.5)]))
    assert plan_cohort(jobs, "stacked").loop == []  # a (personalized, meme) pair of different architectures stacks
    stacked = _rounds(make_runtime(shape=(1, 12, 12), **MH, engine="stacked"), 2)
    loop = _rounds(make_runtime(shape=(1, 12, 12), **MH, engine="loop"), 2)
    assert stacked.engine == "stacked" and loop.engine == "loop"
    assert torch.allclose(_params(_global(stacked)), _params(_global(loop)), atol=1e-5)
    for k in range(3):
        assert torch.allclose(_params(stacked.client_state(k).local), _params(loop.client_state(k).local), atol=1e-5)
    fresh = make_runtime(shape=(1, 12, 12), **MH)
    assert not torch.equal(_params(loop.client_state(0).local), _params(fresh.client_state(0).local))  # it trained


def test_independent_is_local_and_starts_from_fmls_personalized_models(make_runtime):
    ind = make_runtime(shape=(1, 12, 12), **{**MH, "algorithm": "independent"})
    fml = make_runtime(shape=(1, 12, 12), **MH)
    assert isinstance(ind.alg, Local) and ind.alg.name == "independent"
    for k in range(3):
        a = ind.alg.client_model(ind.server_state(), ind.client_state(k))
        b = fml.alg.client_model(fml.server_state(), fml.client_state(k))
        assert torch.equal(_params(a), _params(b))
    _rounds(ind, 1)
    assert ind.traffic.log == [] and ind.traffic.reset() == ({}, {})
    assert not torch.equal(_params(ind.client_state(0).model), _params(fml.client_state(0).local))  # it trained


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


def _oh_runtime(make_runtime, **kw):
    """Two clients on the same 4-class data: client 0 learns the 4 classes, client 1 two groups of them."""
    return make_runtime(sizes=(40, 28), shape=(1, 12, 12), **{**OH, "task": ["classes", "groups:0,3|1,2"], **kw})


def test_oh_only_the_encoder_travels_and_heads_and_personalized_models_stay(make_runtime):
    rt = _oh_runtime(make_runtime)
    assert rt.alg.global_model(rt.server_state()) is None  # an encoder has no task of its own
    heads = [rt.client_state(k).meme.head for k in range(2)]
    assert [h.out_features for h in heads] == [4, 2]
    assert [_linear_sizes(rt.client_state(k).local)[-1][1] for k in range(2)] == [4, 2]
    assert set(rt.envs[0].data.y.tolist()) == {0, 1, 2, 3} and set(rt.envs[1].data.y.tolist()) == {0, 1}  # each task's labels
    before = [h.weight.detach().clone() for h in heads]
    _rounds(rt, 2, clients=(0, 1))
    encoder = {k: v.shape for k, v in state_of(_global(rt)).items()}
    assert set(encoder) == {"0.weight", "0.bias", "3.weight", "3.bias"}  # LeNet5's two convs
    assert len(rt.messages) == 8
    private = [state_of(rt.client_state(k).local) for k in range(2)] + [state_of(h) for h in heads]
    for src, dst, msg in rt.messages:
        assert {k: v.shape for k, v in msg.tensors.items()} == encoder, (src, dst)
        for state in private:  # no personalized or head tensor, under any name
            assert not any(v.shape == w.shape and torch.equal(v, w) for v in msg.tensors.values() for w in state.values())
    sent, _ = rt.traffic.reset()
    payload = sum(v.numel() * 4 for v in state_of(_global(rt)).values())
    assert all(payload < sent[f"client{k}"] / 2 < payload + 1024 for k in range(2))  # two uploads of the encoder only
    # heads trained and persisted across rounds; the global encoder is the mean of the memes' encoders
    assert all(h is rt.client_state(k).meme.head for k, h in enumerate(heads))
    assert all(not torch.equal(b, h.weight) for b, h in zip(before, heads))
    for key, v in state_of(_global(rt)).items():
        mean = (state_of(rt.client_state(0).meme.encoder)[key] + state_of(rt.client_state(1).meme.encoder)[key]) / 2
        assert torch.allclose(v, mean, atol=1e-6)
    # what is evaluated in place of a global model: the global encoder with each client's own head
    memes = [rt.alg.extra_models(rt.server_state(), rt.client_state(k))["meme"] for k in range(2)]
    x = rt.envs[0].data.x[:3]
    assert [m(x).shape[-1] for m in memes] == [4, 2]
    assert torch.equal(memes[1](x), heads[1](_global(rt)(x)))


def test_oh_adaptor_heads_can_have_hidden_layers(make_runtime):
    rt = _oh_runtime(make_runtime, fml={"adaptor_hidden": [16]})
    heads = [rt.client_state(k).meme.head for k in range(2)]
    assert [_linear_sizes(h) for h in heads] == [[(16, 16), (16, 4)], [(16, 16), (16, 2)]]  # 16 features on 12x12 inputs
    before = [_params(h).clone() for h in heads]
    _rounds(rt, 1, clients=(0, 1))
    assert all(not torch.equal(b, _params(h)) for b, h in zip(before, heads))  # the hidden heads train
    assert all(set(msg.tensors) == {"0.weight", "0.bias", "3.weight", "3.bias"} for _, _, msg in rt.messages)


def test_oh_runs_the_same_on_either_engine(make_runtime):
    runs = {engine: _rounds(_oh_runtime(make_runtime, engine=engine), 2, clients=(0, 1)) for engine in ("loop", "stacked")}
    a, b = runs["loop"], runs["stacked"]
    assert torch.allclose(_params(_global(a)), _params(_global(b)), atol=1e-5)
    for k in range(2):
        assert torch.allclose(_params(a.client_state(k).meme.head), _params(b.client_state(k).meme.head), atol=1e-5)
        assert torch.allclose(_params(a.client_state(k).local), _params(b.client_state(k).local), atol=1e-5)


def test_clients_on_different_tasks_need_a_partial_global_model(make_runtime):
    with pytest.raises(ConfigError, match="task: the clients' tasks differ .* give FML a partial global model"):
        _oh_runtime(make_runtime, global_model="lenet5")


def test_two_clients_on_different_tasks_end_to_end_on_real_fashion_mnist(tmp_path):
    """Client 0 learns the 10 classes, client 1 upper-body clothing (T-shirt, pullover, coat, shirt)
    against the rest, sharing LeNet5's conv layers. Each is trained and evaluated under its own task:
    client 1's two-way predictions compared with the unmapped labels 0..9 could not reach 80%."""
    from fedmutual.experiment.runner import run

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
