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

from torch import nn

from fedmutual.algorithms.base import Algorithm, Context, client_name, mean_loss, state_of
from fedmutual.algorithms.dfml import draw_round
from fedmutual.engine.cohort import Member
from fedmutual.losses import class_shares, wsm


class DFedAvg(Algorithm):
    name = "dfedavg"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        name = ctx.shared_model_name()  # refuses mixed architectures with a clear message
        self.models = [ctx.new_model("local", k, name=name) for k in range(len(ctx.clients))]
        self.opts = [ctx.optimizer(m) for m in self.models]
        self.cfg = ctx.cfg.dfedavg

    def m(self) -> int:
        return self.cfg.participants or min(10, len(self.ctx.clients))

    def sample(self, t: int) -> list[int]:
        return draw_round(self.ctx.cfg.seed, t, len(self.ctx.clients), self.m())[0]

    def round(self, t: int, participants: list[int]) -> dict[str, float]:
        ctx = self.ctx
        _, a = draw_round(ctx.cfg.seed, t, len(ctx.clients), self.m())
        if a not in participants:
            return {"aggregator": float("nan")}
        jobs = []
        for k in participants:
            job = ctx.job(k, t, [Member(self.models[k], self.opts[k])])
            if self.cfg.wsm:
                job.ce = wsm(class_shares(ctx.clients[k].y, ctx.num_classes))
            jobs.append(job)
        results = ctx.train(jobs, t)
        if a in ctx.events.crashed:  # the aggregator crashed in its own update: nothing is averaged
            return {"aggregator": float(a), "train_loss": mean_loss(results)}
        own = state_of(self.models[a])
        peers = {n: state_of(self.models[n]) for n in participants if n != a}
        arrived = ctx.gather(client_name(a), peers, like=own, round=t, num_samples=lambda n: ctx.clients[n].n) if peers else {}
        if peers and not arrived:
            return {"aggregator": float(a), "train_loss": mean_loss(results)}
        states = [own] + [m.tensors for m in arrived.values()]
        weights = [float(ctx.clients[a].n)] + [float(m.meta["num_samples"]) for m in arrived.values()]
        avg = ctx.aggregate(states, None if self.cfg.weighting == "uniform" else weights)
        self.models[a].load_state_dict(avg)
        for n in arrived:  # a peer whose model did not arrive gets nothing back and keeps its own
            reply = ctx.send(client_name(a), client_name(n), avg, like=peers[n], round=t)
            if reply is not None:
                self.models[n].load_state_dict(reply.tensors)
        return {"aggregator": float(a), "train_loss": mean_loss(results)}

    def client_model(self, k: int) -> nn.Module:
        return self.models[k]
