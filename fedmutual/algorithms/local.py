"""Local training only: every client trains its own model on its own data; nothing is sent."""

from __future__ import annotations

from torch import nn

from fedmutual.algorithms.base import Algorithm, Context, mean_loss
from fedmutual.engine.cohort import Member


class Local(Algorithm):
    name = "local"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.models = [ctx.new_model("local", k, name=ctx.client_model_name(k)) for k in range(len(ctx.clients))]
        self.opts = [ctx.optimizer(m) for m in self.models]  # persistent, like a standalone run

    def round(self, t: int, participants: list[int]) -> dict[str, float]:
        jobs = [self.ctx.job(k, t, [Member(self.models[k], self.opts[k])]) for k in participants]
        return {"train_loss": mean_loss(self.ctx.train(jobs, t))}

    def client_model(self, k: int) -> nn.Module:
        return self.models[k]
