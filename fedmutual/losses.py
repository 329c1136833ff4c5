"""The one mutual-learning loss of ALGORITHMS.md §0, and its parts.

    L_i = w_ce_i * CE_i(z_i, y) + w_kl_i * mean_{j in peers(i)} KL(p_j || p_i)

with p = softmax(z / tau) and the teachers p_j detached. Every algorithm
computes its client loss through :func:`mutual_loss`; there is no second KL.
Teachers are live models of the cohort (``peers``) or fixed probabilities
received from elsewhere (``teachers``, DML-FL's published predictions).

KL modes (``kl``): ``"softmax"`` is the multi-class KL above. A binary model
has one output z with q = sigmoid(z / tau); ``"bernoulli"`` is the full
two-class KL p log(p/q) + (1-p) log((1-p)/(1-q)), and ``"faithful"`` keeps only
its positive-class term p log(p/q), as the DML-FL authors' Keras code does (it
can be negative and always pushes q up).

Two shapes are accepted. Plain logits ``[B, C]`` with targets ``[B]`` give
scalar losses (the batch mean). Stacked logits ``[K, B, C]`` with targets
``[K, B]``, K clients' models evaluated at once by the stacked engine, give
per-client losses ``[K]``, each averaged over that client's own batch. An
optional boolean ``mask`` (``[K, B]``, or ``[B]`` for plain logits) marks
the valid samples of ragged batches; padded samples contribute nothing and
each client's mean is taken over its valid samples only.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence, TypeVar

import torch
import torch.nn.functional as F

CEFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Weight = float | torch.Tensor  # one weight for the model, or one per stacked client ([K])

_F = TypeVar("_F", bound=Callable[..., torch.Tensor])


def stackable(fn: _F) -> _F:
    """Mark a CE function as able to take stacked logits ``[K, B, C]`` and a ``mask=`` keyword.

    Such a function returns per-client losses ``[K]``. The stacked engine only runs
    jobs whose ``ce`` is marked; any other function runs on the plain loop.
    """
    fn.stackable = True  # type: ignore[attr-defined]
    return fn


def is_stackable(fn: Callable[..., torch.Tensor]) -> bool:
    """Whether ``fn`` (or the function a ``functools.partial`` wraps) was marked with :func:`stackable`."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return bool(getattr(fn, "stackable", False))


def batch_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the last (batch) dimension, over the valid samples only when ``mask`` is given.

    Masked-out entries are replaced by 0 before summing, so a NaN in padding
    cannot leak into a client's loss. A client with no valid sample gets 0.
    """
    if mask is None:
        return values.mean(dim=-1)
    kept = torch.where(mask, values, values.new_zeros(()))
    return kept.sum(dim=-1) / mask.sum(dim=-1).clamp_min(1).to(values.dtype)


@stackable
def cross_entropy(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean softmax cross-entropy over the batch; per client (``[K]``) for stacked logits ``[K, B, C]``."""
    if logits.dim() == 2 and mask is None:
        return F.cross_entropy(logits, target)
    per_sample = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    return batch_mean(per_sample.view(target.shape), mask)


