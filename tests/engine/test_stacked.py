"""The stacked engine against the plain loop: same parameters, optimizer state, losses and errors."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import partial

import pytest
import torch
from torch import nn

from fedmutual.engine.cohort import ClientJob, JobResult, Member, count_steps, run_cohort, sgd, train_job
from fedmutual.engine.stacked import plan_cohort
from fedmutual.engine.stacking import StackedModel, architecture, flat_layers, optimizer_spec
from fedmutual.errors import NonFiniteLossError
from fedmutual.losses import binary_cross_entropy, cross_entropy
from fedmutual.models import build_model

SHAPES = {"mlp": (1, 12, 12), "lenet5": (1, 12, 12), "cnn1": (1, 12, 12), "cnn2": (1, 12, 12)}


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
    """Train deep copies of the cohort with the loop and with ``engine``; returns both copies and their last results."""
    loop, other = copy.deepcopy(jobs), copy.deepcopy(jobs)
    for t in range(rounds):
        r_loop = run_cohort(loop, t, engine="loop")
        r_other = run_cohort(other, t, engine=engine)
    return loop, other, r_loop, r_other


# --- how close the stacked engine must be to the loop -------------------------------------------
#
# The stacked engine computes what the plain loop computes; only the order of floating-point sums
# differs (grouped convolutions, batched matmuls, per-client reductions). Any order of a sum of n
# terms is exact to within about n·u times the sum of the terms' magnitudes (Higham, "Accuracy and
# Stability of Numerical Algorithms", §3.1), u the unit roundoff: 2^-53 ≈ 1.1e-16 in float64,
# 2^-24 ≈ 6e-8 in float32. Over a job of S steps, each tensor T that training changes (parameter,
# BatchNorm buffer, optimizer state) is rounded when stored (values of size ≤ P = max_s |T_s|) and
# receives, per step, the error of a gradient whose terms are of size ≤ G (the largest gradient
# entry of the member's parameters over the run), scaled by the optimizer's gain κ from a gradient
# error to a state change (see `gain`). To first order, for either engine,
#
#     |T - T_exact| ≤ bound(T) = u · n · S · (P + κ · G),
#
# n the longest sum in one step (`reduction_length`). `assert_same` checks the engine twice:
#
# 1. In float64 against the float64 loop: |T_stacked - T_loop| ≤ 2 · bound(T) (each is within
#    bound(T) of the exact run), and the same for the reported losses. Correct stacking stays more than
#    a thousand times below it; wrong arithmetic (swapped clients, no momentum, one learning rate 1 %
#    off) moves some tensor by 10^3 (Adam, whose gain lr/eps puts its bound near 1e-6) to 10^11 (SGD,
#    near 1e-12) times the bound.
# 2. In float32 against the same float64 run, where a priori bounds are no longer informative: Adam
#    turns gradient noise of size u·G on an entry whose gradient is near zero into a step of up to
#    lr·u·G/eps, a bias followed by BatchNorm has a gradient that is rounding noise only, and a ReLU
#    or max-pool input within rounding of its kink takes the other branch. The plain loop's own
#    float32 error measures what the cohort gives, in units of each tensor's rounding floor
#
#        floor(T) = u · (S · P + n · path(T)),   path(T) = Σ_s |T_s - T_{s-1}|
#
#    (the rounding of a well-conditioned run: each stored value, and each step's change through sums
#    of n terms). The stacked engine must be as accurate: its largest error over the cohort, in these
#    units, at most SPREAD times the loop's (or than 1 where the loop is well-conditioned). Two
#    summation orders give rounding errors of the same size; which entries an ill-conditioned step
#    hits is chance, hence the maximum over the cohort rather than per tensor, and SPREAD for the
#    spread of such maxima (measured: below 2.1 over five seeds of each case) and other CPUs' kernels.
#    Wrong arithmetic errs by about path(T), 1/(u·n) ≈ 10^4 floors or more.

U64, U32 = 2.0**-53, 2.0**-24
SPREAD = 8.0
Key = tuple[int, int, str]  # (job index, member index, tensor name)


def state_of(member: Member) -> dict[str, torch.Tensor]:
    """Everything training changes in a member: its state_dict and its optimizer's state, by name."""
    out = {f"model.{k}": v for k, v in member.model.state_dict().items()}
    for i, p in enumerate(member.model.parameters()):
        for k, v in member.optimizer.state.get(p, {}).items():
            out[f"optimizer.{i}.{k}"] = torch.as_tensor(v)
    return out


def _exact(name: str, t: torch.Tensor) -> bool:
    """Counters (BatchNorm's batches, Adam's steps) must be equal, not close."""
    return not t.is_floating_point() or name.endswith(".step")


