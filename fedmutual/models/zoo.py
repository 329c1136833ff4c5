"""The model zoo of ALGORITHMS.md (MLP, LeNet5, CNN1, CNN2, DML-FL's CNN ``dmlcnn``, and ``fedavgcnn``, the
(F)MNIST CNN that other simulators run FML with) and the
registry :data:`MODELS` through which configs name models, the zoo's and users' alike.

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

from fedmutual.errors import ConfigError, FedmutualError
from fedmutual.registry import Registry, canonical, is_import_string

InputShape = tuple[int, int, int]
#: Builds a fresh model: ``(input_shape, num_outputs) -> nn.Module``.
ModelBuilder = Callable[[InputShape, int], nn.Module]


def _flat_size(layers: nn.Module, input_shape: InputShape) -> int:
    """The number of outputs ``layers`` give one input, found in eval mode (no batch statistics or
    dropout draws), with the module's mode restored afterwards."""
    modes = [(m, m.training) for m in layers.modules()]
    layers.eval()
    try:
        with torch.no_grad():
            return int(layers(torch.zeros(1, *input_shape)).numel())
    finally:
        for m, mode in modes:
            m.training = mode


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


def fedavgcnn(input_shape: InputShape, num_classes: int) -> nn.Sequential:
    """The (F)MNIST CNN of McMahan et al. (2017) as PFLlib ships it (``FedAvgCNN``): two unpadded 5x5 convs
    (32, 64 channels), each -> ReLU -> maxpool 2, then FC 512 -> ReLU -> FC C. On 28x28 inputs the flattened
    map is 64x4x4 = 1024 and the model has 582,026 parameters for 10 classes."""
    c = input_shape[0]
    features = nn.Sequential(
        nn.Conv2d(c, 32, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )
    n = _flat_size(features, input_shape)
    return nn.Sequential(*features, nn.Linear(n, 512), nn.ReLU(), nn.Linear(512, num_classes))


def _check_builder(name: str, obj: object) -> ModelBuilder:
    if not callable(obj):
        raise TypeError(
            f"a model builder must be a callable (input_shape, num_outputs) -> nn.Module "
            f"(a function or an nn.Module subclass), got {type(obj).__name__} {obj!r}"
        )
    return obj


#: Every model a config can name: the zoo's, those added with :func:`register_model`, installed plug-ins
#: (entry points of group ``fedmutual.models``) and import strings ``"package.module:Builder"``.
MODELS: Registry[ModelBuilder] = Registry("model", check=_check_builder)


def register_model(name: str, builder: ModelBuilder, replace: bool = False) -> ModelBuilder:
    """Make ``builder`` available to configs as ``model = name`` (and ``global_model = name[:part]``).

    ``builder(input_shape, num_outputs)`` returns a fresh ``nn.Module`` mapping ``[N, *input_shape]`` to
    ``[N, num_outputs]``; an ``nn.Module`` subclass with that constructor works as it is. Its weights must
    come from torch's global generator only, since the engine seeds it before every build. A flat
    ``nn.Sequential`` can also serve as a partial global model (see :func:`build_encoder`). Registering
    a name that is taken raises ValueError unless ``replace``; returns ``builder``.
    """
    MODELS.register(name, builder, replace=replace)
    return builder


for _name, _builder in (("mlp", mlp), ("lenet5", lenet5), ("cnn1", cnn1), ("cnn2", cnn2), ("dmlcnn", dmlcnn),
                       ("fedavgcnn", fedavgcnn)):
    register_model(_name, _builder)
del _name, _builder


def _allowed() -> str:
    names = sorted(n for n in MODELS.names() if ":" not in n)  # without import strings already imported
    return f"{', '.join(names)}, or an import string such as 'mypackage.nets:Net'"


def _builder_of(name: str, spec: str | None = None) -> ModelBuilder:
    """The builder of ``name``; an unknown plain name lists the choices in sorted order."""
    key = canonical(name)
    try:
        return MODELS.get(key)
    except ConfigError as e:
        if not str(e).startswith("unknown model"):
            raise  # an import string or a plug-in that failed to load: its message says why
        where = f" in {spec!r}" if spec is not None and spec != name else ""
        raise ConfigError(f"unknown model {name!r}{where}; allowed: {_allowed()}") from None


def build_model(name: str, input_shape: InputShape, num_outputs: int) -> nn.Module:
    """Build model ``name`` (a registered name or an import string) for inputs of ``input_shape`` (C, H, W)."""
    builder = _builder_of(name)
    if num_outputs < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_outputs}")
    c, h, w = (int(s) for s in input_shape)
    shape = (c, h, w)
    try:
        model = builder(shape, num_outputs)
    except FedmutualError:
        raise
    except Exception as e:
        raise ConfigError(
            f"model {canonical(name)!r}: building it for inputs {shape} with {num_outputs} outputs failed "
            f"({type(e).__name__}: {e})"
        ) from e
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model {canonical(name)!r}: its builder returned a {type(model).__name__}, not an nn.Module"
        )
    return model


