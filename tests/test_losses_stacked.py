"""The stacked and masked forms of the losses against the plain 2-D form, client by client.

The two forms compute the same sums in different orders. Each loss is a nest of sums (a softmax
normalizer over C classes, a mean over B samples, a mean over peers): for n terms in all, of
magnitude at most M, any order is within n·u·M of the exact value (Higham, "Accuracy and Stability of
Numerical Algorithms", §3.1; u = 2^-24 in float32), so two orders agree to 2·n·u·M (`assert_close`).
"""

import math
from functools import partial

import pytest
import torch

from fedmutual.losses import batch_mean, cross_entropy, is_stackable, kl_divergence, mutual_loss, stackable

U32 = 2.0**-24


def assert_close(a: torch.Tensor, b: torch.Tensor, n: int, scale: float) -> None:
    """``a`` and ``b`` two float32 evaluations of the same sums of at most ``n`` terms of size at most ``scale``."""
    err = float((a.detach().double() - b.detach().double()).abs().max())
    assert err <= 2 * n * U32 * scale, f"{err:.3g} > 2 n u M = {2 * n * U32 * scale:.3g} (n = {n}, M = {scale:.3g})"


def log_prob_scale(*logits: torch.Tensor, temperature: float = 1.0) -> float:
    """A bound on |log softmax(z / T)| over these logits (a CE term): the spread of z / T over the classes, plus log C."""
    return max(float((z.amax(-1) - z.amin(-1)).max()) / temperature + math.log(z.shape[-1]) for z in logits)


def kl_scale(pairs: list[tuple[torch.Tensor, torch.Tensor]], temperature: float = 1.0) -> float:
    """The size of a per-sample KL sum's terms, T²·Σ_c p·(|log p| + |log q|), at most over these (teacher, student) logits."""
    worst = 0.0
    for teacher, student in pairs:
        log_p = torch.log_softmax(teacher.double() / temperature, -1)
        log_q = torch.log_softmax(student.double() / temperature, -1)
        worst = max(worst, float((log_p.exp() * (log_p.abs() + log_q.abs())).sum(-1).max()))
    return temperature**2 * worst


def _stacked(k: int = 3, b: int = 6, c: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, b, c, generator=g), torch.randn(k, b, c, generator=g), torch.randint(0, c, (k, b), generator=g)


def test_stacked_cross_entropy_and_kl_equal_the_plain_form_per_client():
    za, zb, y = _stacked()
    ce, kl = cross_entropy(za, y), kl_divergence(zb, za, 2.0)
    assert ce.shape == kl.shape == (3,)
    n = za.shape[1] + za.shape[2]  # B samples, C classes
    ce_terms = log_prob_scale(za)  # each term a log-probability
    kl_terms = kl_scale([(zb, za)], temperature=2.0)
    for k in range(3):
        assert_close(ce[k], cross_entropy(za[k], y[k]), n, ce_terms)
        assert_close(kl[k], kl_divergence(zb[k], za[k], 2.0), n, kl_terms)


def test_mask_averages_over_each_clients_valid_samples_only():
    za, zb, y = _stacked()
    valid = [6, 2, 4]
    mask = torch.arange(6)[None, :] < torch.tensor(valid)[:, None]
    za[1, 2:] = float("nan")  # padding may hold anything; it must not leak into the loss
    ce, kl = cross_entropy(za, y, mask=mask), kl_divergence(zb, za, mask=mask)
    terms = 6 + 5  # B samples, C classes
    valid_z = [za[k, :n] for k, n in enumerate(valid)]
    ce_terms = log_prob_scale(*valid_z)
    kl_terms = kl_scale([(zb[k, :n], za[k, :n]) for k, n in enumerate(valid)])
    for k, n in enumerate(valid):
        assert_close(ce[k], cross_entropy(za[k, :n], y[k, :n]), terms, ce_terms)
        assert_close(kl[k], kl_divergence(zb[k, :n], za[k, :n]), terms, kl_terms)
    # a 2-D batch takes a [B] mask the same way
    assert_close(cross_entropy(za[2], y[2], mask=mask[2]), cross_entropy(za[2, :4], y[2, :4]), terms, ce_terms)


