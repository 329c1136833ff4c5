import torch
from torch import nn

from fedmutual.engine.cohort import accuracy


def _fixed(logits: list[list[float]]) -> nn.Module:
    """A model that returns row i of ``logits`` for input i (inputs are row indices)."""
    table = torch.tensor(logits)

    class Lookup(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return table[x.long()]

    return Lookup()


def test_accuracy_multiclass_takes_the_argmax():
    model = _fixed([[0.1, 2.0, 0.3], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 5.0, 0.0]])
    x, y = torch.arange(4), torch.tensor([1, 0, 0, 2])
    assert accuracy(model, x, y, batch_size=3) == 0.5  # rows 0 and 1 right


def test_accuracy_single_output_is_binary_with_threshold_zero():
    model = _fixed([[0.7], [-0.2], [0.0], [3.0], [-4.0]])
    x, y = torch.arange(5), torch.tensor([1, 0, 1, 0, 0])
    assert accuracy(model, x, y) == 0.6  # 0.7 -> 1 right, -0.2 -> 0 right, 0.0 -> 0 wrong, 3.0 -> 1 wrong, -4 -> 0 right