def in_float64(jobs: list[ClientJob]) -> list[ClientJob]:
    """A float64 copy of the cohort: models, optimizer state, data, teachers and FedProx references."""
    out = copy.deepcopy(jobs)
    for job in out:
        job.x = job.x.double()
        if job.teachers is not None:
            job.teachers = [None if t is None else t.double() for t in job.teachers]
        for m in job.members:
            m.model.double()  # in place: the optimizer keeps its parameters
            if m.prox_ref is not None:
                m.prox_ref = [r.double() for r in m.prox_ref]
            for st in m.optimizer.state.values():
                for k, v in st.items():
                    if k != "step" and isinstance(v, torch.Tensor) and v.is_floating_point():
                        st[k] = v.double()
    return out


def reduction_length(job: ClientJob) -> int:
    """The longest sum in one step of the job: a layer's dot products (fan-in) and their transposes
    (fan-out), a weight gradient's sum over the batch and positions, a BatchNorm statistic, a softmax,
    the batch mean of the loss, the FedProx sum."""
    lengths = [job.batch_size]

    def record(mod: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if type(mod) is nn.Linear:
            lengths.extend([mod.in_features, mod.out_features])
        elif type(mod) is nn.Conv2d:
            k = mod.kernel_size[0] * mod.kernel_size[1]
            lengths.extend([mod.in_channels // mod.groups * k, mod.out_channels // mod.groups * k,
                            job.batch_size * out.shape[-2] * out.shape[-1]])
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            lengths.append(job.batch_size * (out[0].numel() // out.shape[1]))

    for m in job.members:
        hooks = [mod.register_forward_hook(record) for mod in m.model.modules()]
        mode = m.model.training
        m.model.eval()
        with torch.no_grad():
            lengths.append(m.model(job.x[:2]).shape[-1])
        m.model.train(mode)
        for h in hooks:
            h.remove()
        if m.prox_mu:
            lengths.append(max(p.numel() for p in m.model.parameters()))
    return max(lengths)


def gain(opt: torch.optim.Optimizer) -> float:
    """κ: by how much, at most, an error δ in a gradient entry moves an entry of any state tensor in one step.

    SGD: the momentum buffer sums past gradients with weights momentum^k, so δ/(1 - momentum), and the
    parameter moves lr times the buffer. Adam: the step lr·m/(√v + eps) moves by at most
    lr·δ·(1 + |m|/√v)/eps, and |m|/√v < 9 for the default betas (Cauchy–Schwarz over the two moving
    averages); exp_avg and exp_avg_sq move by δ and 2·|g|·δ, far less.
    """
    group = opt.param_groups[0]
    if isinstance(opt, torch.optim.SGD):
        return max(1.0, group["lr"]) / (1.0 - group["momentum"])
    return 10.0 * group["lr"] / group["eps"]


class Recorder:
    """``on_step`` for one job of the float64 reference: the scales of every tensor's trajectory."""

    def __init__(self, job: ClientJob):
        self.job, self.steps = job, 0
        self.last = [{k: v.detach().clone() for k, v in state_of(m).items()} for m in job.members]
        self.peak = [{k: float(v.abs().max()) for k, v in last.items() if not _exact(k, v)} for last in self.last]
        self.path = [dict.fromkeys(peak, 0.0) for peak in self.peak]
        self.grad = [0.0] * len(job.members)

    def __call__(self) -> None:
        self.steps += 1
        for i, m in enumerate(self.job.members):
            self.grad[i] = max([self.grad[i]] + [float(p.grad.abs().max()) for p in m.model.parameters() if p.grad is not None])
            now = {k: v.detach().clone() for k, v in state_of(m).items()}
            for k, v in now.items():
                if not _exact(k, v):
                    before = self.last[i].get(k, torch.zeros_like(v))  # optimizer state starts at zero
                    self.peak[i][k] = max(self.peak[i].get(k, 0.0), float(v.abs().max()))
                    self.path[i][k] = self.path[i].get(k, 0.0) + float((v - before).abs().max())
            self.last[i] = now


@dataclass
class Reference:
    """The plain loop's run of a cohort in float64, and the rounding bounds it gives each tensor and loss."""

    jobs: list[ClientJob]
    losses: list[list[float]]  # per job: the last round's JobResult.loss
    bound: dict[Key, float]  # u64 · n · S · (P + κ·G)
    floor: dict[Key, float]  # u32 · (S·P + n·path)
    loss_bound: list[list[float]]  # per job and member
    loss_floor: list[list[float]]


def reference(jobs: list[ClientJob], rounds: int) -> Reference:
    """Run the cohort on the plain loop in float64, recording what the bounds need."""
    ref = in_float64(jobs)
    recorders = [Recorder(job) for job in ref]
    for t in range(rounds):
        results = [train_job(job, t, rec) for job, rec in zip(ref, recorders)]
    bound: dict[Key, float] = {}
    floor: dict[Key, float] = {}
    loss_bound, loss_floor = [], []
    for j, (job, rec, res) in enumerate(zip(ref, recorders, results)):
        n, S = reduction_length(job), max(rec.steps, 1)
        loss_bound.append([])
        loss_floor.append([])
        for i, m in enumerate(job.members):
            kappa = gain(m.optimizer)
            for k, peak in rec.peak[i].items():
                bound[j, i, k] = U64 * n * S * (peak + kappa * rec.grad[i])
                floor[j, i, k] = U32 * (S * peak + n * rec.path[i][k])
            # the loss: its own sums, and its parameters' error through a gradient of entries ≤ G
            params = sum(p.numel() for p in m.model.parameters())
            worst = max(bound[j, i, f"model.{name}"] for name, _ in m.model.named_parameters())
            value = abs(res.loss[i])
            loss_bound[j].append(U64 * n * S * value + params * rec.grad[i] * worst)
            loss_floor[j].append(U32 * n * S * value)
    return Reference(ref, [r.loss for r in results], bound, floor, loss_bound, loss_floor)


def errors(ref: Reference, jobs: list[ClientJob]) -> dict[Key, float]:
    """Each tensor's largest difference from the reference; counters must be equal and the same tensors exist."""
    out: dict[Key, float] = {}
    for j, (a, b) in enumerate(zip(ref.jobs, jobs)):
        for i, (ma, mb) in enumerate(zip(a.members, b.members)):
            sa, sb = state_of(ma), state_of(mb)
            assert sa.keys() == sb.keys(), f"client {a.client} member {i}: {sorted(sa.keys() ^ sb.keys())}"
            for k, va in sa.items():
                vb = sb[k]
                if _exact(k, va):
                    assert torch.equal(va.to(vb.dtype), vb), f"client {a.client} member {i} {k}: {va} != {vb}"
                else:
                    out[j, i, k] = float((va - vb.double()).abs().max()) if va.numel() else 0.0
    return out


def train(jobs: list[ClientJob], rounds: int, engine: str) -> tuple[list[ClientJob], list[JobResult]]:
    """Train a deep copy of the cohort for ``rounds`` rounds; returns it and the last round's results."""
    jobs = copy.deepcopy(jobs)
    for t in range(rounds):
        results = run_cohort(jobs, t, engine=engine)
    return jobs, results


def assert_same(jobs: list[ClientJob], rounds: int = 1, engine: str = "stacked") -> None:
    """The engine against the plain loop, in float64 and in float32 (see the bounds above)."""
    assert plan_cohort(jobs, engine).loop == [] or engine == "auto"
    ref = reference(jobs, rounds)
    stacked64 = in_float64(jobs)
    assert plan_cohort(stacked64, engine).groups == plan_cohort(jobs, engine).groups
    stacked64, res64 = train(stacked64, rounds, engine)
    loop32, res_loop = train(jobs, rounds, "loop")
    stacked32, res32 = train(jobs, rounds, engine)
    for results in (res64, res_loop, res32):
        assert [(r.client, r.steps) for r in results] == [(r.client, r.steps) for r in res_loop]

    e64, e_loop, e32 = errors(ref, stacked64), errors(ref, loop32), errors(ref, stacked32)
    where = lambda key: f"client {jobs[key[0]].client} member {key[1]} {key[2]}"  # noqa: E731
    for key, err in e64.items():
        assert err <= 2 * ref.bound[key], f"float64 {where(key)}: {err:.3g} > 2 x bound {ref.bound[key]:.3g}"
    in_floors = lambda errs: {key: err / ref.floor[key] for key, err in errs.items() if ref.floor[key] > 0}  # noqa: E731
    f_loop, f32 = in_floors(e_loop), in_floors(e32)
    worst, loop_worst = max(f32, key=f32.__getitem__), max(f_loop.values())
    assert f32[worst] <= SPREAD * max(1.0, loop_worst), (
        f"float32 {where(worst)}: error {e32[worst]:.3g} = {f32[worst]:.3g} floors, the loop's largest is "
        f"{loop_worst:.3g} floors (floor {ref.floor[worst]:.3g})"
    )
    assert all(err == 0 for key, err in e32.items() if ref.floor[key] == 0), "a tensor that does not change did"
    for j, job in enumerate(jobs):
        for i, exact in enumerate(ref.losses[j]):
            what = f"client {job.client} member {i} loss"
            assert abs(res64[j].loss[i] - exact) <= 2 * ref.loss_bound[j][i], f"float64 {what}: {res64[j].loss[i]!r} vs {exact!r}"
            allowed = SPREAD * (abs(res_loop[j].loss[i] - exact) + ref.loss_floor[j][i])
            assert abs(res32[j].loss[i] - exact) <= allowed, f"float32 {what}: {res32[j].loss[i]!r} vs {exact!r}"


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


@torch.no_grad()
def test_stacked_forward_equals_each_models_forward():
    """The stacked forward against each model's own, by the rules of `assert_same` for one pass.

    A forward pass of L layers, each a sum of at most n terms, is within u·n·L·A of the exact one,
    A the largest activation: in float64 the stacked forward must stay within twice that of the
    model's float64 forward; in float32 as close to the float64 forward as the model's own float32
    forward, up to SPREAD, with one rounding of the output scale, u·A, as the floor.
    """
    models = [rich_net() for _ in range(3)]
    for m in models:
        m.train()
    x = torch.randn(3, 8, 2, 8, 8)
    n = 8 * 8 * 8  # the longest sum: BatchNorm2d's statistics over batch x positions
    out64 = StackedModel([copy.deepcopy(m).double() for m in models]).forward(x.double())
    out32 = StackedModel(copy.deepcopy(models)).forward(x)
    for k, m in enumerate(models):
        layers = [layer for _, layer in flat_layers(copy.deepcopy(m).double())]
        exact, scale = x[k].double(), float(x[k].abs().max())
        for layer in layers:
            exact = layer(exact)
            scale = max(scale, float(exact.abs().max()))
        bound = U64 * n * len(layers) * scale
        assert float((out64[k] - exact).abs().max()) <= 2 * bound
        own = float((m(x[k]).double() - exact).abs().max())
        assert float((out32[k].double() - exact).abs().max()) <= SPREAD * (own + U32 * scale)


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
        loop, other, r_loop, r_other = run_both(jobs)
        assert max_diff(loop, other) == 0.0  # it is the loop
        assert [(r.client, r.steps, r.loss) for r in r_loop] == [(r.client, r.steps, r.loss) for r in r_other]


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
    from fedmutual.experiment.runner import run

    metrics = {}
    for engine in ("loop", "stacked"):
        cfg = Config(algorithm="fml", clients=4, limit_train=800, limit_test=400, rounds=2, engine=engine,
                     out=str(tmp_path / engine), progress=False, threads=1)
        metrics[engine] = run(cfg, quiet=True).metrics
    # A reported loss is a mean of a client's float32 step losses, S steps at most, each a sum of at most
    # n terms (LeNet5's longest dot product or the batch mean). There is no float64 run to compare with
    # here, so the typical rounding of such sums, √n·u (Higham §2.8), is the yardstick: each engine is
    # within S·√n·u of the exact value, relative.
    lenet = build_model("lenet5", (1, 28, 28), 10)  # both FML members' architecture
    n = max([cfg.batch_size] + [m.weight[0].numel() for m in lenet.modules() if type(m) in (nn.Linear, nn.Conv2d)])
    steps = cfg.rounds * cfg.local_epochs * math.ceil(cfg.limit_train / cfg.batch_size)
    for a, b in zip(metrics["loop"], metrics["stacked"]):
        accs = [k for k in a if "acc" in k]
        assert accs and {k: a[k] for k in accs} == {k: b[k] for k in accs}
        for k in ("train_loss_local", "train_loss_meme"):
            assert a[k] == pytest.approx(b[k], rel=2 * steps * math.sqrt(n) * U32)


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


def test_relu_then_disjoint_max_pool_runs_as_pool_then_relu_with_equal_outputs_and_gradients():
    """The reordering is exact: equal values and gradients bit for bit, on data with ties and non-positive windows."""
    from fedmutual.engine.stacking.layers import _pool_before_relu

    x = torch.randint(-3, 4, (4, 6, 8, 8)).float().contiguous(memory_format=torch.channels_last)  # many ties, many zeros
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = nn.MaxPool2d(2)(torch.relu(a)), torch.relu(nn.MaxPool2d(2)(b))
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(ya, yb) and torch.equal(a.grad, b.grad)

    def order(model: nn.Module) -> list[int]:
        return StackedModel([model, copy.deepcopy(model)])._order

    assert order(build_model("lenet5", (1, 28, 28), 10))[:6] == [0, 2, 1, 3, 5, 4]  # conv, pool, relu, conv, pool, relu
    cnn1 = build_model("cnn1", (1, 28, 28), 10)
    assert order(cnn1) == list(range(len(cnn1)))  # already pool -> relu
    overlapping = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(3, stride=2), nn.Flatten())
    assert order(overlapping) == [0, 1, 2, 3]  # windows overlap: the gradients could differ, so the order stays
    assert _pool_before_relu([]) == []
