"""FML, Federated Mutual Learning (Shen et al. 2023, Algorithm 1).

Round t:
1. the server sends global_t to each participant;
2. client k forks meme <- global_t (with a fresh optimizer) and, for E epochs on its
   own data, trains meme and its private personalized model by mutual learning:
       L_local = alpha·CE(local) + (1 - alpha)·KL(p_meme || p_local)
       L_meme  = beta ·CE(meme)  + (1 - beta) ·KL(p_local || p_meme)
3. client k uploads the meme; the personalized model never leaves the client;
4. the server sets global_{t+1} to the unweighted mean of the memes that arrived valid
   (or a robust rule, ``aggregation.rule``); below ``faults.min_replies`` it keeps global_t.
With beta = 1 this is FedAvg with uniform weights.
"""

from __future__ import annotations

from torch import nn

from fedmutual.algorithms.base import Algorithm, Context, client_name, mean_loss, state_of
from fedmutual.engine.cohort import Member


class FML(Algorithm):
    name = "fml"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.global_ = ctx.new_model("global")
        self.local = [ctx.new_model("local", k) for k in range(len(ctx.clients))]
        self.local_opt = [ctx.optimizer(m) for m in self.local]  # persists across rounds
        self.memes: dict[int, nn.Module] = {}

    def round(self, t: int, participants: list[int]) -> dict[str, float]:
        ctx, cfg = self.ctx, self.ctx.cfg.fml
        alpha, beta = cfg.alpha.at(t, ctx.cfg.rounds), cfg.beta.at(t, ctx.cfg.rounds)
        jobs, sent = [], state_of(self.global_)
        for k in participants:
            msg = ctx.send("server", client_name(k), sent, round=t)
            meme = self.memes.setdefault(k, ctx.new_model("global"))
            meme.load_state_dict(msg.tensors)
            members = [
                Member(self.local[k], self.local_opt[k], w_ce=alpha, w_kl=1 - alpha),
                Member(meme, ctx.optimizer(meme), w_ce=beta, w_kl=1 - beta),  # meme optimizer reset each round
            ]
            job = ctx.job(k, t, members)
            job.temperature = cfg.temperature
            jobs.append(job)
        results = ctx.train(jobs, t)
        replies = ctx.gather("server", {k: state_of(self.memes[k]) for k in participants}, like=sent, num_samples=lambda k: ctx.clients[k].n)
        if replies:
            weights = [float(r.meta["num_samples"]) for r in replies.values()] if cfg.weighted else None
            self.global_.load_state_dict(ctx.aggregate([r.tensors for r in replies.values()], weights))
        return {"train_loss_local": mean_loss(results, 0), "train_loss_meme": mean_loss(results, 1), "alpha": alpha, "beta": beta}

    def global_model(self) -> nn.Module:
        return self.global_

    def client_model(self, k: int) -> nn.Module:
        return self.local[k]
