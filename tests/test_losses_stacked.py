"""The stacked and masked forms of the losses against the plain 2-D form, client by client."""

from functools import partial

import pytest
import torch

from fedmutual.losses import batch_mean, cross_entropy, is_stackable, kl_divergence, mutual_loss, stackable


def _stacked(k: int = 3, b: int = 6, c: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, b, c, generator=g), torch.randn(k, b, c, generator=g), torch.randint(0, c, (k, b), generator=g)


def test_stacked_cross_entropy_and_kl_equal_the_plain_form_per_client():
    za, zb, y = _stacked()
    ce, kl = cross_entropy(za, y), kl_divergence(zb, za, 2.0)
    assert ce.shape == kl.shape == (3,)
    for k in range(3):
        assert torch.allclose(ce[k], cross_entropy(za[k], y[k]), atol=1e-6)
        assert torch.allclose(kl[k], kl_divergence(zb[k], za[k], 2.0), atol=1e-6)


def test_mask_averages_over_each_clients_valid_samples_only():
    za, zb, y = _stacked()
    valid = [6, 2, 4]
    mask = torch.arange(6)[None, :] < torch.tensor(valid)[:, None]
    za[1, 2:] = float("nan")  # padding may hold anything; it must not leak into the loss
    ce, kl = cross_entropy(za, y, mask=mask), kl_divergence(zb, za, mask=mask)
    for k, n in enumerate(valid):
        assert torch.allclose(ce[k], cross_entropy(za[k, :n], y[k, :n]), atol=1e-6)
        assert torch.allclose(kl[k], kl_divergence(zb[k, :n], za[k, :n]), atol=1e-6)
    # a 2-D batch takes a [B] mask the same way
    assert torch.allclose(cross_entropy(za[2], y[2], mask=mask[2]), cross_entropy(za[2, :4], y[2, :4]), atol=1e-6)


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
    for k in range(3):
        n = int(mask[k].sum())
        plain = [z[k, :n].clone().requires_grad_() for z in (za, zb, zc)]
        wk = lambda w: float(w[k]) if isinstance(w, torch.Tensor) else w  # noqa: E731
        t_k, p_k = mutual_loss(plain, y[k, :n], [wk(w) for w in w_ce], [wk(w) for w in w_kl], 1.5, peers=peers)
        t_k.backward()
        for i in range(3):
            assert torch.allclose(parts[i][k], p_k[i], atol=1e-6)
            assert torch.allclose(leaves[i].grad[k, :n], plain[i].grad, atol=1e-6)
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
