"""The stacked cohort engine: clients whose models share an architecture train as one stacked model.

:func:`run_cohort_stacked` takes the same jobs as the plain loop
(:func:`fedmutual.engine.jobs.train_job`) and gives the same results: the
same batches (``batch_order`` per client), the same loss (``mutual_loss`` on
stacked logits), the same optimizer updates, written back into each member's
own module and optimizer. What differs is how the work is laid out:

1. *Planning.* Each job gets a key (its members' architectures, optimizer
   settings, CE function, temperature, peers, sample shape); jobs that cannot
   be stacked, or whose architecture ``auto`` runs faster on the loop, go to
   the loop. Jobs with equal keys form a group.
2. *Chunking.* A group's clients are sorted by their number of steps (most
   first) and cut into chunks small enough that a stacked call's activations
   and parameters stay in cache (:func:`clients_per_chunk`).
3. *Training a chunk.* Per step, every client that still has batches takes
   its next one. Because clients are sorted, the active ones are always a
   prefix of the chunk, and the forward pass runs on the prefix slice of the
   stacked parameters: finished clients' parameters and optimizer state are
   not touched. A client whose batch is shorter than the others' (the last
   batch of an epoch, unequal data sizes) is padded with one of its own
   samples and a mask removes the padding from its loss and BatchNorm
   statistics.
"""

from __future__ import annotations

import ctypes
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from fedmutual.engine.jobs import ClientJob, JobResult, batch_order, train_job
from fedmutual.engine.phases import phase
from fedmutual.engine.stacking import (
    Footprint, OptimSpec, Signature, StackedModel, StackedOptimizer, architecture, has_batchnorm, optimizer_spec,
    stacked_optimizer, trace,
)
from fedmutual.errors import NonFiniteLossError
from fedmutual.losses import is_stackable, mutual_loss

ENGINES = ("auto", "stacked", "loop")

# The size of a stacked call (a chunk of clients), so that its work stays in cache;
# measured on this machine with benchmarks/engine.py. At most this many samples
# (models x batch) per forward call; larger stacks lose throughput.
SAMPLES_PER_CALL = 2048
# At most this many bytes in the call's largest activations: CNN2's first conv output
# is 400 KB per sample, so 2048 samples would need 800 MB and run from memory.
ACTIVATION_BUDGET = 32 << 20
# At most this many bytes of parameters: every step reads and writes each model's
# parameters, gradients and momentum; the MLP (0.8 MB) ran 1.4x faster in DML with
# 6 models per call than with 40.
PARAMETER_BUDGET = 8 << 20
# ``auto`` leaves models without convolutions to the loop above this many
# multiply-adds per client step (batch x linear multiply-adds per sample).
LINEAR_WORK = 10_000_000

# A member's part of a job key: its architecture, optimizer, footprint and parameter count.
MemberKey = tuple[Signature, OptimSpec, Footprint, int]

