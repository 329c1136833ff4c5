"""The stacked engine against the plain loop: same parameters, optimizer state, losses and errors."""

from __future__ import annotations

import copy
import math
from functools import partial

import pytest
import torch
from torch import nn

from fedmutual.engine.cohort import ClientJob, Member, count_steps, run_cohort, sgd
from fedmutual.engine.stacked import plan_cohort
from fedmutual.engine.stacking import StackedModel, architecture, optimizer_spec
from fedmutual.errors import NonFiniteLossError
from fedmutual.losses import binary_cross_entropy, cross_entropy
from fedmutual.models import build_model

SHAPES = {"mlp": (1, 12, 12), "lenet5": (1, 12, 12), "cnn1": (1, 12, 12), "cnn2": (1, 12, 12)}
TOL = 1e-5


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_jobs(
    build,
    sizes=(16, 16, 16),
    weights=((1.0, 0.0),),
    opt="sgd",
    momentum=0.9,
    weight_decay=5e-4,
    mu=0.0,
    shape=(1, 12, 12),
    classes=10,
    batch=8,
    epochs=2,
    seed=0,
    lr=0.05,
) -> list[ClientJob]:
    """A cohort: one job per entry of ``sizes``, one member per entry of ``weights`` (w_ce, w_kl)."""
    torch.manual_seed(seed)
    jobs = []
    for k, n in enumerate(sizes):
        members = []
        for w_ce, w_kl in weights:
            model = build()
            if opt == "sgd":
                o = sgd(model, lr, momentum, weight_decay)
            else:
                o = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
            ref = [p.detach() + 0.01 * torch.randn_like(p) for p in model.parameters()] if mu else None
            members.append(Member(model, o, w_ce=w_ce, w_kl=w_kl, prox_mu=mu, prox_ref=ref))
        x, y = torch.randn(n, *shape), torch.randint(0, classes, (n,))
        jobs.append(ClientJob(k, members, x, y, epochs, batch, shuffle_seed=100 + k))
    return jobs


def zoo(name: str):
    return lambda: build_model(name, SHAPES[name], 10)


def max_diff(a: list[ClientJob], b: list[ClientJob]) -> float:
    """Largest difference over every member's state_dict and optimizer state."""
    worst = 0.0
    for ja, jb in zip(a, b):
        for ma, mb in zip(ja.members, jb.members):
            for (ka, va), (kb, vb) in zip(ma.model.state_dict().items(), mb.model.state_dict().items()):
                assert ka == kb
                worst = max(worst, float((va.double() - vb.double()).abs().max()))
            sa, sb = ma.optimizer.state_dict()["state"], mb.optimizer.state_dict()["state"]
            assert sa.keys() == sb.keys()
            for i in sa:
                assert sa[i].keys() == sb[i].keys()
                for key in sa[i]:
                    va, vb = torch.as_tensor(sa[i][key]).double(), torch.as_tensor(sb[i][key]).double()
                    worst = max(worst, float((va - vb).abs().max()))
    return worst


def run_both(jobs: list[ClientJob], rounds: int = 1, engine: str = "stacked"):
    """Train deep copies of the cohort with the loop and with ``engine``; returns both copies and results."""
    loop, other = copy.deepcopy(jobs), copy.deepcopy(jobs)
    for t in range(rounds):
        r_loop = run_cohort(loop, t, engine="loop")
        r_other = run_cohort(other, t, engine=engine)
    assert [r.steps for r in r_loop] == [r.steps for r in r_other]
    for a, b in zip(r_loop, r_other):
        assert a.client == b.client
        assert a.loss == pytest.approx(b.loss, abs=1e-5)
    return loop, other


def assert_same(jobs: list[ClientJob], rounds: int = 1, engine: str = "stacked") -> None:
    assert plan_cohort(jobs, engine).loop == [] or engine == "auto"
    loop, other = run_both(jobs, rounds, engine)
    assert max_diff(loop, other) < TOL


# --- every zoo model, the FedAvg / FedProx / FML shapes of a job ---------------------------------


@pytest.mark.parametrize("name", ["mlp", "lenet5", "cnn1", "cnn2"])
def test_zoo_models_single_member_with_momentum_and_weight_decay(name):
    assert_same(make_jobs(zoo(name)))


