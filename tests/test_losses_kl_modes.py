"""The KL modes, fixed teacher probabilities and binary cross-entropy, against hand-computed numbers."""

import math

import pytest
import torch

from fedmutual.losses import (
    binary_cross_entropy,
    check_kl_mode,
    fixed_teacher_kl,
    log_probs,
    mutual_loss,
    published_probs,
)


def sig(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def test_binary_cross_entropy_hand_computed():
    logits = torch.tensor([[0.5], [-1.2], [2.0]])
    y = torch.tensor([1, 0, 0])
    expected = (-math.log(sig(0.5)) - math.log(1 - sig(-1.2)) - math.log(1 - sig(2.0))) / 3
    assert float(binary_cross_entropy(logits, y)) == pytest.approx(expected, abs=1e-6)
    # stacked [K, B, 1] with a mask: per client, over its valid samples only
    stacked = torch.tensor([[[0.5], [-1.2]], [[2.0], [9.0]]])
    mask = torch.tensor([[True, True], [True, False]])
    out = binary_cross_entropy(stacked, torch.tensor([[1, 0], [0, 1]]), mask=mask)
    assert out.tolist() == pytest.approx([(-math.log(sig(0.5)) - math.log(1 - sig(-1.2))) / 2, -math.log(1 - sig(2.0))], abs=1e-6)


def _one(p: float, z: float, mode: str, t: float = 1.0) -> float:
    teacher = torch.tensor([[[p]]])  # [B=1, P=1, 1]
    return float(fixed_teacher_kl(teacher, log_probs(torch.tensor([[z]]), mode, t), t, None, mode))


def test_bernoulli_kl_is_the_full_two_class_kl():
    p, z = 0.8, 0.4
    q = sig(z)
    expected = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    assert _one(p, z, "bernoulli") == pytest.approx(expected, abs=1e-6)
    assert _one(q, z, "bernoulli") == pytest.approx(0.0, abs=1e-6)  # zero exactly at p = q


def test_faithful_kl_keeps_the_positive_class_term_only_and_can_be_negative():
    assert _one(0.8, 0.4, "faithful") == pytest.approx(0.8 * math.log(0.8 / sig(0.4)), abs=1e-6)
    # p = 0.3 below q = sigmoid(ln 1.5) = 0.6: 0.3·log(0.3/0.6) < 0
    value = _one(0.3, math.log(1.5), "faithful")
    assert value == pytest.approx(0.3 * math.log(0.5), abs=1e-6) and value < 0


def test_binary_kl_gradients_by_hand():
    # d/dz of p·log(p/q) = -p(1 - q); of the Bernoulli KL = q - p
    p, z0 = 0.3, 0.9
    q = sig(z0)
    for mode, expected in (("faithful", -p * (1 - q)), ("bernoulli", q - p)):
        z = torch.tensor([[z0]], requires_grad=True)
        fixed_teacher_kl(torch.tensor([[[p]]]), log_probs(z, mode), 1.0, None, mode).backward()
        assert float(z.grad) == pytest.approx(expected, abs=1e-6), mode


def test_softmax_kl_with_two_fixed_teachers_is_their_mean_batchmean():
    student = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])  # q = [1/4, 3/4] and [1/2, 1/2]
    teachers = torch.tensor([[[0.5, 0.5], [0.9, 0.1]], [[0.5, 0.5], [0.5, 0.5]]])  # [B=2, P=2, C=2]
    kl = lambda p, q: sum(a * math.log(a / b) for a, b in zip(p, q))  # noqa: E731
    row0 = kl([0.5, 0.5], [0.25, 0.75]) + kl([0.9, 0.1], [0.25, 0.75])
    row1 = 0.0
    total, parts = mutual_loss([student], torch.tensor([0, 1]), [0.0], [1.0], teachers=[teachers])
    assert float(parts[0]) == pytest.approx((row0 + row1) / 2 / 2, abs=1e-6)  # mean over 2 teachers, over 2 rows
    assert float(total) == float(parts[0])


