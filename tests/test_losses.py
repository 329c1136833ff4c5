import math

import pytest
import torch

from fedmutual.losses import cross_entropy, kl_divergence, mutual_loss


def test_cross_entropy_hand_computed():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([2, 1])
    row0 = math.log(1 + math.exp(-1) + math.exp(-2))  # -log softmax_2
    row1 = math.log(3)
    assert float(cross_entropy(logits, y)) == pytest.approx((row0 + row1) / 2, abs=1e-6)


def test_kl_direction_and_batchmean():
    # teacher p = [1/2, 1/2]; student q = [1/4, 3/4]
    teacher = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    student = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    kl_pq = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    kl_qp = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    # batchmean: summed over classes, averaged over the 2 rows (the second row contributes 0)
    assert float(kl_divergence(teacher, student)) == pytest.approx(kl_pq / 2, abs=1e-7)
    assert float(kl_divergence(student, teacher)) == pytest.approx(kl_qp / 2, abs=1e-7)
    assert abs(kl_pq - kl_qp) > 0.01  # the direction matters


def test_kl_not_divided_by_number_of_classes():
    teacher = torch.tensor([[2.0, 0.0, 0.0, 0.0, 0.0]])
    student = torch.zeros(1, 5)
    p = torch.softmax(teacher, -1)[0].tolist()
    expected = sum(pi * math.log(pi / 0.2) for pi in p)
    assert float(kl_divergence(teacher, student)) == pytest.approx(expected, abs=1e-6)


def test_kl_temperature_scales_by_tau_squared():
    tau = 2.0
    teacher = torch.tensor([[0.0, 0.0]])
    student = torch.tensor([[0.0, math.log(3.0)]])
    q1 = 1 / (1 + math.sqrt(3))  # softmax([0, ln3] / 2)
    expected = tau**2 * (0.5 * math.log(0.5 / q1) + 0.5 * math.log(0.5 / (1 - q1)))
    assert float(kl_divergence(teacher, student, tau)) == pytest.approx(expected, abs=1e-6)


def test_teacher_is_detached():
    teacher = torch.tensor([[0.3, -0.2, 1.0]], requires_grad=True)
    student = torch.tensor([[0.0, 0.5, -1.0]], requires_grad=True)
    kl_divergence(teacher, student).backward()
    assert teacher.grad is None
    # d KL(p||q) / d z_student = q - p
    p, q = torch.softmax(teacher.detach(), -1), torch.softmax(student.detach(), -1)
    assert torch.allclose(student.grad, q - p, atol=1e-6)


def test_mutual_loss_weights_and_one_backward_gives_each_model_its_own_gradient():
    torch.manual_seed(0)
    za = torch.randn(4, 3, requires_grad=True)
    zb = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 1])
    alpha, beta = 0.3, 0.8
    total, parts = mutual_loss([za, zb], y, [alpha, beta], [1 - alpha, 1 - beta])
    la = alpha * cross_entropy(za, y) + (1 - alpha) * kl_divergence(zb, za)
    lb = beta * cross_entropy(zb, y) + (1 - beta) * kl_divergence(za, zb)
    assert float(parts[0]) == pytest.approx(float(la), abs=1e-6)
    assert float(parts[1]) == pytest.approx(float(lb), abs=1e-6)
    total.backward()
    ga, gb = za.grad.clone(), zb.grad.clone()
    # gradient of za is that of L_a alone; of zb, that of L_b alone
    za2, zb2 = za.detach().clone().requires_grad_(), zb.detach().clone().requires_grad_()
    (alpha * cross_entropy(za2, y) + (1 - alpha) * kl_divergence(zb2, za2)).backward()
    assert torch.allclose(ga, za2.grad, atol=1e-7)
    za3, zb3 = za.detach().clone().requires_grad_(), zb.detach().clone().requires_grad_()
    (beta * cross_entropy(zb3, y) + (1 - beta) * kl_divergence(za3, zb3)).backward()
    assert torch.allclose(gb, zb3.grad, atol=1e-7)


def test_mutual_loss_mean_over_peers_and_explicit_peer_sets():
    z = [torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[math.log(3.0), 0.0]])]
    y = torch.tensor([0])
    total, parts = mutual_loss(z, y, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    kl = lambda p, q: sum(a * math.log(a / b) for a, b in zip(p, q))  # noqa: E731
    p0, p1, p2 = [0.5, 0.5], [0.25, 0.75], [0.75, 0.25]
    assert float(parts[0]) == pytest.approx((kl(p1, p0) + kl(p2, p0)) / 2, abs=1e-6)
    assert float(total) == pytest.approx(sum(float(p) for p in parts), abs=1e-6)
    _, only = mutual_loss(z, y, [0.0] * 3, [1.0] * 3, peers=[[1], [], [0]])
    assert float(only[0]) == pytest.approx(kl(p1, p0), abs=1e-6)
    assert float(only[1]) == 0.0
    with pytest.raises(ValueError, match="one w_ce and one w_kl per model"):
        mutual_loss(z, y, [1.0], [0.0, 0.0, 0.0])


def test_wsm_hand_computed_with_an_absent_class_masked_out():
    from fedmutual.losses import class_shares, wsm, wsm_cross_entropy

    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], requires_grad=True)
    y = torch.tensor([0, 1])
    share = torch.tensor([0.25, 0.75, 0.0])  # class 2 absent from the data
    e1, e2 = math.exp(1), math.exp(2)
    row0 = math.log(0.25 * e1 + 0.75 * e2) - (1 + math.log(0.25))
    row1 = math.log(0.25 * e1 + 0.75 * e2) - (2 + math.log(0.75))
    loss = wsm_cross_entropy(logits, y, class_share=share)
    assert float(loss) == pytest.approx((row0 + row1) / 2, abs=1e-6)
    loss.backward()
    assert torch.all(logits.grad[:, 2] == 0)  # the absent class gets no gradient, despite the largest logit
    assert torch.isfinite(logits.grad).all()
    # uniform shares reduce WSM to plain CE
    z = torch.randn(5, 4)
    t = torch.tensor([0, 1, 2, 3, 0])
    assert float(wsm(torch.full((4,), 0.25))(z, t)) == pytest.approx(float(cross_entropy(z, t)), abs=1e-6)
    assert class_shares(torch.tensor([0, 0, 1, 3]), 4).tolist() == [0.5, 0.25, 0.0, 0.25]