@pytest.mark.parametrize("name", ["mlp", "lenet5", "cnn1", "cnn2"])
def test_zoo_models_fml_two_members(name):
    alpha, beta = 0.3, 0.6
    assert_same(make_jobs(zoo(name), weights=((alpha, 1 - alpha), (beta, 1 - beta)), sizes=(16, 16)))


@pytest.mark.parametrize("name", ["mlp", "cnn1"])
def test_plain_sgd_without_momentum_or_weight_decay(name):
    assert_same(make_jobs(zoo(name), momentum=0.0, weight_decay=0.0))


@pytest.mark.parametrize("name", ["mlp", "lenet5"])
def test_fedprox_proximal_term(name):
    assert_same(make_jobs(zoo(name), mu=0.5))


def test_unequal_client_data_sizes_mask_ragged_batches_and_finished_clients():
    # 3 and 9 leave short last batches; 30 runs twice as many steps as 14
    assert_same(make_jobs(zoo("cnn1"), sizes=(14, 3, 30, 9), weights=((0.5, 0.5), (1.0, 0.0))))


def test_three_members_explicit_peers_temperature_and_per_client_weights():
    jobs = make_jobs(zoo("lenet5"), sizes=(10, 16, 7), weights=((0.5, 0.5), (0.2, 0.8), (1.0, 0.3)))
    for k, job in enumerate(jobs):
        job.peers = [[1, 2], [0], [0, 1]]
        job.temperature = 2.0
        job.members[0].w_ce = 0.1 * (k + 1)  # differs between clients
    assert_same(jobs)


def test_fml_pairs_of_different_architectures_and_encoder_head_memes():
    """FML under heterogeneity: (personalized, meme) pairs whose members differ, as the loop trains them.

    Clients 0 and 2 pair an MLP with a LeNet5 meme; client 1 pairs LeNet5 with a CNN1-encoder
    meme plus a 3-way adaptor head (another task), so the cohort forms two groups.
    """
    from fedmutual.models import adaptor_head, build_encoder, with_head

    torch.manual_seed(0)
    shape, jobs = SHAPES["lenet5"], []
    for k, n in enumerate((16, 11, 16)):
        classes = 3 if k == 1 else 10
        local = build_model("lenet5" if k == 1 else "mlp", shape, classes)
        if k == 1:
            encoder, width = build_encoder("cnn1", "encoder", shape)
            meme = with_head(encoder, adaptor_head(width, classes, [7]))
        else:
            meme = build_model("lenet5", shape, classes)
        members = [Member(local, sgd(local, 0.05, 0.9, 5e-4), 0.3, 0.7), Member(meme, sgd(meme, 0.05, 0.9, 5e-4), 0.6, 0.4)]
        jobs.append(ClientJob(k, members, torch.randn(n, *shape), torch.randint(0, classes, (n,)), 2, 8, shuffle_seed=100 + k))
    plan = plan_cohort(jobs, "stacked")
    assert sorted(map(sorted, plan.groups)) == [[0, 2], [1]] and plan.loop == []
    assert_same(jobs, rounds=2)


def test_persistent_optimizer_continues_across_rounds():
    jobs = make_jobs(zoo("lenet5"), sizes=(16, 9))
    assert_same(jobs, rounds=2)


def test_adam_matches_torch_with_identical_gradients_bit_for_bit():
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)) for _ in range(3)]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=1e-3) for m in models]
    twins = copy.deepcopy(models)
    twin_opts = [torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=1e-3) for m in twins]
    # model 0 already took two steps: per-model step counts and bias corrections
    for _ in range(2):
        for m, o in ((models[0], opts[0]), (twins[0], twin_opts[0])):
            for p in m.parameters():
                p.grad = torch.ones_like(p)
            o.step()
    from fedmutual.engine.stacking import StackedAdam

    stack = StackedModel(twins)
    opt = StackedAdam(optimizer_spec(twin_opts[0], twins[0]), stack, twin_opts)
    for _ in range(3):
        grads = [[torch.randn_like(p) for p in m.parameters()] for m in models]
        for m, o, g in zip(models, opts, grads):
            for p, gp in zip(m.parameters(), g):
                p.grad = gp.clone()
            o.step()
        for i, p in enumerate(stack.parameters()):
            p.grad = stack.pack(i, [g[i] for g in grads])
        opt.step(3)
    stack.write_back()
    opt.write_back()
    for m, t, o, to in zip(models, twins, opts, twin_opts):
        for p, q in zip(m.parameters(), t.parameters()):
            assert torch.equal(p, q)
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(o.state[p][key], to.state[q][key])


