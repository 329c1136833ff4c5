import pytest
import torch

from fedmutual.aggregation import weighted_mean


def test_weighted_and_uniform_mean_hand_computed():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(0.0), "n": torch.tensor(7)}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor(4.0), "n": torch.tensor(9)}
    u = weighted_mean([a, b])
    assert u["w"].tolist() == [2.0, 4.0] and float(u["b"]) == 2.0
    w = weighted_mean([a, b], [1.0, 3.0])  # (1*a + 3*b) / 4
    assert w["w"].tolist() == [2.5, 5.0] and float(w["b"]) == 3.0
    assert int(w["n"]) == 7  # integer buffers are not averaged
    assert w["w"].dtype == torch.float32


def test_bad_weights_are_refused():
    s = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match="non-negative weights"):
        weighted_mean([s, s], [1.0, -1.0])
    with pytest.raises(ValueError, match="zero states"):
        weighted_mean([])
