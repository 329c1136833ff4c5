"""FedAvgM (Hsu et al. 2019, "Measuring the effects of non-identical data distribution"): FedAvg whose
server applies the clients' mean update with momentum.

Round t:
1. the server sends global_t to each participant;
2. each participant trains a copy with CE for E epochs (a fresh optimizer each round) and replies with it;
3. the server averages the replies (weighted by samples, or a robust rule) into avg_t and, per parameter,
       v <- server_momentum·v + (global_t - avg_t)        global_{t+1} = global_t - server_lr·v
   (buffers such as BatchNorm statistics are taken from the average); below ``faults.min_replies`` it keeps
   global_t and v. With server_momentum = 0 and server_lr = 1 this is FedAvg.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedmutual import register_algorithm
from fedmutual.engine.cohort import Member
from fedmutual.protocol import Algorithm, Ask, ClientEnv, Message, Round, State, Work, handles, state_of


class FedAvgMSettings(BaseModel):
    """The ``[fedavgm]`` table of a config."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    server_momentum: float = Field(default=0.9, ge=0, lt=1)
    server_lr: float = Field(default=1.0, gt=0)


@register_algorithm
class FedAvgM(Algorithm):
    name = "fedavgm"
    Settings = FedAvgMSettings

    def init_server(self) -> State:
        model = self.run.new_model("global")
        return State(global_=model, velocity={n: torch.zeros_like(p) for n, p in model.named_parameters()})

    def round(self, t: int, server: State, clients: list[int]) -> Round:
        sent = state_of(server.global_)
        replies = yield Ask("train.global", {k: Message(sent, {"round": str(t)}) for k in clients}, like=sent, gather=True)
        if replies:
            avg = self.run.aggregate([r.tensors for r in replies.values()], [float(r.meta["num_samples"]) for r in replies.values()])
            new = dict(avg)  # buffers come from the average
            for n, v in server.velocity.items():
                v.mul_(self.settings.server_momentum).add_(sent[n] - avg[n])
                new[n] = sent[n] - self.settings.server_lr * v
            server.global_.load_state_dict(new)
        return {"train_loss": replies.mean_loss()}

    @handles("train.global")
    def train(self, me: State, msg: Message, env: ClientEnv) -> Work:
        if "model" not in me:  # a scratch copy, kept across rounds to save its allocation
            me.model = self.run.new_model("global")
        me.model.load_state_dict(msg.tensors)
        job = env.job([Member(me.model, self.run.optimizer(me.model))])
        return Work(job, lambda _: Message(state_of(me.model), {"num_samples": str(env.n)}))

    def global_model(self, server: State) -> nn.Module:
        return server.global_

    def client_model(self, server: State, me: State) -> nn.Module:
        return server.global_