@pytest.mark.parametrize("name", ["mlp", "lenet5"])
def test_adam_in_the_engine(name):
    # Adam divides by sqrt(v): a small learning rate keeps rounding differences at rounding size
    assert_same(make_jobs(zoo(name), opt="adam", lr=1e-3, weight_decay=1e-3, sizes=(16, 11)), rounds=2)


# --- layer conversions ------------------------------------------------------------------------


def rich_net(p: float = 0.0) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(4), nn.GELU(), nn.AvgPool2d(2),
        nn.Dropout2d(p), nn.Conv2d(4, 6, 3, groups=2, bias=False), nn.LeakyReLU(0.1), nn.AdaptiveMaxPool2d(2),
        nn.Flatten(), nn.Linear(24, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(p),
        nn.Sequential(nn.Linear(16, 12), nn.ELU(), nn.Sigmoid()), nn.Linear(12, 5, bias=False),
    )


def test_round_trip_conversion_keeps_every_parameter_and_buffer():
    models = [rich_net() for _ in range(3)]
    for m in models:  # non-trivial BatchNorm statistics
        m.train()
        m(torch.randn(8, 2, 8, 8))
    before = [copy.deepcopy(m.state_dict()) for m in models]
    stack = StackedModel(models)
    with torch.no_grad():
        for p in stack.parameters():
            p.add_(1.0)
    stack.write_back()
    for m, sd in zip(models, before):
        for k, v in m.state_dict().items():
            expected = sd[k] + 1.0 if k in dict(m.named_parameters()) else sd[k]
            assert torch.equal(v, expected), k


def test_batchnorm_and_dropout_layers_train_like_the_loop_with_unequal_sizes():
    jobs = make_jobs(rich_net, sizes=(16, 21, 7, 30), shape=(2, 8, 8), classes=5, weights=((0.5, 0.5), (1.0, 0.0)))
    assert_same(jobs)


def test_vector_and_matrix_samples():
    vec = lambda: nn.Sequential(nn.Linear(20, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))  # noqa: E731
    assert_same(make_jobs(vec, sizes=(12, 19), shape=(20,), classes=4))
    mat = lambda: nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 4))  # noqa: E731
    assert_same(make_jobs(mat, sizes=(12, 17), shape=(6, 6), classes=4))


def test_stacked_forward_equals_each_models_forward():
    models = [rich_net() for _ in range(3)]
    x = torch.randn(3, 8, 2, 8, 8)
    stack = StackedModel(copy.deepcopy(models))
    out = stack.forward(x)
    for k, m in enumerate(models):
        m.train()
        assert torch.allclose(out[k], m(x[k]), atol=1e-5)


def test_dropout_masks_differ_between_clients_at_the_expected_rate():
    net = lambda: nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(64, 3))  # noqa: E731
    base = net()
    models = [copy.deepcopy(base) for _ in range(4)]
    stack = StackedModel(models)
    x = torch.ones(1, 256, 64).expand(4, 256, 64)  # the same input for every client
    h = stack.layers[1][1].forward(stack._input(x, 1), 4, None)  # after dropout
    dropped = (h == 0).double().mean(dim=(1, 2))
    assert torch.all((dropped - 0.5).abs() < 0.03)  # 16384 draws each
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.equal(h[a] == 0, h[b] == 0)


