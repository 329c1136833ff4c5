"""The one mutual-learning loss of ALGORITHMS.md §0, and its parts.

    L_i = w_ce_i * CE_i(z_i, y) + w_kl_i * mean_{j in peers(i)} KL(p_j || p_i)

with p = softmax(z / tau) and the teachers p_j detached. Every algorithm
computes its client loss through :func:`mutual_loss`; there is no second KL.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

CEFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy over the batch."""
    return F.cross_entropy(logits, target)


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_teacher || p_student), the teacher detached, with ``batchmean`` reduction.

    The sum over classes is averaged over the batch (never over classes, which
    ``reduction="mean"`` would silently do). With a temperature tau != 1 both
    distributions are softened by tau and the result is multiplied by tau**2, so
    gradient magnitudes stay comparable to CE (Hinton et al. 2015).
    """
    t = float(temperature)
    log_q = F.log_softmax(student_logits / t, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach() / t, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()
    return kl * (t * t) if t != 1.0 else kl


def mutual_loss(
    logits: Sequence[torch.Tensor],
    target: torch.Tensor,
    w_ce: Sequence[float],
    w_kl: Sequence[float],
    temperature: float = 1.0,
    ce: CEFn = cross_entropy,
    peers: Sequence[Sequence[int]] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Mutual-learning loss of a cohort of models on one mini-batch.

    ``logits[i]`` are model i's outputs. Model i is taught by the models in
    ``peers[i]`` (default: every other model), whose outputs are detached, so
    one backward pass of the returned total gives each model exactly the
    gradient of its own L_i. Terms with weight 0 are skipped entirely.

    Returns the total (sum over models) and the list of per-model losses.
    """
    n = len(logits)
    if not (len(w_ce) == len(w_kl) == n):
        raise ValueError(f"need one w_ce and one w_kl per model: {n} models, {len(w_ce)} w_ce, {len(w_kl)} w_kl")
    if peers is None:
        peers = [[j for j in range(n) if j != i] for i in range(n)]
    losses: list[torch.Tensor] = []
    for i in range(n):
        loss = logits[i].new_zeros(())
        if w_ce[i] != 0:
            loss = loss + w_ce[i] * ce(logits[i], target)
        if w_kl[i] != 0 and len(peers[i]) > 0:
            kl = sum(kl_divergence(logits[j], logits[i], temperature) for j in peers[i])
            loss = loss + w_kl[i] * kl / len(peers[i])
        losses.append(loss)
    return torch.stack(losses).sum(), losses