#: Named prefixes of a model that can serve as a shared encoder (FML's partial global model), for any
#: model that is a flat ``nn.Sequential`` (every zoo model is). ``encoder``: every layer before the last
#: layer with parameters (the classifier); ``features``: the layers up to and including the first
#: ``nn.Flatten`` (for the zoo's CNNs, the convolutional part).
PARTS: tuple[str, ...] = ("encoder", "features")


def _split_spec(text: str) -> tuple[str, str | None]:
    """``name``, ``name:part``, ``pkg.mod:Attr`` or ``pkg.mod:Attr:part`` -> (model, part or None).

    With one colon the text is a part of a model when the word after the colon names a part or the word
    before it is a registered model; otherwise it is an import string naming a whole model.
    """
    if text.count(":") >= 2:
        name, _, part = text.rpartition(":")
        return name, part
    head, sep, tail = text.partition(":")
    if not sep:
        return text, None
    if not is_import_string(text) or tail.strip().lower() in PARTS or canonical(head) in MODELS.names():
        return head, tail
    return text, None


def parse_model_spec(spec: str) -> tuple[str, str | None]:
    """``"cnn2"`` -> ``("cnn2", None)``; ``"cnn2:encoder"`` -> ``("cnn2", "encoder")``;
    ``"pkg.nets:Tiny"`` -> ``("pkg.nets:Tiny", None)``; ``"pkg.nets:Tiny:encoder"`` ->
    ``("pkg.nets:Tiny", "encoder")``. Registered names come back in canonical (lower) case, import strings
    as written. A part is checked on the model built for 1x28x28 inputs; ConfigError otherwise."""
    name, part = _split_spec(str(spec).strip())
    key = canonical(name)
    _builder_of(key, spec)
    if part is None:
        return key, None
    part = part.strip().lower()
    if part not in PARTS:
        raise ConfigError(f"unknown model part {part!r} in {spec!r}; allowed: {', '.join(PARTS)} (e.g. cnn2:encoder)")
    _split_point(build_model(key, (1, 28, 28), 1), part, key)
    return key, part


def _split_point(model: nn.Module, part: str, name: str) -> int:
    """How many leading layers of model ``name`` form ``part``; ConfigError when it has no such part."""
    spec = f"{name}:{part}"
    if not isinstance(model, nn.Sequential):
        raise ConfigError(
            f"model part {spec!r}: model {name!r} is a {type(model).__name__}, not an nn.Sequential, so it has "
            f"no part {part!r}; a partial global model needs a flat nn.Sequential of layers (use the whole "
            f"model {name!r}, or build it as an nn.Sequential)"
        )
    layers = list(model)
    if part == "encoder":
        trainable = [i for i, m in enumerate(layers) if any(p.requires_grad for p in m.parameters())]
        if not trainable:
            raise ConfigError(f"model part {spec!r}: model {name!r} has no layer with parameters, so it has no classifier to cut off")
        n = trainable[-1]
    else:
        flat = [i for i, m in enumerate(layers) if isinstance(m, nn.Flatten)]
        if not flat:
            raise ConfigError(
                f"model part {spec!r}: model {name!r} has no nn.Flatten among its layers, so it has no "
                f"part 'features' (the layers up to the Flatten); use {name}:encoder"
            )
        n = flat[0] + 1
    if not any(p.numel() for m in layers[:n] for p in m.parameters()):
        other = "the whole model" if part == "encoder" else f"{name}:encoder"
        raise ConfigError(f"model part {spec!r} has no trainable layers; use {other}")
    return n


def build_encoder(name: str, part: str, input_shape: InputShape) -> tuple[nn.Sequential, int]:
    """The named prefix ``part`` of model ``name`` and the size of its (flat) output.

    The layers are built exactly as in the full model, so an encoder's parameters
    are those of the full model's prefix under the same seed; the layers keep
    their names in the full model (``"0"``, ``"1"``, ... for the zoo).
    """
    key = canonical(name)
    full = build_model(key, input_shape, 1)
    n = _split_point(full, part, key)
    encoder = nn.Sequential(OrderedDict((k, m) for k, m in list(full._modules.items())[:n] if m is not None))
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
