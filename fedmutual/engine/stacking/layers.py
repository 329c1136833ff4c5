"""Stacked layers: S identical ``nn.Sequential`` models run as one :class:`StackedModel` with ``[S, ...]`` parameters.

A group of models that share an :func:`~fedmutual.engine.stacking.analysis.architecture`
is converted layer by layer. Its parameters are the members' parameters stacked
along a new leading dimension, and its forward pass runs all S models at once:

- activations of image layers live in one tensor ``[B, S*C, H, W]`` in
  channels_last layout, the S models' channels side by side, so every
  ``Conv2d`` is one grouped convolution (``groups = S * groups``) and pooling,
  per-channel dropout and BatchNorm2d act on each model's channels separately;
- activations of vector layers live in ``[S, B, F]`` and every ``Linear`` is
  one batched matmul (``torch.baddbmm``);
- ``Flatten`` moves from the first form to the second, in each model's own
  (C, H, W) order, so the stacked linear weights are the members' weights.

Every member sees exactly the computation it would see alone; only the
floating-point summation order of the kernels differs. The conversion goes
both ways: :meth:`StackedModel.write_back` copies the trained parameters and
buffers into the original modules.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from fedmutual.engine.stacking.analysis import flat_layers


def _rows(t: torch.Tensor, m: int) -> torch.Tensor:
    """The first ``m`` models' slice of a stacked tensor (the tensor itself when all are active)."""
    return t if m == t.shape[0] else t[:m]


class _Layer(ABC):
    """One stacked layer: its stacked tensors and its forward on ``m`` active models."""

    params: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    transposed: tuple[str, ...] = ()  # parameters stored as the transpose of their member layout
    training: bool = True  # False: BatchNorm uses its running statistics, Dropout is the identity

    @abstractmethod
    def forward(self, h: torch.Tensor, m: int, mask: torch.Tensor | None) -> torch.Tensor:
        """The layer's output for the stacked activations ``h`` of ``m`` models (``mask``: valid samples)."""


def _stack(tensors: Sequence[torch.Tensor | None], grad: bool) -> torch.Tensor:
    """The members' tensors stacked along a new leading dimension, as a fresh leaf.

    Optional tensors (biases, running statistics) are stacked only where the
    first member has one; equal layer signatures mean every member has it.
    """
    present = [t for t in tensors if t is not None]
    if len(present) != len(tensors):
        raise ValueError("stacked layers differ: some members lack a bias or running statistics")
    out = torch.stack([t.detach() for t in present]).contiguous()
    return out.requires_grad_(grad)


class _Linear(_Layer):
    """Stored transposed, ``[S, in, out]``: the batched matmul's weight gradient then comes out in the
    parameter's own layout, so autograd hands it over without a strided copy."""

    transposed = ("weight",)

    def __init__(self, mods: Sequence[nn.Linear]):
        self.params = {"weight": _stack([m.weight.t() for m in mods], True)}
        if mods[0].bias is not None:
            self.params["bias"] = _stack([m.bias for m in mods], True)
        self.buffers = {}

    def forward(self, h: torch.Tensor, m: int, mask: torch.Tensor | None) -> torch.Tensor:
        w = _rows(self.params["weight"], m)
        if "bias" in self.params:
            return torch.baddbmm(_rows(self.params["bias"], m).unsqueeze(1), h, w)
        return torch.bmm(h, w)


class _Conv2d(_Layer):
    def __init__(self, mods: Sequence[nn.Conv2d]):
        self.mod = mods[0]
        self.params = {"weight": _stack([m.weight for m in mods], True)}
        if mods[0].bias is not None:
            self.params["bias"] = _stack([m.bias for m in mods], True)
        self.buffers = {}

    def forward(self, h: torch.Tensor, m: int, mask: torch.Tensor | None) -> torch.Tensor:
        c = self.mod
        w = _rows(self.params["weight"], m)
        w = w.reshape(-1, *w.shape[2:])
        b = _rows(self.params["bias"], m).reshape(-1) if "bias" in self.params else None
        padding: str | tuple[int, ...] | int = c.padding
        if c.padding_mode != "zeros":
            h, padding = F.pad(h, c._reversed_padding_repeated_twice, mode=c.padding_mode), 0
        return F.conv2d(h, w, b, c.stride, padding, c.dilation, m * c.groups)


