"""A small CNN with BatchNorm, as a flat ``nn.Sequential`` (so it stacks, and has ``encoder``/``features`` parts)."""

from __future__ import annotations

from torch import nn


def TinyBN(input_shape: tuple[int, int, int], num_outputs: int) -> nn.Sequential:
    """conv 3x3 (8) -> BN -> ReLU -> maxpool 2 -> conv 3x3 (16) -> BN -> ReLU -> maxpool 2 -> FC num_outputs."""
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * (h // 4) * (w // 4), num_outputs),
    )
