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

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedmutual.engine.cohort import Member, accuracy
from fedmutual.protocol import Algorithm, Ask, ClientEnv, Message, Round, RunSpec, State, Work, handles, state_of
from fedmutual.registry import register_algorithm


class AsyncFLSettings(BaseModel):
    """The DML-FL authors' asynchronous weight updating: accuracy-weighted layers, dense or conv by round."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    dense_every: int = Field(default=3, ge=1)  # rounds t with t % dense_every == 0 (1-based) update dense layers


def layer_groups(model: nn.Module) -> dict[str, list[str]]:
    """The model's state keys split into ``dense`` (nn.Linear) and ``conv`` (every other layer with state)."""
    groups: dict[str, list[str]] = {"dense": [], "conv": []}
    for prefix, module in model.named_modules():
        own = [n for n, _ in module.named_parameters(recurse=False)] + [n for n, _ in module.named_buffers(recurse=False)]
        for n in own:
            groups["dense" if isinstance(module, nn.Linear) else "conv"].append(f"{prefix}.{n}" if prefix else n)
    return groups


@register_algorithm
class AsyncFL(Algorithm):
    name = "asyncfl"
    Settings = AsyncFLSettings

    def __init__(self, run: RunSpec):
        super().__init__(run)
        self.layers = layer_groups(run.new_model("global"))  # every client has this architecture

    def group(self, t: int) -> str:
        """The layers round t (0-based) updates: ``dense`` every ``dense_every``-th round, ``conv`` otherwise."""
        return "dense" if (t + 1) % self.settings.dense_every == 0 else "conv"

    def init_client(self, env: ClientEnv) -> State:
        model = self.run.new_model("global")
        return State(model=model, opt=self.run.optimizer(model))

    def setup(self, server: State, clients: list[int]) -> Round:
        """A common initialization, as for FedAvg."""
        init = state_of(self.run.new_model("global"))
        yield Ask("init.model", {k: Message(init, {"phase": "init"}) for k in clients})
        return {}

    def round(self, t: int, server: State, clients: list[int]) -> Round:
        layers = self.layers[self.group(t)]
        replies = yield Ask("train.local", {k: Message() for k in clients}, gather=bool(layers))
        if not layers:  # nothing to exchange this round (an MLP has no conv layers): the clients only trained
            return {"train_loss": replies.mean_loss(), "dense_round": float(self.group(t) == "dense"), "val_acc_mean": float("nan")}
        accs = [float(r.meta["val_acc"]) for r in replies.values()]
        # normalized accuracy weights; uniform when no client has a usable accuracy
        weights = accs if accs and all(a == a for a in accs) and sum(accs) > 0 else None
        if replies:
            merged = self.run.aggregate([r.tensors for r in replies.values()], weights)
            yield Ask("update.layers", {k: Message(merged, {"round": str(t + 1)}) for k in replies})
        return {"train_loss": replies.mean_loss(), "dense_round": float(self.group(t) == "dense"),
                "val_acc_mean": sum(accs) / len(accs) if accs else float("nan")}

    @handles("init.model")
    def init(self, me: State, msg: Message, env: ClientEnv) -> Message:
        me.model.load_state_dict(msg.tensors)
        return Message()

    @handles("train.local")
    def train(self, me: State, msg: Message, env: ClientEnv) -> Work:
        """Train the own model; reply with this round's layers and their accuracy on the own validation split."""
        def reply(_: object) -> Message:
            keys = self.layers[self.group(env.round)]
            if not keys:
                return Message()
            acc = accuracy(me.model, env.data.val_x, env.data.val_y, self.cfg.eval_batch_size)
            state = state_of(me.model)
            return Message({n: state[n] for n in keys}, {"val_acc": str(acc)})

        return Work(env.job([Member(me.model, me.opt)]), reply)

    @handles("update.layers")
    def update(self, me: State, msg: Message, env: ClientEnv) -> Message:
        me.model.load_state_dict(msg.tensors, strict=False)  # the other layers stay the client's own
        return Message()

    def client_model(self, server: State, me: State) -> nn.Module:
        return me.model
