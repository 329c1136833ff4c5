import pytest

from fedmutual.schedules import Schedule


def test_constant_and_number_shorthand():
    assert Schedule.model_validate(0.3).at(5, 10) == 0.3


def test_step_holds_values_for_equal_fractions():
    s = Schedule(kind="step", values=[0.1, 0.5, 0.9])
    assert [s.at(t, 9) for t in range(9)] == [0.1] * 3 + [0.5] * 3 + [0.9] * 3


def test_linear_and_cosine_hand_computed():
    lin = Schedule(kind="linear", start=0.0, end=1.0)
    assert [lin.at(t, 5) for t in range(5)] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    cos = Schedule(kind="cosine", start=1.0, end=0.0)
    assert [cos.at(t, 3) for t in range(3)] == pytest.approx([1.0, 0.5, 0.0])
    assert cos.at(1, 5) == pytest.approx(0.5 * (1 + 2**-0.5))  # cos(pi/4)


def test_missing_fields_and_range():
    with pytest.raises(ValueError, match="linear schedule needs start and end"):
        Schedule(kind="linear")
    with pytest.raises(ValueError):
        Schedule(kind="constant", value=1.5)
