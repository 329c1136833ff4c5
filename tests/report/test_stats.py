"""Statistics over seeds against hand-computed numbers and published t tables."""

from __future__ import annotations

import math

import pytest

from fedmutual.report.stats import mean_sd, paired_difference, t_cdf, t_quantile


def test_mean_and_sample_standard_deviation() -> None:
    m, sd = mean_sd([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and sd == pytest.approx(math.sqrt(5.0 / 3.0), abs=1e-15)  # squares 2.25+0.25+0.25+2.25 = 5, over n-1 = 3
    assert mean_sd([0.7]) == (0.7, None)
    with pytest.raises(ValueError):
        mean_sd([])


@pytest.mark.parametrize("df, q", [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (5, 2.571), (10, 2.228), (30, 2.042)])
def test_t_quantiles_match_the_published_table(df: int, q: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(q, abs=6e-4)  # the table rounds to 3 decimals
    assert t_quantile(0.025, df) == pytest.approx(-q, abs=6e-4)


def test_t_cdf_closed_forms() -> None:
    # df = 1 is the Cauchy distribution: F(t) = 1/2 + atan(t)/pi; df = 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2))
    for t in (-3.0, -0.5, 0.0, 0.7, 5.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


def test_paired_difference_by_hand() -> None:
    d = paired_difference([0.8, 0.7, 0.9], [0.6, 0.65, 0.7])
    # differences 0.2, 0.05, 0.2: mean 0.15; deviations 0.05, -0.1, 0.05 -> sd = sqrt(0.015 / 2)
    sd = math.sqrt(0.015 / 2)
    half = 4.302653 * sd / math.sqrt(3)
    assert d.n == 3 and d.mean == pytest.approx(0.15, abs=1e-12) and d.sd == pytest.approx(sd, abs=1e-12)
    assert d.low == pytest.approx(0.15 - half, abs=1e-6) and d.high == pytest.approx(0.15 + half, abs=1e-6)
    one = paired_difference([0.5], [0.25])
    assert one.mean == 0.25 and one.low is None and one.sd is None
    with pytest.raises(ValueError):
        paired_difference([0.1, 0.2], [0.1])
