"""FedAvg (McMahan et al. 2017): clients train the global model locally; the server averages.

Round t:
1. the server sends global_t to each participant;
2. each participant trains a copy with CE for E epochs (a fresh optimizer each round);
3. each participant uploads its weights and sample count;
4. the server sets global_{t+1} to the mean of the valid replies, weighted by samples or uniform
   (or a robust rule, ``aggregation.rule``); below ``faults.min_replies`` it keeps global_t.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict
from torch import nn

from fedmutual.engine.cohort import Member
from fedmutual.protocol import Algorithm, Ask, ClientEnv, Message, Round, State, Work, handles, state_of
from fedmutual.registry import register_algorithm


class FedAvgSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    weighting: Literal["samples", "uniform"] = "samples"


@register_algorithm
class FedAvg(Algorithm):
    name = "fedavg"
    Settings = FedAvgSettings

    def init_server(self) -> State:
        return State(global_=self.run.new_model("global"))

    def round(self, t: int, server: State, clients: list[int]) -> Round:
        sent = state_of(server.global_)
        replies = yield Ask("train.global", {k: Message(sent, {"round": str(t)}) for k in clients}, like=sent, gather=True)
        if replies:
            weights = None if self.settings.weighting == "uniform" else [float(r.meta["num_samples"]) for r in replies.values()]
            server.global_.load_state_dict(self.run.aggregate([r.tensors for r in replies.values()], weights))
        return {"train_loss": replies.mean_loss()}

    def prox_mu(self) -> float:
        """FedProx's proximal weight; 0 for FedAvg."""
        return 0.0

    @handles("train.global")
    def train(self, me: State, msg: Message, env: ClientEnv) -> Work:
        """Train a copy of the global model on this client's data; reply with its weights and sample count."""
        if "model" not in me:  # a scratch copy, kept across rounds to save its allocation
            me.model = self.run.new_model("global")
        me.model.load_state_dict(msg.tensors)
        ref = [p.detach().clone() for p in me.model.parameters()]
        member = Member(me.model, self.run.optimizer(me.model), w_ce=1.0, w_kl=0.0, prox_mu=self.prox_mu(), prox_ref=ref)
        return Work(env.job([member]), lambda _: Message(state_of(me.model), {"num_samples": str(env.n)}))

    def global_model(self, server: State) -> nn.Module:
        return server.global_

    def client_model(self, server: State, me: State) -> nn.Module:
        return server.global_  # every client deploys the global model
