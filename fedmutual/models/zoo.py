"""The model zoo of ALGORITHMS.md: MLP, LeNet5, CNN1, CNN2 and DML-FL's CNN (``dmlcnn``).

Every zoo model is a flat ``nn.Sequential`` of standard layers. That keeps the
``state_dict`` keys plain (``"0.weight"``, ...), lets the engine convert a group
of identical models into one stacked model, and lets a named prefix of layers
serve as a shared encoder.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import torch
from torch import nn

from fedmutual.errors import ConfigError

InputShape = tuple[int, int, int]


def _flat_size(layers: nn.Sequential, input_shape: InputShape) -> int:
    with torch.no_grad():
        return int(layers(torch.zeros(1, *input_shape)).numel())


def mlp(input_shape: InputShape, num_classes: int) -> nn.Sequential:
    """flatten -> FC 200 -> ReLU -> FC 200 -> ReLU -> FC C (McMahan et al. 2017)."""
    c, h, w = input_shape
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(c * h * w, 200),
        nn.ReLU(),
        nn.Linear(200, 200),
        nn.ReLU(),
        nn.Linear(200, num_classes),
    )


def lenet5(input_shape: InputShape, num_classes: int) -> nn.Sequential:
    """LeNet5; the first conv is padded by 2 on inputs smaller than 32x32."""
    c, h, _ = input_shape
    pad = 2 if h < 32 else 0
    features = nn.Sequential(
        nn.Conv2d(c, 6, 5, padding=pad),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )
    n = _flat_size(features, input_shape)
    return nn.Sequential(
        *features,
        nn.Linear(n, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )


def cnn1(input_shape: InputShape, num_classes: int) -> nn.Sequential:
    """Two unpadded 3x3 convs (6, 16 channels), each -> maxpool 2 -> ReLU, then FC 120 -> FC C."""
    c = input_shape[0]
    features = nn.Sequential(
        nn.Conv2d(c, 6, 3),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Conv2d(6, 16, 3),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Flatten(),
    )
    n = _flat_size(features, input_shape)
    return nn.Sequential(*features, nn.Linear(n, 120), nn.ReLU(), nn.Linear(120, num_classes))


def cnn2(input_shape: InputShape, num_classes: int) -> nn.Sequential:
    """Three 3x3 convs of 128 channels (padding 1), each -> maxpool 2 -> ReLU, then FC C."""
    c = input_shape[0]
    layers: list[nn.Module] = []
    for i in range(3):
        layers += [nn.Conv2d(c if i == 0 else 128, 128, 3, padding=1), nn.MaxPool2d(2), nn.ReLU()]
    features = nn.Sequential(*layers, nn.Flatten())
    n = _flat_size(features, input_shape)
    return nn.Sequential(*features, nn.Linear(n, num_classes))


def dmlcnn(input_shape: InputShape, num_classes: int) -> nn.Sequential:
    """The DML-FL authors' CNN (Gupta 2025): three unpadded 3x3 convs (32, 64, 64 channels, each
    followed by ReLU; maxpool 2 after the first two), then dropout 0.2 -> FC 64 -> ReLU -> dropout 0.2
    -> FC C. Built for 3x100x100 inputs; 28x28 and 32x32 inputs give a 3x3 and a 4x4 final map.
    With one output (a binary task) the output is the sigmoid's logit."""
    c = input_shape[0]
    features = nn.Sequential(
        nn.Conv2d(c, 32, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3),
        nn.ReLU(),
        nn.Flatten(),
    )
    n = _flat_size(features, input_shape)
    return nn.Sequential(
        *features, nn.Dropout(0.2), nn.Linear(n, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, num_classes)
    )


ZOO: dict[str, Callable[[InputShape, int], nn.Sequential]] = {
    "mlp": mlp,
    "lenet5": lenet5,
    "cnn1": cnn1,
    "cnn2": cnn2,
    "dmlcnn": dmlcnn,
}


def build_model(name: str, input_shape: InputShape, num_classes: int) -> nn.Module:
    """Build a zoo model by name for inputs of ``input_shape`` (C, H, W)."""
    key = name.lower()
    if key not in ZOO:
        raise ConfigError(f"unknown model {name!r}; allowed: {', '.join(sorted(ZOO))}")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    return ZOO[key](tuple(input_shape), num_classes)


#: Named prefixes of a zoo model that can serve as a shared encoder (FML's partial global model).
#: ``encoder``: every layer but the final classifier layer; ``features``: the layers up to and
#: including the Flatten (the convolutional part).
PARTS: tuple[str, ...] = ("encoder", "features")


def parse_model_spec(spec: str) -> tuple[str, str | None]:
    """``"cnn2"`` -> ``("cnn2", None)``; ``"cnn2:encoder"`` -> ``("cnn2", "encoder")``; ConfigError otherwise."""
    name, _, part = spec.strip().lower().partition(":")
    if name not in ZOO:
        raise ConfigError(f"unknown model {name!r} in {spec!r}; allowed: {', '.join(sorted(ZOO))}")
    if not part:
        return name, None
    if part not in PARTS:
        raise ConfigError(f"unknown model part {part!r} in {spec!r}; allowed: {', '.join(PARTS)} (e.g. cnn2:encoder)")
    if _split_point(ZOO[name]((1, 28, 28), 1), part) == 0:
        raise ConfigError(f"model part {spec!r} has no trainable layers; use {name}:encoder")
    return name, part


def _split_point(model: nn.Sequential, part: str) -> int:
    """How many leading layers of a zoo model form ``part``, counting only up to its last trainable layer."""
    layers = list(model)
    n = len(layers) - 1 if part == "encoder" else next(i + 1 for i, m in enumerate(layers) if isinstance(m, nn.Flatten))
    return n if any(p.numel() for m in layers[:n] for p in m.parameters()) else 0


def build_encoder(name: str, part: str, input_shape: InputShape) -> tuple[nn.Sequential, int]:
    """The named prefix ``part`` of zoo model ``name`` and the size of its (flat) output.

    The layers are built exactly as in the full model, so an encoder's parameters
    are those of the full model's prefix under the same seed.
    """
    full = build_model(name, input_shape, 1)
    encoder = nn.Sequential(*list(full)[: _split_point(full, part)])
    return encoder, _flat_size(encoder, input_shape)


def adaptor_head(in_features: int, num_outputs: int, hidden: Sequence[int] = ()) -> nn.Module:
    """A client's adaptor head on a shared encoder: one FC layer, or FC -> ReLU -> ... -> FC with ``hidden`` widths."""
    if not hidden:
        return nn.Linear(in_features, num_outputs)
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_features, width), nn.ReLU()]
        in_features = width
    return nn.Sequential(*layers, nn.Linear(in_features, num_outputs))


def with_head(encoder: nn.Module, head: nn.Module) -> nn.Sequential:
    """encoder -> head as one flat-keyed model: parameters ``encoder.*`` and ``head.*``."""
    return nn.Sequential(OrderedDict(encoder=encoder, head=head))
