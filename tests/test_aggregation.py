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


# Robust rules: hand-computed per coordinate.
# Five parties, two coordinates:   column 0: 1, 2, 3, 4, 100    column 1: -5, 0, 1, 2, 3
FIVE = torch.tensor([[1.0, -5.0], [2.0, 0.0], [3.0, 1.0], [4.0, 2.0], [100.0, 3.0]])


def test_median_odd_and_even_counts():
    from fedmutual.aggregation import median

    assert median(FIVE).tolist() == [3.0, 1.0]
    # four rows (drop the last): the mean of the two middle values: (2+3)/2, (0+1)/2
    assert median(FIVE[:4]).tolist() == [2.5, 0.5]
    assert median(FIVE[:1]).tolist() == [1.0, -5.0]
    assert median(FIVE).dtype == torch.float32


def test_trimmed_mean_hand_computed():
    from fedmutual.aggregation import trim_count, trimmed_mean

    # trim 0.2 of 5 -> floor(1.0) = 1 value dropped at each end
    assert trim_count(5, 0.2) == 1
    t = trimmed_mean(FIVE, 0.2)
    assert t.tolist() == pytest.approx([(2 + 3 + 4) / 3, (0 + 1 + 2) / 3])
    # trim 0.1 of 5 -> floor(0.5) = 0: the plain mean
    assert trimmed_mean(FIVE, 0.1).tolist() == pytest.approx([110 / 5, 1 / 5])
    # trim 0.4 of 5 -> 2 at each end: the median
    assert trimmed_mean(FIVE, 0.4).tolist() == [3.0, 1.0]
    # never trims everything: two rows with trim 0.49 keep both
    assert trim_count(2, 0.49) == 0
    with pytest.raises(ValueError, match=r"trim must be in \[0, 0.5\)"):
        trimmed_mean(FIVE, 0.5)


def test_aggregate_state_dicts_with_each_rule():
    from fedmutual.aggregation import aggregate

    states = [{"w": row.clone(), "n": torch.tensor(i)} for i, row in enumerate(FIVE)]
    assert aggregate(states, "median")["w"].tolist() == [3.0, 1.0]
    assert aggregate(states, "trimmed_mean", trim=0.2)["w"].tolist() == pytest.approx([3.0, 1.0])
    assert aggregate(states, "mean")["w"].tolist() == pytest.approx([22.0, 0.2])
    assert int(aggregate(states, "median")["n"]) == 0  # integer buffers: the first state's
    # weights are ignored by robust rules, honoured by the mean: (1*1 + 3*2)/4 = 1.75
    assert aggregate(states[:2], "mean", weights=[1.0, 3.0])["w"][0].item() == pytest.approx(1.75)
    assert aggregate(states[:2], "median", weights=[1.0, 3.0])["w"][0].item() == 1.5
    with pytest.raises(ValueError, match="unknown aggregation rule 'mode'"):
        aggregate(states, "mode")


def test_rules_on_stacked_predictions():
    from fedmutual.aggregation import reduce_rows

    # three clients' probabilities for two samples; client 2 publishes a constant label
    p = torch.tensor([[[0.8, 0.2], [0.3, 0.7]],
                      [[0.6, 0.4], [0.1, 0.9]],
                      [[0.0, 1.0], [0.0, 1.0]]])
    med = torch.tensor([[0.6, 0.4], [0.1, 0.9]])
    assert torch.allclose(reduce_rows(p, "median"), med)
    assert torch.allclose(reduce_rows(p, "mean"), torch.tensor([[1.4 / 3, 1.6 / 3], [0.4 / 3, 2.6 / 3]]))
    # trim 0.34 of 3 -> floor(1.02) = 1 at each end: the median
    assert torch.allclose(reduce_rows(p, "trimmed_mean", trim=0.34), med)
    assert reduce_rows(p, "median").shape == (2, 2)


def test_a_sign_flipping_minority_moves_the_mean_not_the_median():
    from fedmutual.aggregation import aggregate

    honest = [{"w": torch.tensor([1.0 + 0.1 * i])} for i in range(8)]  # 1.0 .. 1.7
    hostile = [{"w": torch.tensor([-10.0])} for _ in range(2)]
    mean = aggregate(honest + hostile, "mean")["w"].item()
    assert mean == pytest.approx((sum(1.0 + 0.1 * i for i in range(8)) - 20.0) / 10)
    assert aggregate(honest + hostile, "median")["w"].item() == pytest.approx((1.2 + 1.3) / 2)
    # trim 0.2 of 10 drops the two hostile values and the two largest honest ones: mean of 1.0..1.5
    assert aggregate(honest + hostile, "trimmed_mean", trim=0.2)["w"].item() == pytest.approx(sum(1.0 + 0.1 * i for i in range(6)) / 6)
