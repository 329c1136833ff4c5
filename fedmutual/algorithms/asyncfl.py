"""Asynchronous weight updating, the DML-FL authors' second baseline (Gupta 2025).

Round t (1-based):
1. every client trains its own model ``local_epochs`` on its own data (a persistent optimizer);
2. every client measures its model's accuracy a_k on its local validation split;
3. every client uploads only this round's layers with a_k: the dense (linear) layers when
   t % ``asyncfl.dense_every`` == 0, the conv layers (and any other parametrized layer) otherwise;
4. the server sets each of those tensors to sum_k a_k·W_k / sum_k a_k and writes it back to every
   participant; the other layers stay each client's own.
"""

from __future__ import annotations

from torch import nn

from fedmutual.aggregation import weighted_mean
from fedmutual.algorithms.base import Algorithm, Context, client_name, mean_loss, state_of
from fedmutual.engine.cohort import Member, accuracy


def layer_groups(model: nn.Module) -> dict[str, list[str]]:
    """The model's state keys split into ``dense`` (nn.Linear) and ``conv`` (every other layer with state)."""
    groups: dict[str, list[str]] = {"dense": [], "conv": []}
    for prefix, module in model.named_modules():
        own = [n for n, _ in module.named_parameters(recurse=False)] + [n for n, _ in module.named_buffers(recurse=False)]
        for n in own:
            groups["dense" if isinstance(module, nn.Linear) else "conv"].append(f"{prefix}.{n}" if prefix else n)
    return groups


class AsyncFL(Algorithm):
    name = "asyncfl"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.every = ctx.cfg.asyncfl.dense_every
        init = state_of(ctx.new_model("global"))  # a common initialization, as for FedAvg
        self.models = [ctx.new_model("global") for _ in ctx.clients]
        for k, m in enumerate(self.models):
            m.load_state_dict(ctx.send("server", client_name(k), init, phase="init").tensors)
        self.opts = [ctx.optimizer(m) for m in self.models]
        self.groups = layer_groups(self.models[0])

    def group(self, t: int) -> str:
        """The layers round t (0-based) updates: ``dense`` every ``dense_every``-th round, ``conv`` otherwise."""
        return "dense" if (t + 1) % self.every == 0 else "conv"

    def round(self, t: int, participants: list[int]) -> dict[str, float]:
        ctx = self.ctx
        results = ctx.train([ctx.job(k, t, [Member(self.models[k], self.opts[k])]) for k in participants], t)
        keys = self.groups[self.group(t)]
        replies = []
        for k in participants:
            d = ctx.clients[k]
            acc = accuracy(self.models[k], d.val_x, d.val_y, ctx.cfg.eval_batch_size)
            state = state_of(self.models[k])
            replies.append(ctx.send(client_name(k), "server", {n: state[n] for n in keys}, val_acc=acc))
        accs = [float(r.meta["val_acc"]) for r in replies]
        # normalized accuracy weights; uniform when no client has a usable accuracy
        weights = accs if all(a == a for a in accs) and sum(accs) > 0 else None
        if keys:
            merged = weighted_mean([r.tensors for r in replies], weights)
            for k in participants:
                self.models[k].load_state_dict(ctx.send("server", client_name(k), merged, round=t + 1).tensors, strict=False)
        return {"train_loss": mean_loss(results), "dense_round": float(self.group(t) == "dense"),
                "val_acc_mean": sum(accs) / len(accs)}

    def client_model(self, k: int) -> nn.Module:
        return self.models[k]
