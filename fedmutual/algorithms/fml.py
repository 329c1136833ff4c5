"""FML, Federated Mutual Learning (Shen et al. 2023, Algorithm 1).

Round t:
1. the server sends global_t to each participant;
2. client k forks meme <- global_t (with a fresh optimizer) and, for E epochs on its
   own data, trains meme and its private personalized model by mutual learning:
       L_local = alpha·CE(local) + (1 - alpha)·KL(p_meme || p_local)
       L_meme  = beta ·CE(meme)  + (1 - beta) ·KL(p_local || p_meme)
3. client k uploads the meme; the personalized model never leaves the client;
4. the server sets global_{t+1} to the unweighted mean of the memes.
With beta = 1 this is FedAvg with uniform weights.

Heterogeneity (§5.3): each client's personalized model has its own architecture
(``model``) and its own task; the global model has one of its own (``global_model``).
When the global model is partial (an encoder, e.g. ``cnn2:encoder``), each client's
meme is that encoder plus the client's own adaptor head, sized for its task: only
the encoder travels and is averaged; the head, like the personalized model, stays.
"""

from __future__ import annotations

from torch import nn

from fedmutual.aggregation import weighted_mean
from fedmutual.algorithms.base import Algorithm, Context, client_name, mean_loss, state_of
from fedmutual.engine.cohort import Member
from fedmutual.models import with_head


class FML(Algorithm):
    name = "fml"
    client_tasks = True

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        n = len(ctx.clients)
        self.arch, self.part = ctx.global_model_spec()
        self.local = [ctx.new_client_model(k, "local", k) for k in range(n)]
        self.local_opt = [ctx.optimizer(m) for m in self.local]  # persists across rounds
        self.memes: dict[int, nn.Module] = {}
        if self.part is None:  # a whole model: every client's task must fit it
            ctx.one_task("a whole global model")
            self.global_ = ctx.new_model("global", name=self.arch)
        else:  # an encoder; each meme = encoder + the client's own adaptor head, kept across rounds
            self.global_ = ctx.new_encoder("global")
            self.memes = {k: with_head(ctx.new_encoder("global"), ctx.new_head(k, "head", k)) for k in range(n)}

    def shared(self, k: int) -> nn.Module:
        """The part of client k's meme that is forked from and averaged into the global model."""
        return self.memes[k] if self.part is None else self.memes[k].encoder

    def round(self, t: int, participants: list[int]) -> dict[str, float]:
        ctx, cfg = self.ctx, self.ctx.cfg.fml
        alpha, beta = cfg.alpha.at(t, ctx.cfg.rounds), cfg.beta.at(t, ctx.cfg.rounds)
        jobs = []
        for k in participants:
            msg = ctx.send("server", client_name(k), state_of(self.global_), round=t)
            if self.part is None:
                self.memes.setdefault(k, ctx.new_model("global", name=self.arch))
            self.shared(k).load_state_dict(msg.tensors)
            meme = self.memes[k]
            members = [
                Member(self.local[k], self.local_opt[k], w_ce=alpha, w_kl=1 - alpha),
                Member(meme, ctx.optimizer(meme), w_ce=beta, w_kl=1 - beta),  # meme optimizer reset each round
            ]
            job = ctx.job(k, t, members)
            job.temperature = cfg.temperature
            jobs.append(job)
        results = ctx.train(jobs, t)
        replies = [ctx.send(client_name(k), "server", state_of(self.shared(k)), num_samples=ctx.clients[k].n) for k in participants]
        weights = [float(r.meta["num_samples"]) for r in replies] if cfg.weighted else None
        self.global_.load_state_dict(weighted_mean([r.tensors for r in replies], weights))
        return {"train_loss_local": mean_loss(results, 0), "train_loss_meme": mean_loss(results, 1), "alpha": alpha, "beta": beta}

    def global_model(self) -> nn.Module | None:
        """The global model; None when it is an encoder, which has no task of its own."""
        return self.global_ if self.part is None else None

    def client_model(self, k: int) -> nn.Module:
        return self.local[k]

    def extra_models(self) -> dict[str, list[nn.Module]]:
        """With a partial global model: the global encoder with each client's adaptor head (its next meme)."""
        if self.part is None:
            return {}
        return {"meme": [with_head(self.global_, self.memes[k].head) for k in range(len(self.local))]}
