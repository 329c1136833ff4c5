"""Stackability analysis: which models the stacked engine can run, and their signatures and footprints.

A model can be stacked when it is a plain (possibly nested) ``nn.Sequential``
of the layer types :mod:`fedmutual.engine.stacking.layers` converts, with exact
types, no hooks, no shared parameters and every parameter trainable. Models
with equal :func:`architecture` signatures stack together; :func:`trace` walks
a model's activation layouts and shapes to check that the stacked forward can
run it and to measure its per-sample :class:`Footprint`. Anything else gives
``None``, "train it with the plain loop".
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _torch_module

IMG, VEC = "img", "vec"  # activation layouts: [B, S*C, H, W] channels_last, and [S, B, F]

# Parameterless layers that act on each element alone: applied to the stacked tensor as they are.
ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.Identity,
)
# Parameterless layers that act on each channel alone (image layout only).
POOLS: tuple[type[nn.Module], ...] = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)

Signature = tuple[Any, ...]

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _has_hooks(module: nn.Module) -> bool:
    """Whether the module has forward or backward hooks (which a stacked forward would not call)."""
    return any(len(getattr(module, n, None) or ()) for n in _HOOKS)


def _global_module_hooks() -> bool:
    """Whether hooks are registered for every module (``torch.nn.modules.module.register_module_*_hook``)."""
    return any(len(getattr(_torch_module, "_global" + n, None) or ()) for n in _HOOKS)


def flat_layers(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The leaf layers of a plain (possibly nested) ``nn.Sequential``, with their name prefixes; else None."""
    if type(model) is not nn.Sequential or _has_hooks(model) or model._parameters or model._buffers:
        return None
    out: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        if type(child) is nn.Sequential:
            inner = flat_layers(child)
            if inner is None:
                return None
            out += [(f"{name}.{n}", m) for n, m in inner]
        else:
            out.append((name, child))
    return out


def _layer_signature(m: nn.Module) -> Signature | None:
    """What must be equal for two layers to be stacked together; None if the layer cannot be stacked."""
    t = type(m)
    if _has_hooks(m):
        return None
    if type(m) is nn.Linear:
        return ("Linear", m.in_features, m.out_features, m.bias is not None)
    if type(m) is nn.Conv2d:
        return ("Conv2d", m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                m.groups, m.bias is not None, m.padding_mode)
    if type(m) is nn.BatchNorm1d or type(m) is nn.BatchNorm2d:
        if m.momentum is None:  # cumulative averaging: not supported
            return None
        return (t.__name__, m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    if t in ELEMENTWISE or t in POOLS:
        if getattr(m, "return_indices", False) or any(True for _ in m.parameters(recurse=False)):
            return None
        return (t.__name__, m.extra_repr())
    if type(m) is nn.Dropout or type(m) is nn.Dropout2d:
        return (t.__name__, m.p)
    if type(m) is nn.Flatten:
        return ("Flatten",) if (m.start_dim, m.end_dim) == (1, -1) else None
    return None


def architecture(model: nn.Module) -> Signature | None:
    """The stacking signature of a model: equal signatures stack together; None means "use the loop".

    It holds each layer's type and hyperparameters and the parameters' dtype and
    device. Only plain ``nn.Sequential`` models of the layers this module converts
    (exact types, no hooks, every parameter trainable) have one.
    """
    layers = flat_layers(model)
    if not layers or _global_module_hooks():
        return None
    params = list(model.parameters())
    if not params or any(not p.requires_grad for p in params):
        return None
    per_layer = [p for _, m in layers for p in m.parameters(recurse=False)]
    if len(per_layer) != len(params) or len({id(p) for p in per_layer}) != len(per_layer):
        return None  # a parameter shared between layers
    dtypes = {(p.dtype, p.device) for p in list(params) + list(model.buffers()) if p.is_floating_point()}
    if len(dtypes) != 1:
        return None
    sig = []
    for _, m in layers:
        s = _layer_signature(m)
        if s is None:
            return None
        sig.append(s)
    dtype, device = dtypes.pop()
    return (tuple(sig), str(dtype), str(device))


def _meta(shape: Sequence[int]) -> torch.Tensor:
    return torch.empty(*shape, device="meta")


class Footprint(NamedTuple):
    """Per sample: the largest activation (elements) and the multiply-adds of linear and conv layers."""

    activation: int
    linear_macs: int
    conv_macs: int


def trace(model: nn.Module, sample_shape: Sequence[int]) -> Footprint | None:
    """The :class:`Footprint` of ``model`` on samples of ``sample_shape``, if the stacked forward can run it.

    Walks the layers with the activation layout and shape, using meta tensors
    for the shapes of convolutions and pools. The model must end in logits
    ``[B, C]``; any mismatch gives None, "use the loop" (which then reports the
    real error, if there is one).
    """
    layers = flat_layers(model)
    if layers is None:
        return None
    shape = tuple(sample_shape)
    layout = IMG if len(shape) == 3 else VEC if len(shape) == 1 else None
    if layout is None:  # other sample shapes only through a leading Flatten
        if type(layers[0][1]) is not nn.Flatten:
            return None
        layout, shape = VEC, (int(torch.Size(shape).numel()),)
    largest = int(torch.Size(shape).numel())
    linear_macs = conv_macs = 0
    try:
        for _, m in layers:
            if type(m) is nn.Flatten:
                layout, shape = VEC, (int(torch.Size(shape).numel()),)
            elif type(m) is nn.Linear:
                if layout != VEC or shape[0] != m.in_features:
                    return None
                shape = (m.out_features,)
                linear_macs += m.in_features * m.out_features
            elif type(m) is nn.Conv2d:
                if layout != IMG or shape[0] != m.in_channels:
                    return None
                pad = m.padding if m.padding_mode == "zeros" else 0
                x = _meta((1, *shape))
                if m.padding_mode != "zeros":
                    x = F.pad(x, m._reversed_padding_repeated_twice, mode="constant")
                shape = tuple(F.conv2d(x, _meta(m.weight.shape), None, m.stride, pad, m.dilation, m.groups).shape[1:])
                conv_macs += int(torch.Size(shape).numel()) * m.weight[0].numel()
            elif type(m) in POOLS:
                if layout != IMG:
                    return None
                shape = tuple(m(_meta((1, *shape))).shape[1:])
            elif type(m) is nn.BatchNorm2d:
                if layout != IMG or shape[0] != m.num_features:
                    return None
            elif type(m) is nn.BatchNorm1d:
                if layout != VEC or shape[0] != m.num_features:
                    return None
            elif type(m) is nn.Dropout2d:
                if layout != IMG:
                    return None
            largest = max(largest, int(torch.Size(shape).numel()))
    except RuntimeError:
        return None
    return Footprint(largest, linear_macs, conv_macs) if layout == VEC else None


def has_batchnorm(model: nn.Module) -> bool:
    """Whether any layer couples the samples of a batch (BatchNorm)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())