_trace_cache: dict[tuple[Any, ...], Footprint | None] = {}
_allocator_tuned = False


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of giving it back to the system.

    A stacked step allocates and frees buffers of tens of megabytes (the K
    models' gradients and activations). With glibc's defaults many of them are
    mapped fresh and returned every step, and first-touch page faults then cost
    a third of an MLP step. Raising the mmap and trim thresholds (to 1 GiB)
    makes malloc reuse the same memory; the process keeps its peak heap. Applied
    once per process, on the first stacked run; a no-op where there is no glibc.
    Returns whether the setting is in effect.
    """
    global _allocator_tuned
    if not _allocator_tuned:
        try:
            libc = ctypes.CDLL(None)
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            return False
        m_trim_threshold, m_mmap_threshold = -1, -3
        _allocator_tuned = bool(mallopt(m_mmap_threshold, 1 << 30)) & bool(mallopt(m_trim_threshold, 1 << 30))
    return _allocator_tuned


def _footprint(model: torch.nn.Module, arch: Any, sample: tuple[int, ...]) -> Footprint | None:
    """:func:`trace`, cached per architecture and sample shape."""
    key = (arch, sample)
    if key not in _trace_cache:
        _trace_cache[key] = trace(model, sample)
    return _trace_cache[key]


def _ragged_singleton(job: ClientJob) -> bool:
    """Whether some batch of the job holds one sample (BatchNorm then fails in the loop; the loop reports it)."""
    n, b = len(job.y), job.batch_size
    return n > 0 and (b == 1 or n % b == 1)


def job_key(job: ClientJob) -> tuple[Any, ...] | None:
    """What must be equal for jobs to train in one stack; None if the job must run on the loop."""
    if not job.members or not is_stackable(job.ce) or job.x.dim() < 2:
        return None
    sample = tuple(job.x.shape[1:])
    members: list[MemberKey] = []
    for m in job.members:
        arch = architecture(m.model)
        if arch is None or arch[1:] != (str(job.x.dtype), str(job.x.device)):
            return None
        spec = optimizer_spec(m.optimizer, m.model)
        foot = _footprint(m.model, arch, sample)
        if foot is None or spec is None or (has_batchnorm(m.model) and _ragged_singleton(job)):
            return None
        members.append((arch, spec, foot, sum(p.numel() for p in m.model.parameters())))
    peers = None if job.peers is None else tuple(tuple(int(i) for i in p) for p in job.peers)
    teachers = None if job.teachers is None else tuple(
        None if T is None else (tuple(T.shape[1:]), str(T.dtype), str(T.device)) for T in job.teachers
    )
    return (tuple(members), sample, str(job.x.dtype), str(job.x.device), id(job.ce), float(job.temperature), peers,
            teachers, job.kl)


def clients_per_chunk(batch: int, members: Sequence[MemberKey]) -> int:
    """How many clients one stacked call holds (at least one).

    At most :data:`SAMPLES_PER_CALL` samples (models x batch), at most
    :data:`ACTIVATION_BUDGET` bytes in the members' largest activations over the
    batch, and at most :data:`PARAMETER_BUDGET` bytes of parameters. ``members``
    are the ``(arch, optimizer, footprint, parameter count)`` entries of
    a :func:`job_key`.
    """
    activations = sum(m[2].activation for m in members)
    params = sum(m[3] for m in members)
    per = min(
        SAMPLES_PER_CALL // (len(members) * batch),
        ACTIVATION_BUDGET // (4 * batch * activations),
        PARAMETER_BUDGET // (4 * params),
    )
    return max(1, per)


def prefers_stacking(key: tuple[Any, ...], n_jobs: int, batch: int) -> bool:
    """The ``auto`` rule: stack when a stacked call would hold at least two models, unless the
    models are linear only and each client step is already large.

    A call holds one model when there is only one, or when one client's
    activations alone fill the cache budget (CNN2 at B = 128: 400 KB per sample
    in its first layer): stacking then only adds copies. A model without
    convolutions runs matrix products that are efficient one client at a time
    once a step holds more than :data:`LINEAR_WORK` multiply-adds (the MLP at
    B = 128), and stacking then only adds memory traffic.
    A deterministic rule rather than a timed probe, so that the same config picks
    the same engine on every run (and therefore gives bit-identical metrics).
    """
    members = key[0]
    if any(foot.conv_macs == 0 and batch * foot.linear_macs > LINEAR_WORK for _, _, foot, _ in members):
        return False
    return min(n_jobs, clients_per_chunk(batch, members)) * len(members) >= 2


@dataclass
class Plan:
    """How a cohort runs: groups of job indices trained stacked, and job indices trained on the loop."""

    groups: list[list[int]]
    loop: list[int]


def plan_cohort(jobs: Sequence[ClientJob], engine: str = "auto") -> Plan:
    """Decide which jobs run stacked (grouped by :func:`job_key`) and which run on the plain loop."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "loop":
        return Plan([], list(range(len(jobs))))
    groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    loop: list[int] = []
    for i, job in enumerate(jobs):
        key = job_key(job)
        (loop.append(i) if key is None else groups[key].append(i))
    # Stacking copies parameters, so a tensor or optimizer shared by two members must take the loop.
    seen: set[int] = set()
    shared = False
    for ids in groups.values():
        for i in ids:
            for m in jobs[i].members:
                owned = [id(p) for p in m.model.parameters()] + [id(m.optimizer), id(m.model)]
                shared |= any(o in seen for o in owned)
                seen.update(owned)
    if shared:
        return Plan([], list(range(len(jobs))))
    stacked = []
    for key, ids in groups.items():
        if engine == "stacked" or prefers_stacking(key, len(ids), max(jobs[i].batch_size for i in ids)):
            stacked.append(ids)
        else:
            loop += ids
    return Plan(stacked, sorted(loop))


def schedule(job: ClientJob) -> list[torch.Tensor]:
    """The job's mini-batches over all its epochs, exactly those of the plain loop."""
    n = len(job.y)
    return [idx for epoch in range(job.epochs) for idx in batch_order(n, job.batch_size, job.shuffle_seed, epoch)]


def chunks(ids: Sequence[int], steps: dict[int, int], batch: int, members: Sequence[MemberKey]) -> list[list[int]]:
    """Cut a group into balanced chunks of at most :func:`clients_per_chunk` clients, most steps first."""
    order = sorted(ids, key=lambda i: -steps[i])
    n = math.ceil(len(order) / clients_per_chunk(batch, members))
    size = math.ceil(len(order) / n)
    return [order[s : s + size] for s in range(0, len(order), size)]


@dataclass
class _Stack:
    """The members of a chunk that share architecture and optimizer, as one stacked model."""

    model: StackedModel
    opt: StackedOptimizer
    members: list[int]  # member indices within each job, in stack order
    refs: list[torch.Tensor] | None  # stacked FedProx references
    mu: float | torch.Tensor


def _per_client(values: list[float], like: torch.Tensor) -> float | torch.Tensor:
    """One weight per client: a float when all agree, else a tensor in ``like``'s dtype and device (the loss's)."""
    return values[0] if all(v == values[0] for v in values) else torch.tensor(values, dtype=like.dtype, device=like.device)


def _first(w: float | torch.Tensor, a: int) -> float | torch.Tensor:
    """The first ``a`` clients' entries of a per-client weight (a float is everyone's)."""
    return w[:a] if isinstance(w, torch.Tensor) else w


def _build_stacks(jobs: Sequence[ClientJob]) -> list[_Stack]:
    by_kind: dict[tuple[Signature, OptimSpec], list[int]] = defaultdict(list)
    for i, m in enumerate(jobs[0].members):
        arch, spec = architecture(m.model), optimizer_spec(m.optimizer, m.model)
        if arch is None or spec is None:  # job_key admits only members that have both
            raise ValueError(f"member {i} of client {jobs[0].client} cannot be stacked")
        by_kind[(arch, spec)].append(i)
    stacks = []
    for (_, spec), members in by_kind.items():
        ms = [job.members[i] for job in jobs for i in members]
        model = StackedModel([m.model for m in ms])
        opt = stacked_optimizer(spec, model, [m.optimizer for m in ms])
        opt.update_in_backward()
        mus = [m.prox_mu if m.prox_mu and m.prox_ref is not None else 0.0 for m in ms]
        refs = None
        if any(mus):
            member_params = [list(m.model.parameters()) for m in ms]
            refs = [
                model.pack(k, [(m.prox_ref[k] if m.prox_ref is not None else mp[k]) for m, mp in zip(ms, member_params)])
                for k in range(len(model.parameters()))
            ]
        stacks.append(_Stack(model, opt, members, refs, _per_client(mus, model.parameters()[0])))
    return stacks


def train_chunk(
    jobs: Sequence[ClientJob],
    on_step: Callable[[], None] | None,
    failures: dict[int, float],
    ids: Sequence[int],
) -> list[JobResult]:
    """Train a chunk of jobs with equal :func:`job_key` as stacked models; ``jobs`` sorted by steps, most first.

    A non-finite loss is recorded in ``failures`` (job index -> the client's
    total loss at its first such step) and training goes on; clients are
    independent, so the others' results are unaffected.
    """
    first, c = jobs[0], len(jobs)
    n_members = len(first.members)
    for job in jobs:
        for m in job.members:
            m.model.train()
    scheds = [schedule(job) for job in jobs]
    steps = [len(s) for s in scheds]
    results = [JobResult(job.client, steps=t, loss=[0.0] * n_members) for job, t in zip(jobs, steps)]
    if steps[0] == 0:
        return results
    device = first.x.device
    width = max(len(b) for s in scheds for b in s)
    # each client's batches as rows of local indices, padded with one of the client's own samples
    index = torch.zeros(steps[0], c, width, dtype=torch.long)
    sizes = [[len(idx) for idx in sched] for sched in scheds]
    for j, sched in enumerate(scheds):
        if sched:
            padded = pad_sequence(sched, batch_first=True, padding_value=-1)
            index[: len(sched), j, : padded.shape[1]] = torch.where(padded < 0, padded[:, :1], padded)
    index = index.to(device)
    xbuf = first.x.new_empty((c, width, *first.x.shape[1:]))  # reused every step: a batch is gathered once
    ybuf = first.y.new_empty((c, width))
    tbufs = None if first.teachers is None else [  # fixed teacher probabilities, gathered like x
        None if T is None else T.new_empty((c, width, *T.shape[1:])) for T in first.teachers
    ]
    # per client, its teacher tensors with the buffers they are gathered into (equal job keys: equal layouts)
    tpairs = [[(T, buf) for T, buf in zip(job.teachers or (), tbufs or ()) if T is not None and buf is not None]
              for job in jobs]
    # per step: active clients (a prefix, as clients are sorted), batch width, valid counts if ragged
    layout: list[tuple[int, int, torch.Tensor | None]] = []
    for s in range(steps[0]):
        a = sum(t > s for t in steps)
        valid = [sizes[j][s] for j in range(a)]
        b = max(valid)
        layout.append((a, b, torch.tensor(valid, device=device) if min(valid) < b else None))
    arange = torch.arange(width, device=device)

    with phase("train.stack"):
        stacks = _build_stacks(jobs)
    w_ce = [_per_client([job.members[i].w_ce for job in jobs], first.x) for i in range(n_members)]
    w_kl = [_per_client([job.members[i].w_kl for job in jobs], first.x) for i in range(n_members)]
    loss_sum = torch.zeros(c, n_members, dtype=torch.float64, device=device)
    for s, (a, b, counts) in enumerate(layout):
        mask = arange[:b] < counts[:, None] if counts is not None else None
        with phase("train.gather"):
            for j in range(a):
                torch.index_select(jobs[j].x, 0, index[s, j, :b], out=xbuf[j, :b])
                torch.index_select(jobs[j].y, 0, index[s, j, :b], out=ybuf[j, :b])
                for src, buf in tpairs[j]:
                    torch.index_select(src, 0, index[s, j, :b], out=buf[j, :b])
        with phase("train.step"):
            loss_sum[:a] += _step(stacks, jobs, xbuf[:a, :b], ybuf[:a, :b], tbufs, a, b, mask, w_ce, w_kl, failures, ids)
        if on_step is not None:
            for _ in range(a):
                on_step()
    with phase("train.write_back"):
        for st in stacks:
            st.model.write_back()
            st.opt.write_back()
    for r, row in zip(results, loss_sum.tolist()):
        if r.steps:
            r.loss = [v / r.steps for v in row]
    return results


def _step(stacks: Sequence[_Stack], jobs: Sequence[ClientJob], xb: torch.Tensor, yb: torch.Tensor,
          tbufs: Sequence[torch.Tensor | None] | None, a: int, b: int, mask: torch.Tensor | None,
          w_ce: Sequence[float | torch.Tensor], w_kl: Sequence[float | torch.Tensor], failures: dict[int, float],
          ids: Sequence[int]) -> torch.Tensor:
    """One stacked optimizer step of the first ``a`` clients on their gathered batches; their losses ``[a, members]``."""
    first, n_members = jobs[0], len(jobs[0].members)
    tb = None if tbufs is None else [None if buf is None else buf[:a, :b] for buf in tbufs]
    by_member: dict[int, torch.Tensor] = {}
    prox: list[torch.Tensor] = []
    for st in stacks:
        n = len(st.members)
        out = st.model.forward(xb, n, mask).view(a, n, b, -1)
        for pos, i in enumerate(st.members):
            by_member[i] = out[:, pos]
        if st.refs is not None:
            prox.append(st.model.prox(st.refs, _first(st.mu, a * n), a * n).view(a, n).sum(1))
    logits = [by_member[i] for i in range(n_members)]
    total, parts = mutual_loss(
        logits, yb, [_first(w, a) for w in w_ce], [_first(w, a) for w in w_kl],
        first.temperature, first.ce, first.peers, mask, teachers=tb, kl=first.kl,
    )
    for p in prox:
        total = total + p.sum()
    if not math.isfinite(float(total.detach())):
        per_client = (torch.stack(parts).sum(0) + sum(prox)).detach()
        for j in torch.nonzero(~torch.isfinite(per_client)).flatten().tolist():
            failures.setdefault(ids[j], float(per_client[j]))
    for st in stacks:
        st.opt.begin(a * len(st.members))
    total.backward()  # the optimizers update each parameter as soon as its gradient is ready
    return torch.stack(parts, 1).detach().to(torch.float64)


def run_cohort_stacked(
    jobs: Sequence[ClientJob], round: int, on_step: Callable[[], None] | None = None, engine: str = "auto"
) -> list[JobResult]:
    """Train every job of the cohort, stacked where the plan says so; one result per job, in order.

    On a non-finite loss, raises :class:`NonFiniteLossError` for the first job
    (in cohort order) that has one, with that client's loss at its first such
    step: the same client, round and value as the plain loop reports.
    """
    plan = plan_cohort(jobs, engine)
    if plan.groups:
        keep_freed_memory()
    results: list[JobResult | None] = [None] * len(jobs)
    failures: dict[int, float] = {}

    def needed(ids: Sequence[int]) -> bool:  # work after the first known failure cannot change the error
        return not failures or min(ids) < min(failures)

    for ids in plan.groups:
        steps = {i: jobs[i].epochs * math.ceil(len(jobs[i].y) / jobs[i].batch_size) for i in ids}
        batch = max(jobs[i].batch_size for i in ids)
        key = job_key(jobs[ids[0]])
        if key is None:  # plan_cohort groups only jobs that have a key
            raise ValueError(f"client {jobs[ids[0]].client} cannot be stacked")
        members = key[0]
        for chunk in chunks(ids, steps, batch, members):
            if needed(chunk):
                for i, r in zip(chunk, train_chunk([jobs[i] for i in chunk], on_step, failures, chunk)):
                    results[i] = r
    for i in plan.loop:
        if needed([i]):
            try:
                results[i] = train_job(jobs[i], round, on_step)
            except NonFiniteLossError as e:
                failures[i] = e.value
    if failures:
        i = min(failures)
        raise NonFiniteLossError(jobs[i].client, round + 1, failures[i])
    done = [r for r in results if r is not None]
    if len(done) != len(jobs):  # every job is in a stacked group or on the loop
        raise ValueError("the cohort plan left a job untrained")
    return done
