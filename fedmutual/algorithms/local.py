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

from fedmutual.engine.cohort import Member
from fedmutual.protocol import Algorithm, Ask, ClientEnv, Message, Round, State, Work, handles
from fedmutual.registry import register_algorithm


@register_algorithm
class Local(Algorithm):
    name = "local"
    client_tasks = True
    alone = True

    def init_client(self, env: ClientEnv) -> State:
        model = self.run.new_client_model(env.k, "local", env.k)
        return State(model=model, opt=self.run.optimizer(model))  # persistent, like a standalone run

    def round(self, t: int, server: State, clients: list[int]) -> Round:
        done = yield Ask("train.local", {k: Message() for k in clients})
        return {"train_loss": done.mean_loss()}

    @handles("train.local")
    def train(self, me: State, msg: Message, env: ClientEnv) -> Work:
        return Work(env.job([Member(me.model, me.opt)]), lambda _: Message())

    def client_model(self, server: State, me: State) -> nn.Module:
        return me.model


@register_algorithm
class Independent(Local):
    """FML's baseline: each personalized model trained alone (identical to ``local``)."""

    name = "independent"
