"""Stacked models: S identical ``nn.Sequential`` models run as one model with ``[S, ...]`` parameters.

A group of models that share an architecture is converted into a
:class:`StackedModel`. Its parameters are the members' parameters stacked
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
buffers into the original modules. :class:`StackedSGD` and
:class:`StackedAdam` read the members' ``torch.optim`` state, step the stacked
tensors with torch's update rules, and write the state back.

Anything that cannot be expressed this way (other layer types, subclasses,
hooks, shared parameters, unsupported optimizer options) is reported as not
stackable (``None``), and the engine trains it with the plain loop.
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

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


def _rows(t: torch.Tensor, m: int) -> torch.Tensor:
    """The first ``m`` models' slice of a stacked tensor (the tensor itself when all are active)."""
    return t if m == t.shape[0] else t[:m]


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _has_hooks(module: nn.Module) -> bool:
    """Whether the module has forward or backward hooks (which a stacked forward would not call)."""
    return any(len(getattr(module, n, None) or ()) for n in _HOOKS)


def _global_module_hooks() -> bool:
    from torch.nn.modules import module as _m

    return any(len(getattr(_m, "_global" + n, None) or ()) for n in _HOOKS)


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
    if t is nn.Linear:
        return ("Linear", m.in_features, m.out_features, m.bias is not None)
    if t is nn.Conv2d:
        return ("Conv2d", m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                m.groups, m.bias is not None, m.padding_mode)
    if t in (nn.BatchNorm1d, nn.BatchNorm2d):
        if m.momentum is None:  # cumulative averaging: not supported
            return None
        return (t.__name__, m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    if t in ELEMENTWISE or t in POOLS:
        if getattr(m, "return_indices", False) or any(True for _ in m.parameters(recurse=False)):
            return None
        return (t.__name__, m.extra_repr())
    if t in (nn.Dropout, nn.Dropout2d):
        return (t.__name__, m.p)
    if t is nn.Flatten:
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
            t = type(m)
            if t is nn.Flatten:
                layout, shape = VEC, (int(torch.Size(shape).numel()),)
            elif t is nn.Linear:
                if layout != VEC or shape[0] != m.in_features:
                    return None
                shape = (m.out_features,)
                linear_macs += m.in_features * m.out_features
            elif t is nn.Conv2d:
                if layout != IMG or shape[0] != m.in_channels:
                    return None
                pad = m.padding if m.padding_mode == "zeros" else 0
                x = _meta((1, *shape))
                if m.padding_mode != "zeros":
                    x = F.pad(x, m._reversed_padding_repeated_twice, mode="constant")
                shape = tuple(F.conv2d(x, _meta(m.weight.shape), None, m.stride, pad, m.dilation, m.groups).shape[1:])
                conv_macs += int(torch.Size(shape).numel()) * m.weight[0].numel()
            elif t in POOLS:
                if layout != IMG:
                    return None
                shape = tuple(m(_meta((1, *shape))).shape[1:])
            elif t is nn.BatchNorm2d:
                if layout != IMG or shape[0] != m.num_features:
                    return None
            elif t is nn.BatchNorm1d:
                if layout != VEC or shape[0] != m.num_features:
                    return None
            elif t is nn.Dropout2d:
                if layout != IMG:
                    return None
            largest = max(largest, int(torch.Size(shape).numel()))
    except RuntimeError:
        return None
    return Footprint(largest, linear_macs, conv_macs) if layout == VEC else None


def has_batchnorm(model: nn.Module) -> bool:
    """Whether any layer couples the samples of a batch (BatchNorm)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


# ---------------------------------------------------------------------------------------------
# Stacked layers


class _Layer(ABC):
    """One stacked layer: its stacked tensors and its forward on ``m`` active models."""

    params: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    transposed: tuple[str, ...] = ()  # parameters stored as the transpose of their member layout
    training: bool = True  # False: BatchNorm uses its running statistics, Dropout is the identity

    @abstractmethod
    def forward(self, h: torch.Tensor, m: int, mask: torch.Tensor | None) -> torch.Tensor:
        """The layer's output for the stacked activations ``h`` of ``m`` models (``mask``: valid samples)."""


def _stack(tensors: Sequence[torch.Tensor], grad: bool) -> torch.Tensor:
    out = torch.stack([t.detach() for t in tensors]).contiguous()
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
        padding = c.padding
        if c.padding_mode != "zeros":
            h, padding = F.pad(h, c._reversed_padding_repeated_twice, mode=c.padding_mode), 0
        return F.conv2d(h, w, b, c.stride, padding, c.dilation, m * c.groups)


class _BatchNorm(_Layer):
    """Per-model batch statistics: in the stacked layouts, each model's channels are channels of their own."""

    def __init__(self, mods: Sequence[nn.modules.batchnorm._BatchNorm]):
        self.mod = mods[0]
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
            self._flat("weight", m, self.params), self._flat("bias", m, self.params), batch_stats, bn.momentum, bn.eps,
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
                rm.mul_(1 - bn.momentum).add_(mean.view(m, -1), alpha=bn.momentum)
                rv.mul_(1 - bn.momentum).add_(unbiased.view(m, -1), alpha=bn.momentum)
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

    def __init__(self, mod: nn.Module):
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
        return self.mod(h)


def _convert(mods: Sequence[nn.Module]) -> _Layer:
    t = type(mods[0])
    if t is nn.Linear:
        return _Linear(mods)  # type: ignore[arg-type]
    if t is nn.Conv2d:
        return _Conv2d(mods)  # type: ignore[arg-type]
    if t in (nn.BatchNorm1d, nn.BatchNorm2d):
        return _BatchNorm(mods)  # type: ignore[arg-type]
    if t is nn.Flatten:
        return _Flatten()
    if t in (nn.Dropout, nn.Dropout2d):
        return _Dropout(mods[0])
    return _Apply(mods[0])


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
        for group in zip(*per_model):  # type: ignore[misc]
            self.layers.append((group[0][0], _convert([mod for _, mod in group])))
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
        for _, layer in self.layers:
            h = layer.forward(h, m, mask)
        return h

    def prox(self, refs: Sequence[torch.Tensor], mu: torch.Tensor | float, m: int) -> torch.Tensor:
        """FedProx's (mu/2)·||w - w_ref||² of each of the first ``m`` models, ``[m]``."""
        sq = sum(((_rows(p, m) - _rows(r, m)) ** 2).reshape(m, -1).sum(1) for p, r in zip(self.params, refs))
        return 0.5 * mu * sq  # type: ignore[return-value]

    def unpack_all(self, i: int, stacked: torch.Tensor) -> list[torch.Tensor]:
        """Every member's row of a stacked tensor shaped like parameter ``i``, in the members' layout (views)."""
        return list((stacked.transpose(1, 2) if self._transposed[i] else stacked).unbind(0))

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy the stacked parameters and buffers into the original per-model modules."""
        for i, stacked in enumerate(self.params):
            torch._foreach_copy_([params[i] for params in self.member_params], self.unpack_all(i, stacked))
        for prefix, layer in self.layers:
            for name, buf in layer.buffers.items():
                torch._foreach_copy_([getattr(m.get_submodule(prefix), name) for m in self.models], list(buf.unbind(0)))


# ---------------------------------------------------------------------------------------------
# Stacked optimizers


@dataclass(frozen=True)
class OptimSpec:
    """A member's optimizer as the stacked engine runs it: its kind and hyperparameters."""

    kind: str  # "sgd" | "adam"
    lr: float
    weight_decay: float
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    decoupled: bool = False


def _plain_float(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def optimizer_spec(opt: torch.optim.Optimizer, model: nn.Module) -> OptimSpec | None:
    """The :class:`OptimSpec` of ``opt`` if the stacked engine reproduces it exactly; None otherwise.

    Supported: ``torch.optim.SGD`` (momentum, weight decay; no nesterov, no
    dampening) and ``Adam``/``AdamW`` (no amsgrad), not maximizing, not
    differentiable, not capturable, float hyperparameters equal in every param
    group, no step hooks, and covering exactly the model's parameters.
    """
    groups = opt.param_groups
    params = [p for g in groups for p in g["params"]]
    model_params = list(model.parameters())
    if len(params) != len(model_params) or {id(p) for p in params} != {id(p) for p in model_params}:
        return None
    if getattr(opt, "_optimizer_step_pre_hooks", None) or getattr(opt, "_optimizer_step_post_hooks", None):
        return None
    from torch.optim import optimizer as _o

    if getattr(_o, "_global_optimizer_pre_hooks", None) or getattr(_o, "_global_optimizer_post_hooks", None):
        return None

    def same(key: str) -> Any:
        values = [g.get(key) for g in groups]
        return values[0] if all(v == values[0] for v in values) else _DIFF

    common = {k: same(k) for k in groups[0] if k != "params"}
    if any(v is _DIFF for v in common.values()):
        return None
    if common.get("maximize") or common.get("differentiable") or common.get("fused") or common.get("capturable"):
        return None
    lr, wd = common.get("lr"), common.get("weight_decay", 0.0)
    if not (_plain_float(lr) and _plain_float(wd)):
        return None
    if type(opt) is torch.optim.SGD:
        momentum = common.get("momentum", 0.0)
        if common.get("nesterov") or common.get("dampening", 0) != 0 or not _plain_float(momentum):
            return None
        return OptimSpec("sgd", float(lr), float(wd), momentum=float(momentum))
    if type(opt) in (torch.optim.Adam, torch.optim.AdamW):
        betas, eps = common.get("betas"), common.get("eps")
        if common.get("amsgrad") or not (isinstance(betas, tuple) and all(_plain_float(b) for b in betas) and _plain_float(eps)):
            return None
        decoupled = bool(common.get("decoupled_weight_decay", type(opt) is torch.optim.AdamW))
        return OptimSpec("adam", float(lr), float(wd), betas=(float(betas[0]), float(betas[1])), eps=float(eps), decoupled=decoupled)
    return None


_DIFF = object()


class StackedOptimizer(ABC):
    """The members' optimizers as one update on the stacked parameters; state read from and written back to them."""

    def __init__(self, spec: OptimSpec, stack: StackedModel, optimizers: Sequence[torch.optim.Optimizer]):
        self.spec, self.stack, self.optimizers = spec, stack, list(optimizers)
        self.params = stack.parameters()
        self.steps = [0] * stack.size  # steps taken here, per model

    def _state(self, key: str, j: int, i: int) -> torch.Tensor | None:
        return self.optimizers[j].state.get(self.stack.member_params[j][i], {}).get(key)

    def _gather(self, key: str) -> list[torch.Tensor]:
        """Stack one state buffer of every parameter; absent state starts at zero."""
        out = []
        for i, p in enumerate(self.params):
            found = [self._state(key, j, i) for j in range(self.stack.size)]
            if all(t is None for t in found):  # fresh optimizers: no copies
                out.append(torch.zeros_like(p, requires_grad=False))
                continue
            rows = [t.detach() if t is not None else torch.zeros_like(self.stack.member_params[j][i])
                    for j, t in enumerate(found)]
            out.append(self.stack.pack(i, rows))
        return out

    @torch.no_grad()
    def _write(self, key: str, stacked: Sequence[torch.Tensor], keep: Sequence[bool]) -> None:
        """Store row j of each stacked state tensor as model j's optimizer state (in place where it exists)."""
        for i, rows in enumerate(stacked):
            dst, src = [], []
            for j, row in enumerate(self.stack.unpack_all(i, rows)):
                if not keep[j]:
                    continue
                state = self.optimizers[j].state[self.stack.member_params[j][i]]
                old = state.get(key)
                if old is not None and old.shape == row.shape:
                    dst.append(old)
                    src.append(row)
                else:
                    state[key] = row.clone(memory_format=torch.contiguous_format)
            if dst:
                torch._foreach_copy_(dst, src)

    def begin(self, m: int) -> None:
        """Start a step of the first ``m`` models; :meth:`update` then applies it parameter by parameter."""
        self.active = m
        for j in range(m):
            self.steps[j] += 1

    @torch.no_grad()
    def update(self, i: int) -> None:
        """Update parameter ``i`` of the active models from its gradient, and free the gradient.

        Torch's optimizers skip a parameter without gradient, and so does this.
        """
        p = self.params[i]
        if p.grad is not None:
            self._update(i, _rows(p, self.active), _rows(p.grad, self.active))
            p.grad = None

    @abstractmethod
    def _update(self, i: int, w: torch.Tensor, g: torch.Tensor) -> None:
        """Apply the optimizer's update to the active rows ``w`` of parameter ``i`` with gradient ``g``."""

    def step(self, m: int) -> None:
        """One optimizer step of the first ``m`` models (after a backward pass without :meth:`update_in_backward`)."""
        self.begin(m)
        for i in range(len(self.params)):
            self.update(i)

    def update_in_backward(self) -> None:
        """Update each parameter as soon as backward has accumulated its gradient (call :meth:`begin` first).

        The gradient is still in cache then, and is freed at once. This is exact:
        a parameter's gradient is accumulated only after every backward node that
        uses the parameter has run, and autograd's version counters would refuse
        an in-place update that came too early.
        """
        me = weakref.ref(self)  # no cycle param -> hook -> optimizer -> param: chunks are freed at once
        self._hooks = [
            p.register_post_accumulate_grad_hook(lambda _p, i=i: me().update(i))  # type: ignore[union-attr]
            for i, p in enumerate(self.params)
        ]

    @abstractmethod
    def write_back(self) -> None:
        """Write the stacked optimizer state back into each member's own ``torch.optim`` optimizer."""


_FUSED_SGD = hasattr(torch, "_fused_sgd_")


class StackedSGD(StackedOptimizer):
    """torch.optim.SGD on stacked tensors: d_p = g + wd·p; buf = momentum·buf + d_p; p -= lr·buf.

    Missing momentum buffers start at zero, which makes the first update
    buf = d_p exactly, as torch does.
    """

    def __init__(self, spec: OptimSpec, stack: StackedModel, optimizers: Sequence[torch.optim.Optimizer]):
        super().__init__(spec, stack, optimizers)
        self.bufs = self._gather("momentum_buffer") if spec.momentum != 0 else []
        self.had_buf = [any(self._state("momentum_buffer", j, i) is not None for i in range(len(self.params)))
                        for j in range(stack.size)]

    def _update(self, i: int, w: torch.Tensor, g: torch.Tensor) -> None:
        s = self.spec
        bufs = [_rows(self.bufs[i], self.active)] if s.momentum != 0 else []
        if _FUSED_SGD:
            # One pass over the tensors; the same arithmetic as below (bit-identical on CPU).
            torch._fused_sgd_([w], [g], bufs, weight_decay=s.weight_decay, momentum=s.momentum, lr=s.lr,
                              dampening=0.0, nesterov=False, maximize=False, is_first_step=False)
            return
        if s.weight_decay != 0:
            g = g.add(w, alpha=s.weight_decay)
        if s.momentum != 0:
            g = bufs[0].mul_(s.momentum).add_(g)
        w.add_(g, alpha=-s.lr)

    def write_back(self) -> None:
        if self.spec.momentum != 0:
            self._write("momentum_buffer", self.bufs, [h or n > 0 for h, n in zip(self.had_buf, self.steps)])


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class StackedAdam(StackedOptimizer):
    """torch.optim.Adam (and AdamW) on stacked tensors, with per-model step counts and bias corrections."""

    def __init__(self, spec: OptimSpec, stack: StackedModel, optimizers: Sequence[torch.optim.Optimizer]):
        super().__init__(spec, stack, optimizers)
        self.exp_avg = self._gather("exp_avg")
        self.exp_avg_sq = self._gather("exp_avg_sq")
        self.count: list[float] = []
        self.had_state = []
        for j in range(stack.size):
            step = self._state("step", j, 0)
            self.count.append(float(step) if step is not None else 0.0)
            self.had_state.append(step is not None)

    def _per_model(self, values: list[float], m: int, like: torch.Tensor) -> torch.Tensor | float:
        """A Python float when the active models agree (torch's exact arithmetic), else a broadcastable [m, 1, ...] tensor."""
        if all(v == values[0] for v in values[:m]):
            return values[0]
        return torch.tensor(values[:m], dtype=like.dtype, device=like.device).view(m, *([1] * (like.dim() - 1)))

    def begin(self, m: int) -> None:
        super().begin(m)
        s = self.spec
        beta1, beta2 = s.betas
        for j in range(m):
            self.count[j] += 1
        self.neg_step_size = [-s.lr / (1 - beta1**c) for c in self.count]
        self.bc2_sqrt = [(1 - beta2**c) ** 0.5 for c in self.count]

    def _update(self, i: int, w: torch.Tensor, g: torch.Tensor) -> None:
        s, m = self.spec, self.active
        beta1, beta2 = s.betas
        if s.weight_decay != 0:
            if s.decoupled:
                w.mul_(1 - s.lr * s.weight_decay)
            else:
                g = g.add(w, alpha=s.weight_decay)
        avg, avg_sq = _rows(self.exp_avg[i], m), _rows(self.exp_avg_sq[i], m)
        avg.lerp_(g, 1 - beta1)
        avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        neg_size = self._per_model(self.neg_step_size, m, w)
        denom = (avg_sq.sqrt() / self._per_model(self.bc2_sqrt, m, w)).add_(s.eps)
        if isinstance(neg_size, float):
            w.addcdiv_(avg, denom, value=neg_size)
        else:  # addcdiv's own order of operations: w + (value * avg) / denom
            w.add_(avg.mul(neg_size).div_(denom))

    def write_back(self) -> None:
        keep = [h or n > 0 for h, n in zip(self.had_state, self.steps)]
        self._write("exp_avg", self.exp_avg, keep)
        self._write("exp_avg_sq", self.exp_avg_sq, keep)
        for j, opt in enumerate(self.optimizers):
            if keep[j]:
                for p in self.stack.member_params[j]:
                    old = opt.state[p].get("step")
                    if isinstance(old, torch.Tensor):
                        old.fill_(self.count[j])
                    else:
                        opt.state[p]["step"] = torch.tensor(self.count[j], dtype=_scalar_dtype())


def stacked_optimizer(spec: OptimSpec, stack: StackedModel, optimizers: Sequence[torch.optim.Optimizer]) -> StackedOptimizer:
    """The stacked form of the members' optimizers described by ``spec``."""
    cls = StackedSGD if spec.kind == "sgd" else StackedAdam
    return cls(spec, stack, optimizers)
