"""Stacked optimizers: the members' ``torch.optim`` optimizers as one update on a :class:`StackedModel`.

:func:`optimizer_spec` says whether the stacked engine reproduces a member's
optimizer exactly (and with which :class:`OptimSpec`). :class:`StackedSGD` and
:class:`StackedAdam` read the members' ``torch.optim`` state, step the stacked
tensors with torch's update rules, and write the state back.
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.optim import optimizer as _torch_optimizer

from fedmutual.engine.stacking.layers import StackedModel, _rows


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


def _as_float(v: Any) -> float | None:
    """``v`` as a float if it is a plain Python number (not a bool, not a tensor); else None."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


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
    if getattr(_torch_optimizer, "_global_optimizer_pre_hooks", None) or getattr(
        _torch_optimizer, "_global_optimizer_post_hooks", None
    ):
        return None

    def same(key: str) -> Any:
        values = [g.get(key) for g in groups]
        return values[0] if all(v == values[0] for v in values) else _DIFF

    common = {k: same(k) for k in groups[0] if k != "params"}
    if any(v is _DIFF for v in common.values()):
        return None
    if common.get("maximize") or common.get("differentiable") or common.get("fused") or common.get("capturable"):
        return None
    lr, wd = _as_float(common.get("lr")), _as_float(common.get("weight_decay", 0.0))
    if lr is None or wd is None:
        return None
    if type(opt) is torch.optim.SGD:
        momentum = _as_float(common.get("momentum", 0.0))
        if common.get("nesterov") or common.get("dampening", 0) != 0 or momentum is None:
            return None
        return OptimSpec("sgd", lr, wd, momentum=momentum)
    if type(opt) in (torch.optim.Adam, torch.optim.AdamW):
        betas, eps = common.get("betas"), _as_float(common.get("eps"))
        beta1 = beta2 = None
        if isinstance(betas, tuple) and len(betas) == 2:
            beta1, beta2 = _as_float(betas[0]), _as_float(betas[1])
        if common.get("amsgrad") or beta1 is None or beta2 is None or eps is None:
            return None
        decoupled = bool(common.get("decoupled_weight_decay", type(opt) is torch.optim.AdamW))
        return OptimSpec("adam", lr, wd, betas=(beta1, beta2), eps=eps, decoupled=decoupled)
    return None


_DIFF = object()


class StackedOptimizer(ABC):
    """The members' optimizers as one update on the stacked parameters; state read from and written back to them."""

    def __init__(self, spec: OptimSpec, stack: StackedModel, optimizers: Sequence[torch.optim.Optimizer]):
        self.spec, self.stack, self.optimizers = spec, stack, list(optimizers)
        self.params = stack.parameters()
        self.steps = [0] * stack.size  # steps taken here, per model

    def _state(self, key: str, j: int, i: int) -> torch.Tensor | None:
        """Member ``j``'s optimizer state ``key`` of parameter ``i``; None where it has none yet.

        torch keeps this state in tensors (``as_tensor`` returns a tensor as it is);
        a plain number (an old-style Adam ``step``) becomes a 0-dim tensor.
        """
        value = self.optimizers[j].state.get(self.stack.member_params[j][i], {}).get(key)
        return None if value is None else torch.as_tensor(value)

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
        self._hooks = [p.register_post_accumulate_grad_hook(_update_hook(me, i)) for i, p in enumerate(self.params)]

    @abstractmethod
    def write_back(self) -> None:
        """Write the stacked optimizer state back into each member's own ``torch.optim`` optimizer."""


def _update_hook(ref: weakref.ref[StackedOptimizer], i: int) -> Callable[[torch.Tensor], None]:
    """A post-accumulate-grad hook that updates parameter ``i`` of the optimizer ``ref`` points to, while it exists."""

    def hook(_param: torch.Tensor) -> None:
        opt = ref()
        if opt is not None:
            opt.update(i)

    return hook


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