def kl_divergence(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(p_teacher || p_student), the teacher detached, with ``batchmean`` reduction.

    The sum over classes is averaged over the batch (never over classes, which
    ``reduction="mean"`` would silently do). With a temperature tau != 1 both
    distributions are softened by tau and the result is multiplied by tau**2, so
    gradient magnitudes stay comparable to CE (Hinton et al. 2015). Stacked
    logits ``[K, B, C]`` give one value per client ``[K]``.
    """
    t = float(temperature)
    log_q = F.log_softmax(student_logits / t, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach() / t, dim=-1)
    return _kl(log_p, log_q, t, mask)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor, t: float, mask: torch.Tensor | None, mode: str = "softmax") -> torch.Tensor:
    """:func:`kl_divergence` from the softened log-probabilities of teacher (detached) and student."""
    terms = log_p.exp() * (log_p - log_q)
    per_sample = terms[..., 1] if mode == "faithful" else terms.sum(dim=-1)
    return _reduce(per_sample, t, mask)


def _reduce(per_sample: torch.Tensor, t: float, mask: torch.Tensor | None) -> torch.Tensor:
    kl = per_sample.mean() if per_sample.dim() == 1 and mask is None else batch_mean(per_sample, mask)
    return kl * (t * t) if t != 1.0 else kl


KL_MODES = ("softmax", "bernoulli", "faithful")


def check_kl_mode(mode: str, outputs: int) -> None:
    """Raise ValueError unless ``mode`` fits a model with ``outputs`` outputs."""
    if mode not in KL_MODES:
        raise ValueError(f"unknown KL mode {mode!r}; allowed: {', '.join(KL_MODES)}")
    if mode == "softmax" and outputs < 2:
        raise ValueError("kl = 'softmax' needs at least two outputs; a single-output (binary) model uses 'bernoulli' or 'faithful'")
    if mode != "softmax" and outputs != 1:
        raise ValueError(f"kl = {mode!r} is for a binary model with one sigmoid output, got {outputs} outputs")


def log_probs(logits: torch.Tensor, mode: str = "softmax", temperature: float = 1.0) -> torch.Tensor:
    """Softened log-probabilities over the classes the KL compares.

    ``softmax``: log softmax(z / tau) over the C outputs. ``bernoulli`` and
    ``faithful``: one output z, as the two classes [log(1 - q), log q] with
    q = sigmoid(z / tau).
    """
    check_kl_mode(mode, logits.shape[-1])
    if mode == "softmax":
        return F.log_softmax(logits / temperature, dim=-1)
    z = logits / temperature
    return torch.cat([F.logsigmoid(-z), F.logsigmoid(z)], dim=-1)


def published_probs(logits: torch.Tensor, mode: str = "softmax", temperature: float = 1.0) -> torch.Tensor:
    """What a model publishes as its prediction: softmax(z / tau) over C outputs, or sigmoid(z / tau) for one output."""
    if mode == "softmax":
        return torch.softmax(logits / temperature, dim=-1)
    return torch.sigmoid(logits / temperature)


def fixed_teacher_kl(
    probs: torch.Tensor, log_q: torch.Tensor, t: float, mask: torch.Tensor | None, mode: str = "softmax"
) -> torch.Tensor:
    """Sum over fixed teachers of KL(p_teacher || q), batch-averaged.

    ``probs`` holds P published predictions per sample, ``[..., B, P, C]``
    (softmax) or ``[..., B, P, 1]`` (sigmoid); ``log_q`` the student's
    :func:`log_probs` ``[..., B, C']``. 0·log 0 counts as 0, so a teacher's
    exact zeros (e.g. top-k compression) are fine.
    """
    p = probs.detach().to(log_q.dtype)
    if mode != "softmax":
        p = torch.cat([1 - p, p], dim=-1)
    terms = torch.xlogy(p, p) - p * log_q.unsqueeze(-2)
    per_teacher = terms[..., 1] if mode == "faithful" else terms.sum(dim=-1)
    return _reduce(per_teacher.sum(dim=-1), t, mask)


def _is_one(w: Weight) -> bool:
    return not isinstance(w, torch.Tensor) and w == 1


def _nonzero(w: Weight) -> bool:
    return bool((w != 0).any()) if isinstance(w, torch.Tensor) else w != 0


def mutual_loss(
    logits: Sequence[torch.Tensor],
    target: torch.Tensor,
    w_ce: Sequence[Weight],
    w_kl: Sequence[Weight],
    temperature: float = 1.0,
    ce: CEFn = cross_entropy,
    peers: Sequence[Sequence[int]] | None = None,
    mask: torch.Tensor | None = None,
    teachers: Sequence[torch.Tensor | None] | None = None,
    kl: str = "softmax",
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Mutual-learning loss of a cohort of models on one mini-batch.

    ``logits[i]`` are model i's outputs. Model i is taught by the models in
    ``peers[i]`` (default: every other model), whose outputs are detached, so
    one backward pass of the returned total gives each model exactly the
    gradient of its own L_i. Terms with weight 0 are skipped entirely.

    With stacked logits (``[K, B, C]`` each, targets ``[K, B]``) every loss is
    per client (``[K]``), the weights may be per client too (tensors ``[K]``),
    and ``mask`` marks the valid samples; the CE function then gets ``mask=``
    when a mask is given (see :func:`stackable`).

    ``teachers[i]``, when given, holds fixed teacher probabilities for model i's
    samples (``[B, P, C]``, or ``[K, B, P, C]`` stacked; already softened by
    tau): model i's KL is then the mean over its live peers and its P fixed
    teachers. ``kl`` picks the KL mode (module docstring).

    Returns the total (sum over models, and over clients when stacked) and the
    list of per-model losses.
    """
    n = len(logits)
    if not (len(w_ce) == len(w_kl) == n):
        raise ValueError(f"need one w_ce and one w_kl per model: {n} models, {len(w_ce)} w_ce, {len(w_kl)} w_kl")
    if peers is None:
        peers = [[j for j in range(n) if j != i] for i in range(n)]
    t = float(temperature)
    if kl != "softmax" or teachers is not None:
        for z in logits:
            check_kl_mode(kl, z.shape[-1])
    cache: dict[int, torch.Tensor] = {}  # softened log-probabilities per model, computed once (teachers detach them)

    def fresh(i: int) -> torch.Tensor:
        return F.log_softmax(logits[i] / t, dim=-1) if kl == "softmax" else log_probs(logits[i], kl, t)

    def log_prob(i: int) -> torch.Tensor:
        if i not in cache:
            cache[i] = fresh(i)
        return cache[i]

    losses: list[torch.Tensor] = []
    for i in range(n):
        loss: torch.Tensor | None = None  # 0 + x and 1.0 * x are exact: skipping them changes no bit
        if _nonzero(w_ce[i]):
            ce_i = ce(logits[i], target) if mask is None else ce(logits[i], target, mask=mask)  # type: ignore[call-arg]
            loss = ce_i if _is_one(w_ce[i]) else w_ce[i] * ce_i
        fixed = None if teachers is None else teachers[i]
        n_teachers = len(peers[i]) + (0 if fixed is None else fixed.shape[-2])
        if _nonzero(w_kl[i]) and n_teachers > 0:
            # = sum of kl_divergence(z_j, z_i). A student taught by several peers gets a fresh
            # log-softmax per term, so that its gradient sums exactly as it always did.
            several = len(peers[i]) > 1
            div = sum(_kl(log_prob(j).detach(), fresh(i) if several else log_prob(i), t, mask, kl) for j in peers[i])
            if fixed is not None:
                div = div + fixed_teacher_kl(fixed, log_prob(i), t, mask, kl)
            term = w_kl[i] * div / n_teachers
            loss = term if loss is None else loss + term
        losses.append(logits[i].new_zeros(logits[i].shape[:-2]) if loss is None else loss)
    total = losses[0].sum() if n == 1 else torch.stack(losses).sum()
    return total, losses


@stackable
def binary_cross_entropy(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean BCE of one sigmoid output (logits ``[..., B, 1]``) against 0/1 targets ``[..., B]``; per client when stacked."""
    if logits.shape[-1] != 1:
        raise ValueError(f"binary cross-entropy needs one output per sample, got {logits.shape[-1]}")
    per_sample = F.binary_cross_entropy_with_logits(logits.squeeze(-1), target.to(logits.dtype), reduction="none")
    return batch_mean(per_sample, mask)


def class_shares(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The share of each class among ``target`` labels (float, sums to 1): WSM's beta."""
    counts = torch.bincount(target.reshape(-1), minlength=num_classes).to(torch.float32)
    return counts / counts.sum().clamp_min(1)


def wsm_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, *, class_share: torch.Tensor
) -> torch.Tensor:
    """Re-weighted softmax cross-entropy (WSM; Legate et al. 2023), as DFML uses it.

        log p~_c = z_c + log beta_c - logsumexp_j (z_j + log beta_j),   L = -log p~_y

    ``class_share`` is beta, the class shares of the data being trained on (``[C]``,
    or ``[K, C]`` per stacked client). Classes with beta_c = 0 get log 0 = -inf:
    they are masked out of the softmax completely and receive no gradient.
    """
    log_prior = torch.log(class_share.to(logits.dtype))
    if log_prior.dim() == 2 and logits.dim() == 3:
        log_prior = log_prior[:, None, :]
    return cross_entropy(logits + log_prior, target, mask)


def wsm(class_share: torch.Tensor) -> CEFn:
    """WSM-CE bound to ``class_share``, usable as a job's ``ce`` on either engine path."""

    @stackable
    def ce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return wsm_cross_entropy(logits, target, mask, class_share=class_share.to(logits.device))

    return ce