def test_stacked_mutual_loss_matches_each_clients_plain_loss_and_gradients():
    za, zb, y = _stacked(seed=1)
    zc = torch.randn(3, 6, 5)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 4:] = False
    w_ce = [0.3, torch.tensor([0.8, 0.5, 1.0]), 0.0]  # per-client weights are allowed
    w_kl = [0.7, torch.tensor([0.2, 0.5, 0.0]), 1.0]
    peers = [[1, 2], [0], [0, 1]]
    leaves = [z.clone().requires_grad_() for z in (za, zb, zc)]
    total, parts = mutual_loss(leaves, y, w_ce, w_kl, 1.5, peers=peers, mask=mask)
    total.backward()
    # weights at most 1: a part's terms are log-probabilities (CE) and p·(log p - log q)·T² (KL);
    # a logit's gradient, per sample, is (softmax - one-hot)/B from CE and T·(q - p)/B from KL
    t = 1.5
    terms = 6 + 5 + 2  # B samples, C classes, 2 peers
    zs = (za, zb, zc)
    value_scale = log_prob_scale(*zs) + kl_scale([(zs[j], zs[i]) for i in range(3) for j in peers[i]], temperature=t)
    for k in range(3):
        n = int(mask[k].sum())
        plain = [z[k, :n].clone().requires_grad_() for z in (za, zb, zc)]
        wk = lambda w: float(w[k]) if isinstance(w, torch.Tensor) else w  # noqa: E731
        t_k, p_k = mutual_loss(plain, y[k, :n], [wk(w) for w in w_ce], [wk(w) for w in w_kl], t, peers=peers)
        t_k.backward()
        grad_scale = (1 + 2 * t) / n
        for i in range(3):
            assert_close(parts[i][k], p_k[i], terms, value_scale)
            assert_close(leaves[i].grad[k, :n], plain[i].grad, terms, grad_scale)
            assert torch.all(leaves[i].grad[k, n:] == 0)


def test_stackable_marks_and_batch_mean():
    assert is_stackable(cross_entropy)
    assert is_stackable(partial(cross_entropy))
    assert not is_stackable(lambda z, y: cross_entropy(z, y))

    @stackable
    def my_ce(z: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return cross_entropy(z, y, mask)

    assert is_stackable(my_ce)
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert batch_mean(v).tolist() == [2.0, 5.0]
    assert batch_mean(v, torch.tensor([[True, True, False], [False, False, False]])).tolist() == [1.5, 0.0]


def test_plain_form_unchanged_by_the_generalization():
    za, _, y = _stacked()
    assert float(cross_entropy(za[0], y[0])) == pytest.approx(float(torch.nn.functional.cross_entropy(za[0], y[0])), abs=0)


def _reference_mutual_loss(logits, target, w_ce, w_kl, temperature, peers):
    """The plain-form loss as first written: one KL call per (student, teacher) pair."""
    n = len(logits)
    peers = peers or [[j for j in range(n) if j != i] for i in range(n)]
    losses = []
    for i in range(n):
        loss = logits[i].new_zeros(())
        if w_ce[i] != 0:
            loss = loss + w_ce[i] * cross_entropy(logits[i], target)
        if w_kl[i] != 0 and peers[i]:
            loss = loss + w_kl[i] * sum(kl_divergence(logits[j], logits[i], temperature) for j in peers[i]) / len(peers[i])
        losses.append(loss)
    return torch.stack(losses).sum(), losses


@pytest.mark.parametrize("n,w_ce,w_kl,peers", [
    (1, [1.0], [0.0], None),
    (2, [0.3, 1.0], [0.7, 0.0], None),
    (3, [0.0, 0.5, 1.0], [1.0, 1.0, 0.5], [[1, 2], [0], [0, 1]]),
    (4, [0.5] * 4, [0.5] * 4, None),
])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_plain_mutual_loss_values_and_gradients_are_bit_identical_to_the_first_form(n, w_ce, w_kl, peers, temperature):
    g = torch.Generator().manual_seed(n)
    base = [torch.randn(9, 5, generator=g) for _ in range(n)]
    y = torch.randint(0, 5, (9,), generator=g)
    a = [z.clone().requires_grad_() for z in base]
    b = [z.clone().requires_grad_() for z in base]
    total_a, parts_a = mutual_loss(a, y, w_ce, w_kl, temperature, peers=peers)
    total_b, parts_b = _reference_mutual_loss(b, y, w_ce, w_kl, temperature, peers)
    total_a.backward()
    total_b.backward()
    assert torch.equal(total_a, total_b)
    assert all(torch.equal(p, q) for p, q in zip(parts_a, parts_b))
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(a, b))