class _BatchNorm(_Layer):
    """Per-model batch statistics: in the stacked layouts, each model's channels are channels of their own."""

    def __init__(self, mods: Sequence[nn.modules.batchnorm._BatchNorm]):
        self.mod = mods[0]
        if self.mod.momentum is None:
            raise ValueError("BatchNorm with cumulative averaging (momentum=None) cannot be stacked")
        self.momentum: float = self.mod.momentum
        self.params = {}
        if self.mod.affine:
            self.params = {"weight": _stack([m.weight for m in mods], True), "bias": _stack([m.bias for m in mods], True)}
        self.buffers = {}
        if self.mod.track_running_stats:
            self.buffers = {
                "running_mean": _stack([m.running_mean for m in mods], False),
                "running_var": _stack([m.running_var for m in mods], False),
                "num_batches_tracked": _stack([m.num_batches_tracked for m in mods], False),
            }

    def _flat(self, name: str, m: int, store: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return _rows(store[name], m).view(-1) if name in store else None

    def forward(self, h: torch.Tensor, m: int, mask: torch.Tensor | None) -> torch.Tensor:
        bn = self.mod
        batch_stats = self.training or not bn.track_running_stats
        if self.training and "num_batches_tracked" in self.buffers:
            _rows(self.buffers["num_batches_tracked"], m).add_(1)
        vec = h.dim() == 3
        if mask is not None and batch_stats:
            return self._masked(h, m, mask)
        x = h.transpose(0, 1).reshape(h.shape[1], -1) if vec else h
        y = F.batch_norm(
            x, self._flat("running_mean", m, self.buffers), self._flat("running_var", m, self.buffers),
            self._flat("weight", m, self.params), self._flat("bias", m, self.params), batch_stats, self.momentum, bn.eps,
        )
        return y.view(h.shape[1], m, -1).transpose(0, 1) if vec else y

    def _masked(self, h: torch.Tensor, m: int, mask: torch.Tensor) -> torch.Tensor:
        """Batch norm whose statistics use each model's valid samples only (ragged batches)."""
        bn = self.mod
        if h.dim() == 3:  # [m, B, F] -> [B, m, F, 1]
            x = h.permute(1, 0, 2).unsqueeze(-1)
        else:  # [B, m*C, H, W] channels_last -> [B, m, C, H*W] (a view)
            x = h.view(h.shape[0], m, -1, h.shape[2] * h.shape[3])
        w = mask.t().to(h.dtype)[:, :, None, None]  # [B, m, 1, 1]
        count = w.sum(0) * x.shape[-1]  # [m, 1, 1]
        mean = (x * w).sum((0, 3), keepdim=True) / count
        centered = x - mean
        var = (centered.square() * w).sum((0, 3), keepdim=True) / count
        y = centered * torch.rsqrt(var + bn.eps)
        if "weight" in self.params:
            y = y * _rows(self.params["weight"], m)[None, :, :, None] + _rows(self.params["bias"], m)[None, :, :, None]
        if "running_mean" in self.buffers:
            with torch.no_grad():
                unbiased = var * (count / (count - 1).clamp_min(1))
                rm, rv = _rows(self.buffers["running_mean"], m), _rows(self.buffers["running_var"], m)
                momentum = self.momentum
                rm.mul_(1 - momentum).add_(mean.view(m, -1), alpha=momentum)
                rv.mul_(1 - momentum).add_(unbiased.view(m, -1), alpha=momentum)
        if h.dim() == 3:
            return y.squeeze(-1).permute(1, 0, 2)
        return y.view(h.shape)


class _Flatten(_Layer):
    def __init__(self) -> None:
        self.params, self.buffers = {}, {}

    def forward(self, h: torch.Tensor, m: int, mask: torch.Tensor | None) -> torch.Tensor:
        if h.dim() == 3:
            return h
        b, sc, hh, ww = h.shape
        return h.view(b, m, sc // m, hh, ww).permute(1, 0, 2, 3, 4).reshape(m, b, -1)


class _Dropout(_Layer):
    """Dropout draws an independent mask per element, hence per model: each client gets its own masks."""

    def __init__(self, mod: nn.Dropout | nn.Dropout2d):
        self.p, self.channels = mod.p, type(mod) is nn.Dropout2d
        self.params, self.buffers = {}, {}

    def forward(self, h: torch.Tensor, m: int, mask: torch.Tensor | None) -> torch.Tensor:
        if not self.training:
            return h
        return F.dropout2d(h, self.p, True) if self.channels else F.dropout(h, self.p, True)


class _Apply(_Layer):
    """An elementwise or per-channel layer without state, applied to the stacked tensor as it is."""

    def __init__(self, mod: nn.Module):
        self.mod = mod
        self.params, self.buffers = {}, {}

    def forward(self, h: torch.Tensor, m: int, mask: torch.Tensor | None) -> torch.Tensor:
        out: torch.Tensor = self.mod(h)
        return out


_M = TypeVar("_M", bound=nn.Module)


def _all(kind: type[_M], mods: Sequence[nn.Module]) -> list[_M]:
    """``mods`` as layers of exactly the type ``kind``; one layer position of models of one architecture."""
    out = [m for m in mods if isinstance(m, kind) and type(m) is kind]
    if len(out) != len(mods):
        raise ValueError(f"stacked layers differ: expected {len(mods)} layers of type {kind.__name__}")
    return out


def _convert(mods: Sequence[nn.Module]) -> _Layer:
    """The stacked form of one layer position of the members (``mods``: that layer of each member)."""
    first = mods[0]
    if type(first) is nn.Linear:
        return _Linear(_all(nn.Linear, mods))
    if type(first) is nn.Conv2d:
        return _Conv2d(_all(nn.Conv2d, mods))
    if type(first) is nn.BatchNorm1d or type(first) is nn.BatchNorm2d:
        return _BatchNorm(_all(type(first), mods))
    if type(first) is nn.Flatten:
        return _Flatten()
    if type(first) is nn.Dropout or type(first) is nn.Dropout2d:
        return _Dropout(first)
    return _Apply(first)


def _plain_pool(mod: nn.Module) -> bool:
    """A max pooling over disjoint windows: kernel = stride, no padding, dilation or ceil mode."""
    if type(mod) is not nn.MaxPool2d or mod.return_indices or mod.ceil_mode:
        return False
    stride = mod.stride if mod.stride is not None else mod.kernel_size
    return bool(mod.kernel_size == stride and mod.padding in (0, (0, 0)) and mod.dilation in (1, (1, 1)))


def _pool_before_relu(layers: Sequence[tuple[str, _Layer]]) -> list[int]:
    """The order the layers run in: each ReLU -> MaxPool2d pair runs as MaxPool2d -> ReLU.

    ReLU is monotonic, so the maximum of a window of ReLU outputs is the ReLU of the window's maximum: the
    outputs are equal bit for bit, and so are the gradients (both reach the window's first maximum, or
    nothing when the maximum is not positive). The ReLU then touches a quarter of the elements (2x2 pools),
    and the pooling reads the convolution's output directly.
    """
    order = list(range(len(layers)))
    i = 0
    while i + 1 < len(layers):
        a, b = layers[i][1], layers[i + 1][1]
        if (isinstance(a, _Apply) and type(a.mod) is nn.ReLU and isinstance(b, _Apply) and _plain_pool(b.mod)):
            order[i], order[i + 1] = i + 1, i
            i += 2
        else:
            i += 1
    return order


class StackedModel:
    """S models of one :func:`architecture` as one model; parameters are leaf tensors ``[S, *shape]``.

    ``forward(x, m)`` runs the first ``m`` models (the active ones) on
    ``x[:m // repeat]`` of shape ``[m // repeat, B, *sample]``; each input row is
    shared by ``repeat`` consecutive models (the members of one client).
    """

    def __init__(self, models: Sequence[nn.Module]):
        self.models = list(models)
        self.size = len(models)
        per_model = [flat_layers(m) for m in models]
        if any(p is None for p in per_model):
            raise ValueError("only plain nn.Sequential models can be stacked")
        self.layers: list[tuple[str, _Layer]] = []
        # each model's own name for each layer: models of one architecture may name their layers differently
        # (a flat model and encoder + head), so buffers are written back by every model's own names
        self._module_names = [[name for name, _ in layers] for layers in per_model if layers is not None]
        for group in zip(*per_model):
            self.layers.append((group[0][0], _convert([mod for _, mod in group])))
        self._order = _pool_before_relu(self.layers)
        self.skip_input_flatten = type(self.layers[0][1]) is _Flatten
        names = [n for n, _ in models[0].named_parameters()]
        by_name = {f"{prefix}.{k}": v for prefix, layer in self.layers for k, v in layer.params.items()}
        if sorted(names) != sorted(by_name):
            raise ValueError("parameters of the model do not match its layers")
        self.params = [by_name[n] for n in names]  # in model.parameters() order
        self.member_params = [list(m.parameters()) for m in self.models]
        flipped = {f"{prefix}.{k}" for prefix, layer in self.layers for k in layer.transposed}
        self._transposed = [n in flipped for n in names]

    def train(self, mode: bool = True) -> "StackedModel":
        """Training (batch statistics, dropout) or evaluation behaviour, like ``nn.Module.train``."""
        for _, layer in self.layers:
            layer.training = mode
        return self

    def pack(self, i: int, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Stack the members' versions of parameter ``i`` (or of a tensor shaped like it) in its stacked layout."""
        return _stack([t.t() if self._transposed[i] else t for t in tensors], False)

    def parameters(self) -> list[torch.Tensor]:
        """The stacked parameters, in the members' ``parameters()`` order."""
        return self.params

    def _input(self, x: torch.Tensor, repeat: int) -> torch.Tensor:
        """[k, B, *sample] -> the stacked layout of k*repeat models."""
        k, b = x.shape[:2]
        if x.dim() == 5 and not self.skip_input_flatten:  # images -> [B, S*C, H, W], channels_last
            c, hh, ww = x.shape[2:]
            h = x.permute(1, 3, 4, 0, 2).unsqueeze(4).expand(b, hh, ww, k, repeat, c)
            h = h.reshape(b, hh, ww, k * repeat * c).permute(0, 3, 1, 2)
            return h.contiguous(memory_format=torch.channels_last)  # reshape keeps a view when C = repeat = 1
        h = x.reshape(k, b, -1)
        if repeat > 1:
            h = h.unsqueeze(1).expand(k, repeat, b, h.shape[-1]).reshape(k * repeat, b, -1)
        return h

    def forward(self, x: torch.Tensor, repeat: int = 1, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[m, B, C]`` of the first ``m = len(x) * repeat`` models; ``mask`` ``[len(x), B]`` marks valid samples."""
        m = x.shape[0] * repeat
        if mask is not None and repeat > 1:
            mask = mask.repeat_interleave(repeat, 0)
        h = self._input(x, repeat)
        for i in self._order:
            h = self.layers[i][1].forward(h, m, mask)
        return h

    def prox(self, refs: Sequence[torch.Tensor], mu: torch.Tensor | float, m: int) -> torch.Tensor:
        """FedProx's (mu/2)·||w - w_ref||² of each of the first ``m`` models, ``[m]``."""
        sq = sum(((_rows(p, m) - _rows(r, m)) ** 2).reshape(m, -1).sum(1) for p, r in zip(self.params, refs))
        return 0.5 * mu * torch.as_tensor(sq)  # as_tensor returns a tensor as it is; 0 (no parameters) as tensor(0)

    def unpack_all(self, i: int, stacked: torch.Tensor) -> list[torch.Tensor]:
        """Every member's row of a stacked tensor shaped like parameter ``i``, in the members' layout (views)."""
        return list((stacked.transpose(1, 2) if self._transposed[i] else stacked).unbind(0))

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy the stacked parameters and buffers into the original per-model modules."""
        for i, stacked in enumerate(self.params):
            torch._foreach_copy_([params[i] for params in self.member_params], self.unpack_all(i, stacked))
        for li, (_, layer) in enumerate(self.layers):
            for name, buf in layer.buffers.items():
                targets = [getattr(m.get_submodule(names[li]), name) for m, names in zip(self.models, self._module_names)]
                torch._foreach_copy_(targets, list(buf.unbind(0)))

