"""Asynchronous weight updating, the DML-FL authors' second baseline (Gupta 2025).

Round t (1-based):
1. every client trains its own model ``local_epochs`` on its own data (a persistent optimizer);
2. every client measures its model's accuracy a_k on its local validation split;
3. every client uploads only this round's layers with a_k: the dense (linear) layers when
   t % ``asyncfl.dense_every`` == 0, the conv layers (and any other parametrized layer) otherwise;
4. the server sets each of those tensors to sum_k a_k·W_k / sum_k a_k over the valid replies (or a
   robust rule) and writes it back to those clients; the other layers stay each client's own.
"""

from __future__ import annotations

from torch import nn

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
        sent, accs = {}, {}
        for k in participants:
            d = ctx.clients[k]
            accs[k] = accuracy(self.models[k], d.val_x, d.val_y, ctx.cfg.eval_batch_size)
            state = state_of(self.models[k])
            sent[k] = {n: state[n] for n in keys}
        replies = ctx.gather("server", sent, val_acc=lambda k: accs[k]) if keys else {}
        got = [float(r.meta["val_acc"]) for r in replies.values()]
        # normalized accuracy weights; uniform when no client has a usable accuracy
        weights = got if got and all(a == a for a in got) and sum(got) > 0 else None
        if replies:
            merged = ctx.aggregate([r.tensors for r in replies.values()], weights)
            for k in replies:  # a client whose layers did not arrive keeps its own
                self.models[k].load_state_dict(ctx.send("server", client_name(k), merged, round=t + 1).tensors, strict=False)
        accs = list(accs.values())
        return {"train_loss": mean_loss(results), "dense_round": float(self.group(t) == "dense"),
                "val_acc_mean": sum(accs) / len(accs)}

    def client_model(self, k: int) -> nn.Module:
        return self.models[k]
