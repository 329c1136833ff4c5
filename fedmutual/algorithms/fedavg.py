"""FedAvg (McMahan et al. 2017): clients train the global model locally; the server averages.

Round t:
1. the server sends global_t to each participant;
2. each participant trains a copy with CE for E epochs (a fresh optimizer each round);
3. each participant uploads its weights and sample count;
4. the server sets global_{t+1} to the mean of the valid replies, weighted by samples or uniform
   (or a robust rule, ``aggregation.rule``); below ``faults.min_replies`` it keeps global_t.
"""

from __future__ import annotations

from torch import nn

from fedmutual.algorithms.base import Algorithm, Context, client_name, mean_loss, state_of
from fedmutual.engine.cohort import Member


class FedAvg(Algorithm):
    name = "fedavg"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.global_ = ctx.new_model("global")
        self.work: dict[int, nn.Module] = {}  # client-side scratch copies, reused across rounds
        self.weighting = ctx.cfg.fedavg.weighting

    def prox_mu(self) -> float:
        """FedProx's proximal weight; 0 for FedAvg."""
        return 0.0

    def round(self, t: int, participants: list[int]) -> dict[str, float]:
        ctx, jobs, sent = self.ctx, [], state_of(self.global_)
        for k in participants:
            msg = ctx.send("server", client_name(k), sent, round=t)
            model = self.work.setdefault(k, ctx.new_model("global"))
            model.load_state_dict(msg.tensors)
            ref = [p.detach().clone() for p in model.parameters()]
            member = Member(model, ctx.optimizer(model), w_ce=1.0, w_kl=0.0, prox_mu=self.prox_mu(), prox_ref=ref)
            jobs.append(ctx.job(k, t, [member]))
        results = ctx.train(jobs, t)
        replies = ctx.gather("server", {k: state_of(self.work[k]) for k in participants}, like=sent, num_samples=lambda k: ctx.clients[k].n)
        if replies:
            weights = None if self.weighting == "uniform" else [float(r.meta["num_samples"]) for r in replies.values()]
            self.global_.load_state_dict(ctx.aggregate([r.tensors for r in replies.values()], weights))
        return {"train_loss": mean_loss(results)}

    def global_model(self) -> nn.Module:
        return self.global_

    def client_model(self, k: int) -> nn.Module:
        return self.global_
