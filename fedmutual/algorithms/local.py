"""Local training only: every client trains its own model on its own data; nothing is sent.

``independent`` is the same algorithm under the FML paper's name for its baseline
(§5.3, the dashed lines of Fig. 5 and 6): each client's personalized architecture
and task, trained alone with the same optimizer, epochs and batches as under FML.
It starts from the same initial weights as FML's personalized model (the seed
stream ``init/local/k``) and keeps one optimizer for the whole run, as FML's
personalized model does, so the two differ only by FML's meme and KL term.
"""

from __future__ import annotations

from torch import nn

from fedmutual.algorithms.base import Algorithm, Context, mean_loss
from fedmutual.engine.cohort import Member


class Local(Algorithm):
    name = "local"
    client_tasks = True

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.models = [ctx.new_client_model(k, "local", k) for k in range(len(ctx.clients))]
        self.opts = [ctx.optimizer(m) for m in self.models]  # persistent, like a standalone run

    def round(self, t: int, participants: list[int]) -> dict[str, float]:
        jobs = [self.ctx.job(k, t, [Member(self.models[k], self.opts[k])]) for k in participants]
        return {"train_loss": mean_loss(self.ctx.train(jobs, t))}

    def client_model(self, k: int) -> nn.Module:
        return self.models[k]


class Independent(Local):
    """FML's baseline: each personalized model trained alone (identical to ``local``)."""

    name = "independent"