# --- what goes to the loop, and the plan ------------------------------------------------------


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(144, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_unconvertible_models_and_options_fall_back_to_the_loop_silently():
    cases = []
    cases.append(make_jobs(Custom))  # a user-defined module
    prelu = lambda: nn.Sequential(nn.Flatten(), nn.Linear(144, 8), nn.PReLU(), nn.Linear(8, 10))  # noqa: E731
    cases.append(make_jobs(prelu))  # a layer with parameters of its own kind
    jobs = make_jobs(zoo("mlp"))
    for job in jobs:
        job.ce = lambda z, y: cross_entropy(z, y)  # a CE the stacked path cannot express
    cases.append(jobs)
    for kw in ({"nesterov": True}, {"dampening": 0.1}):
        jobs = make_jobs(zoo("mlp"))
        for job in jobs:
            m = job.members[0]
            m.optimizer = torch.optim.SGD(m.model.parameters(), lr=0.05, momentum=0.9, **kw)
        cases.append(jobs)
    jobs = make_jobs(zoo("mlp"))
    for job in jobs:
        m = job.members[0]
        m.optimizer = torch.optim.Adam(m.model.parameters(), amsgrad=True)
    cases.append(jobs)
    jobs = make_jobs(zoo("mlp"))
    for job in jobs:
        m = job.members[0]
        params = list(m.model.parameters())
        m.optimizer = torch.optim.SGD([{"params": params[:2], "lr": 0.1}, {"params": params[2:]}], lr=0.05)
    cases.append(jobs)
    jobs = make_jobs(zoo("mlp"))
    for job in jobs:
        job.members[0].optimizer = torch.optim.RMSprop(job.members[0].model.parameters())
    cases.append(jobs)
    for jobs in cases:
        assert plan_cohort(jobs, "stacked").groups == []
        loop, other = run_both(jobs)
        assert max_diff(loop, other) == 0.0  # it is the loop


def test_shared_model_between_jobs_goes_to_the_loop():
    jobs = make_jobs(zoo("mlp"), sizes=(8, 8))
    jobs[1].members[0] = jobs[0].members[0]
    assert plan_cohort(jobs, "stacked").groups == []


def test_hooks_make_a_model_unconvertible():
    m = build_model("mlp", (1, 12, 12), 10)
    assert architecture(m) is not None
    m[1].register_forward_hook(lambda *a: None)
    assert architecture(m) is None


def test_auto_stacks_unless_a_call_would_hold_one_model():
    assert plan_cohort(make_jobs(zoo("lenet5")), "auto").groups == [[0, 1, 2]]
    # CNN2 on 28x28 at B = 128: one client's first-layer activations fill the cache budget
    cnn2 = lambda: build_model("cnn2", (1, 28, 28), 10)  # noqa: E731
    wide = make_jobs(cnn2, sizes=(4, 4, 4), shape=(1, 28, 28), batch=128)
    assert plan_cohort(wide, "auto").groups == []
    assert plan_cohort(wide, "stacked").groups == [[0, 1, 2]]
    assert plan_cohort(make_jobs(cnn2, sizes=(4, 4, 4), shape=(1, 28, 28), batch=32), "auto").groups == [[0, 1, 2]]
    two = make_jobs(cnn2, sizes=(4, 4, 4), shape=(1, 28, 28), batch=128, weights=((0.5, 0.5), (0.5, 0.5)))
    assert plan_cohort(two, "auto").groups == [[0, 1, 2]]  # a client's two members share a call
    # a linear-only model with a large step is left to the loop
    mlp = lambda: build_model("mlp", (1, 28, 28), 10)  # noqa: E731
    assert plan_cohort(make_jobs(mlp, sizes=(4, 4), shape=(1, 28, 28), batch=32), "auto").groups == [[0, 1]]
    assert plan_cohort(make_jobs(mlp, sizes=(4, 4), shape=(1, 28, 28), batch=128), "auto").groups == []
    assert plan_cohort(make_jobs(zoo("mlp"), sizes=(8,)), "auto").groups == []
    mixed = make_jobs(zoo("mlp"), sizes=(8, 8)) + make_jobs(zoo("cnn1"), sizes=(8, 8))
    for i, job in enumerate(mixed):
        job.client = i
    assert plan_cohort(mixed, "auto").groups == [[0, 1], [2, 3]]
    assert_same(mixed, engine="auto")
    with pytest.raises(ValueError, match="engine"):
        plan_cohort(mixed, "fast")


def test_on_step_counts_client_steps_like_the_loop():
    jobs = make_jobs(zoo("mlp"), sizes=(14, 3, 30))
    calls = []
    run_cohort(copy.deepcopy(jobs), 0, on_step=lambda: calls.append(1), engine="stacked")
    assert len(calls) == count_steps(jobs)


def test_non_finite_loss_names_the_first_client_in_cohort_order_like_the_loop():
    jobs = make_jobs(zoo("mlp"), sizes=(16, 16, 16, 16), epochs=1)
    jobs[1].x[12] = float("nan")  # client 1 fails late (in whichever batch holds sample 12)
    jobs[3].x[:] = float("nan")  # client 3 fails at once; the loop never gets there
    errors = []
    for engine in ("loop", "stacked"):
        with pytest.raises(NonFiniteLossError) as e:
            run_cohort(copy.deepcopy(jobs), 4, engine=engine)
        errors.append(e.value)
    assert [(e.client, e.round) for e in errors] == [(1, 5), (1, 5)]
    assert all(math.isnan(e.value) for e in errors)


def test_partial_of_a_stackable_ce_stacks():
    jobs = make_jobs(zoo("mlp"), sizes=(8, 8))
    ce = partial(cross_entropy)
    for job in jobs:
        job.ce = ce
    assert plan_cohort(jobs, "stacked").groups == [[0, 1]]
    assert_same(jobs)


# --- a real run on either engine --------------------------------------------------------------


def test_short_fml_run_gives_the_same_metrics_on_either_engine(tmp_path):
    from fedmutual.config import Config
    from fedmutual.engine.runner import run

    metrics = {}
    for engine in ("loop", "stacked"):
        cfg = Config(algorithm="fml", clients=4, limit_train=800, limit_test=400, rounds=2, engine=engine,
                     out=str(tmp_path / engine), progress=False, threads=1)
        metrics[engine] = run(cfg, quiet=True).metrics
    for a, b in zip(metrics["loop"], metrics["stacked"]):
        accs = [k for k in a if "acc" in k]
        assert accs and {k: a[k] for k in accs} == {k: b[k] for k in accs}
        for k in ("train_loss_local", "train_loss_meme"):
            assert a[k] == pytest.approx(b[k], abs=1e-5)


def test_stacked_models_are_freed_when_the_cohort_ends(monkeypatch):
    import gc
    import weakref

    import fedmutual.engine.stacked as stacked

    made = []

    def recording(*args, **kwargs):
        opt = real(*args, **kwargs)
        made.append((weakref.ref(opt), weakref.ref(opt.params[0])))
        return opt

    real = stacked.stacked_optimizer
    monkeypatch.setattr(stacked, "stacked_optimizer", recording)
    gc.disable()  # no reference cycles: memory is released without the cycle collector
    try:
        run_cohort(make_jobs(zoo("mlp"), sizes=(8, 8)), 0, engine="stacked")
        assert made and all(opt() is None and param() is None for opt, param in made)
    finally:
        gc.enable()


# --- fixed teacher probabilities (DML-FL) ------------------------------------------------------


def _with_teachers(jobs: list[ClientJob], outputs: int, peers: int = 3, kl: str = "softmax", binary: bool = False):
    g = torch.Generator().manual_seed(7)
    for job in jobs:
        z = torch.randn(len(job.y), peers, outputs, generator=g)
        job.teachers = [torch.sigmoid(z) if binary else torch.softmax(z, -1)]
        job.kl = kl
        if binary:
            job.ce, job.y = binary_cross_entropy, job.y % 2
    return jobs


@pytest.mark.parametrize("name", ["mlp", "cnn1", "dmlcnn"])
def test_fixed_teachers_softmax_kl_stacked_equals_loop(name):
    build = lambda: _no_dropout(build_model(name, (1, 20, 20), 10))  # noqa: E731
    jobs = make_jobs(build, sizes=(16, 11, 23), weights=((1.0, 0.7),), opt="adam", lr=1e-3, weight_decay=0.0, shape=(1, 20, 20))
    assert_same(_with_teachers(jobs, 10), rounds=2)


@pytest.mark.parametrize("kl", ["bernoulli", "faithful"])
def test_fixed_teachers_binary_kl_and_bce_stacked_equals_loop(kl):
    build = lambda: _no_dropout(build_model("dmlcnn", (1, 20, 20), 1))  # noqa: E731
    jobs = make_jobs(build, sizes=(16, 9, 20), weights=((1.0, 1.0),), classes=2, shape=(1, 20, 20))
    assert_same(_with_teachers(jobs, 1, peers=4, kl=kl, binary=True))


def test_fixed_teachers_unlabelled_kl_only_and_the_job_key():
    jobs = _with_teachers(make_jobs(zoo("lenet5"), sizes=(16, 12), weights=((0.0, 1.0),)), 10, peers=2)
    assert_same(jobs)
    # different teacher counts or KL modes never share a stack
    other = _with_teachers(make_jobs(zoo("lenet5"), sizes=(16,), weights=((0.0, 1.0),)), 10, peers=3)
    assert len(plan_cohort(jobs + other, "stacked").groups) == 2


def _no_dropout(model: nn.Module) -> nn.Module:
    """Dropout draws different masks on the two paths; p = 0 makes them comparable."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model