def test_fixed_teacher_with_exact_zeros_counts_zero_log_zero_as_zero():
    student = torch.zeros(1, 3)  # q = 1/3 each
    teacher = torch.tensor([[[0.7, 0.3, 0.0]]])
    expected = 0.7 * math.log(0.7 * 3) + 0.3 * math.log(0.3 * 3)
    value = fixed_teacher_kl(teacher, log_probs(student), 1.0, None)
    assert float(value) == pytest.approx(expected, abs=1e-6)


def test_fixed_teacher_temperature_scales_by_tau_squared():
    tau = 2.0
    q1 = 1 / (1 + math.sqrt(3))  # softmax([0, ln 3] / 2)
    expected = tau**2 * (0.5 * math.log(0.5 / q1) + 0.5 * math.log(0.5 / (1 - q1)))
    _, parts = mutual_loss([torch.tensor([[0.0, math.log(3.0)]])], torch.tensor([0]), [0.0], [1.0], tau,
                           teachers=[torch.tensor([[[0.5, 0.5]]])])
    assert float(parts[0]) == pytest.approx(expected, abs=1e-6)


def test_mutual_loss_with_ce_weight_kl_weight_and_binary_teachers():
    z = torch.tensor([[0.4], [-0.7]])
    y = torch.tensor([1, 0])
    teachers = torch.tensor([[[0.8], [0.6]], [[0.1], [0.5]]])  # [B=2, P=2, 1]
    bern = lambda p, q: p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))  # noqa: E731
    q = [sig(0.4), sig(-0.7)]
    kl = ((bern(0.8, q[0]) + bern(0.6, q[0])) + (bern(0.1, q[1]) + bern(0.5, q[1]))) / 2 / 2
    bce = (-math.log(q[0]) - math.log(1 - q[1])) / 2
    _, parts = mutual_loss([z], y, [0.5], [2.0], ce=binary_cross_entropy, teachers=[teachers], kl="bernoulli")
    assert float(parts[0]) == pytest.approx(0.5 * bce + 2.0 * kl, abs=1e-6)


def test_live_binary_peers_match_fixed_teachers_of_their_sigmoids():
    za, zb = torch.tensor([[0.3], [-1.1], [2.0]], requires_grad=True), torch.tensor([[1.2], [0.4], [-0.5]])
    y = torch.tensor([1, 0, 1])
    for mode in ("bernoulli", "faithful"):
        _, live = mutual_loss([za, zb], y, [1.0, 1.0], [1.0, 1.0], ce=binary_cross_entropy, kl=mode)
        fixed_t = published_probs(zb, mode)[:, None, :]
        _, fixed = mutual_loss([za], y, [1.0], [1.0], ce=binary_cross_entropy, peers=[[]], teachers=[fixed_t], kl=mode)
        assert float(live[0].detach()) == pytest.approx(float(fixed[0].detach()), abs=1e-6), mode


def test_stacked_fixed_teachers_with_mask_equal_each_clients_plain_loss():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, 5, generator=g)
    teachers = torch.softmax(torch.randn(2, 4, 3, 5, generator=g), -1)
    y = torch.randint(0, 5, (2, 4), generator=g)
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    _, parts = mutual_loss([z], y, [1.0], [0.5], teachers=[teachers], mask=mask)
    for k, n in ((0, 4), (1, 2)):
        _, plain = mutual_loss([z[k, :n]], y[k, :n], [1.0], [0.5], teachers=[teachers[k, :n]])
        assert float(parts[0][k]) == pytest.approx(float(plain[0]), abs=1e-6)


def test_kl_modes_that_do_not_fit_the_outputs_are_refused():
    with pytest.raises(ValueError, match="softmax' needs at least two outputs"):
        check_kl_mode("softmax", 1)
    with pytest.raises(ValueError, match="one sigmoid output"):
        check_kl_mode("bernoulli", 10)
    with pytest.raises(ValueError, match="unknown KL mode"):
        check_kl_mode("jensen", 2)
    with pytest.raises(ValueError, match="one sigmoid output"):
        mutual_loss([torch.zeros(2, 3)], torch.tensor([0, 1]), [1.0], [1.0], teachers=[torch.full((2, 1, 3), 1 / 3)], kl="faithful")
