"""Decentralized FedAvg, the DFML paper's baseline: a random aggregator averages locally trained models.

Round t:
1. participants S_t and an aggregator a are drawn from the seed and t (as in DFML);
2. every participant trains its model locally on its own data (CE, or WSM-CE);
3. every n in S_t other than a sends its model to a;
4. a averages its model and those that reached it valid (weighted by samples, or uniformly, or with a
   robust rule) and sends the average back to them; below ``faults.min_replies`` peers the round is skipped.
Homogeneous models only.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedmutual.algorithms.dfml import draw_round
from fedmutual.engine.cohort import Member
from fedmutual.losses import class_shares, wsm
from fedmutual.protocol import Algorithm, Ask, ClientEnv, Message, Replies, Round, State, Work, handles, state_of
from fedmutual.registry import register_algorithm


class DFedAvgSettings(BaseModel):
    """Decentralized FedAvg: a random aggregator averages the participants' locally trained models."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    participants: int | None = Field(default=None, ge=1)  # default min(10, K)
    wsm: bool = False
    weighting: Literal["samples", "uniform"] = "samples"


@register_algorithm
class DFedAvg(Algorithm):
    name = "dfedavg"
    Settings = DFedAvgSettings
    val_source = "train"

    def m(self) -> int:
        return self.settings.participants or min(10, self.cfg.clients)

    def sample(self, t: int) -> list[int]:
        return draw_round(self.cfg.seed, t, self.cfg.clients, self.m())[0]

    def coordinator(self, t: int) -> int:
        return draw_round(self.cfg.seed, t, self.cfg.clients, self.m())[1]

    def init_client(self, env: ClientEnv) -> State:
        model = self.run.new_model("local", env.k, name=self.run.shared_model_name())  # refuses mixed architectures
        return State(model=model, opt=self.run.optimizer(model), n=env.n)

    def round(self, t: int, me: State, clients: list[int]) -> Round:
        a = self.coordinator(t)
        if a not in clients:
            return {"aggregator": float("nan")}
        done = yield Ask("train.local", {k: Message() for k in clients})  # every participant trains its own model
        stats = {"aggregator": float(a), "train_loss": done.mean_loss()}
        if a not in done:  # the aggregator's own update failed: nothing is averaged
            return stats
        own = state_of(me.model)
        peers = [n for n in clients if n != a]
        arrived = (yield Ask("query.model", {n: Message() for n in peers}, like=own, gather=True)) if peers else Replies()
        if peers and not arrived:
            return stats
        weights = [float(me.n)] + [float(m.meta["num_samples"]) for m in arrived.values()]
        avg = self.run.aggregate([own] + [m.tensors for m in arrived.values()],
                                 None if self.settings.weighting == "uniform" else weights)
        me.model.load_state_dict(avg)
        # a peer whose model did not arrive gets nothing back and keeps its own
        yield Ask("update.model", {n: Message(avg, {"round": str(t)}) for n in arrived},
                  expect={n: m.tensors for n, m in arrived.items()})
        return stats

    @handles("train.local")
    def train(self, me: State, msg: Message, env: ClientEnv) -> Work:
        job = env.job([Member(me.model, me.opt)])
        if self.settings.wsm:
            job.ce = wsm(class_shares(env.data.y, self.run.num_classes))
        return Work(job, lambda _: Message())

    @handles("query.model")
    def send_model(self, me: State, msg: Message, env: ClientEnv) -> Message:
        return Message(state_of(me.model), {"round": str(env.round), "num_samples": str(env.n)})

    @handles("update.model")
    def update(self, me: State, msg: Message, env: ClientEnv) -> Message:
        me.model.load_state_dict(msg.tensors)
        return Message()

    def client_model(self, server: State, me: State) -> nn.Module:
        return me.model
