"""A party's state: a bag of models, optimizers, tensors and JSON values, serializable without pickle.

Every party (the server, each client) keeps its own :class:`State`. A runtime can turn it into
``(tensors, tree)`` with :func:`dump` and back with :func:`load`, so the state of a node can live on
its disk between calls (a Flower SuperNode, a peer) or in a checkpoint. The tensors go to
safetensors; the tree is JSON: which tensor belongs where, optimizer hyper-parameters, plain values.
Models created during the run are rebuilt from the seed stream they were made with
(``fedmutual_init``, set by :meth:`fedmutual.protocol.RunSpec.new_model`).
"""

from __future__ import annotations

import json
from typing import Any, Callable

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from fedmutual.errors import FedmutualError


class StateError(FedmutualError):
    """A state that cannot be captured or restored; the message says which part and why."""


class State:
    """One party's state: attributes holding modules, optimizers, tensors, lists and dicts of them, and JSON values.

    ``State(model=m, opt=o)``; handlers read and write ``me.model``. Attributes that are not set read as a
    plain AttributeError, so a typo fails loudly.
    """

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)

    def __getattr__(self, name: str) -> Any:  # only called for missing attributes; typed Any for handlers
        raise AttributeError(f"this party's state has no {name!r} (it holds: {', '.join(self.__dict__) or 'nothing'})")

    def __setattr__(self, name: str, value: Any) -> None:  # any attribute may be set: a party's state is open
        super().__setattr__(name, value)

    def get(self, name: str, default: Any = None) -> Any:
        return self.__dict__.get(name, default)

    def __contains__(self, name: str) -> bool:
        return name in self.__dict__

    def __repr__(self) -> str:
        return f"State({', '.join(self.__dict__)})"


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """A model's state as a plain dict of detached tensors (what goes into a message)."""
    return {k: v.detach() for k, v in model.state_dict().items()}


def dump(state: State, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``state`` as (tensors, JSON tree); tensor keys start with ``prefix``."""
    tensors: dict[str, torch.Tensor] = {}
    tree = {name: capture(value, f"{prefix}{name}", tensors) for name, value in vars(state).items()}
    return tensors, tree


def load(state: State, tensors: dict[str, torch.Tensor], tree: dict[str, Any], new_model: Callable[..., nn.Module],
         prefix: str = "") -> None:
    """Restore what :func:`dump` captured onto ``state``, a state freshly built for the same party."""
    for name, node in tree.items():
        setattr(state, name, restore(state.get(name), node, tensors, f"{prefix}{name}", new_model))


def capture(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The JSON node for ``value``; its tensors go into ``tensors`` under keys starting with ``path``."""
    if isinstance(value, nn.Module):
        keys = []
        for k, v in value.state_dict().items():
            tensors[f"{path}/{k}"] = _plain(v)
            keys.append(k)
        return {"type": "module", "keys": keys, "init": getattr(value, "fedmutual_init", None)}
    if isinstance(value, torch.optim.Optimizer):
        sd = value.state_dict()
        state: dict[str, dict[str, Any]] = {}
        for idx, entries in sd["state"].items():
            state[str(idx)] = {}
            for name, v in entries.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"{path}/state/{idx}/{name}"] = _plain(v)
                    state[str(idx)][name] = {"tensor": f"{path}/state/{idx}/{name}"}
                else:
                    state[str(idx)][name] = {"value": _json_value(v, f"{path}.state.{idx}.{name}")}
        return {"type": "optimizer", "kind": type(value).__name__, "param_groups": sd["param_groups"], "state": state}
    if isinstance(value, torch.Tensor):
        tensors[path] = _plain(value)
        return {"type": "tensor", "key": path}
    if isinstance(value, np.ndarray):
        tensors[path] = torch.from_numpy(np.ascontiguousarray(value)).clone()
        return {"type": "ndarray", "key": path}
    if isinstance(value, (list, tuple)):
        return {"type": type(value).__name__, "items": [capture(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, (str, int)) or isinstance(k, bool)]
        if bad:
            raise StateError(f"cannot capture {path}: dict keys must be str or int, found {bad[0]!r}")
        return {"type": "dict", "items": [[k, capture(v, f"{path}/{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, BaseModel):
        return {"type": "config"}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"type": "value", "value": value}
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return {"type": "value", "value": value.item()}
    raise StateError(
        f"cannot capture {path} of type {type(value).__name__}: keep a party's state in modules, optimizers, tensors, "
        "lists, dicts or JSON values"
    )


def restore(current: Any, node: dict[str, Any], tensors: dict[str, torch.Tensor], path: str,
            new_model: Callable[..., nn.Module]) -> Any:
    """``current`` updated in place from ``node`` where it can be (so other references stay valid), else a new value."""
    kind = node["type"]
    if kind == "module":
        target = current
        if not isinstance(target, nn.Module):
            if node["init"] is None:
                raise StateError(f"saved state has a model at {path} that the party did not create at start, "
                                      "and it was not made with RunSpec.new_model, so it cannot be rebuilt")
            init = node["init"]
            target = new_model(*init["stream"], name=init["name"], outputs=init["outputs"])
        target.load_state_dict({k: tensors[f"{path}/{k}"] for k in node["keys"]})
        return target
    if kind == "optimizer":
        if not isinstance(current, torch.optim.Optimizer):
            raise StateError(f"saved state has an optimizer at {path}, but the party has {type(current).__name__} there")
        state = {int(idx): {name: (tensors[e["tensor"]] if "tensor" in e else e["value"]) for name, e in entries.items()}
                 for idx, entries in node["state"].items()}
        # JSON has no tuples: give back the tuple-valued hyper-parameters (Adam's betas) their type
        groups = [{k: (tuple(v) if isinstance(v, list) and isinstance(now.get(k), tuple) else v) for k, v in g.items()}
                  for g, now in zip(node["param_groups"], current.param_groups)]
        current.load_state_dict({"state": state, "param_groups": groups})
        return current
    if kind == "tensor":
        t = tensors[node["key"]]
        if isinstance(current, torch.Tensor) and current.shape == t.shape and current.dtype == t.dtype:
            with torch.no_grad():
                current.copy_(t)
            return current
        return t
    if kind == "ndarray":
        return tensors[node["key"]].numpy().copy()
    if kind in ("list", "tuple"):
        seq = list(current) if isinstance(current, (list, tuple)) else []
        listed = [restore(seq[i] if i < len(seq) else None, n, tensors, f"{path}/{i}", new_model) for i, n in enumerate(node["items"])]
        if kind == "tuple":
            return tuple(listed)
        if isinstance(current, list):
            current[:] = listed
            return current
        return listed
    if kind == "dict":
        old: dict[Any, Any] = current if isinstance(current, dict) else {}
        items = {k: restore(old.get(k), n, tensors, f"{path}/{k}", new_model) for k, n in node["items"]}
        if isinstance(current, dict):
            current.clear()
            current.update(items)
            return current
        return items
    if kind == "config":
        return current
    return node["value"]


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


def _json_value(v: Any, path: str) -> Any:
    try:
        json.dumps(v)
    except TypeError:
        raise StateError(f"cannot capture {path}: {type(v).__name__} is neither a tensor nor a JSON value") from None
    return v
