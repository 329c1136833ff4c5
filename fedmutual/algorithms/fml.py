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

Heterogeneity (§5.3): each client's personalized model has its own architecture
(``model``) and its own task; the global model has one of its own (``global_model``).
When the global model is partial (an encoder, e.g. ``cnn2:encoder``), each client's
meme is that encoder plus the client's own adaptor head, sized for its task: only
the encoder travels and is averaged; the head, like the personalized model, stays.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from fedmutual.engine.cohort import Member
from fedmutual.models import with_head
from fedmutual.protocol import Algorithm, Ask, ClientEnv, Message, Round, RunSpec, State, Work, handles, state_of
from fedmutual.registry import register_algorithm
from fedmutual.schedules import Schedule


class FMLSettings(BaseModel):
    """FML (Shen et al. 2023): alpha weighs the personalized model's CE, beta the meme's."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    alpha: Schedule = Field(default_factory=lambda: Schedule(value=0.5))
    beta: Schedule = Field(default_factory=lambda: Schedule(value=0.5))
    weighted: bool = False  # the paper averages memes uniformly; True weighs by client samples
    temperature: float = Field(default=1.0, gt=0)
    # widths of hidden layers of each client's adaptor head when the global model is partial; [] = one FC layer
    adaptor_hidden: list[int] = Field(default_factory=list)

    @field_validator("adaptor_hidden")
    @classmethod
    def _widths(cls, v: list[int]) -> list[int]:
        if any(w < 1 for w in v):
            raise ValueError(f"hidden widths must be >= 1, got {v}")
        return v


@register_algorithm
class FML(Algorithm):
    name = "fml"
    Settings = FMLSettings
    client_tasks = True
    uses_global_model = True
    personalized = True

    def __init__(self, run: RunSpec):
        super().__init__(run)
        self.arch, self.part = run.global_model_spec()
        if self.part is None:  # a whole model: every client's task must fit it
            run.one_task("a whole global model")

    def init_server(self) -> State:
        return State(global_=self.run.new_model("global", name=self.arch) if self.part is None else self.run.new_encoder("global"))

    def init_client(self, env: ClientEnv) -> State:
        k, run = env.k, self.run
        local = run.new_client_model(k, "local", k)
        me = State(local=local, local_opt=run.optimizer(local))  # the personalized model's optimizer persists
        if self.part is not None:  # the meme: the encoder + this client's own adaptor head, kept across rounds
            me.meme = with_head(run.new_encoder("global"), run.new_head(k, "head", k, hidden=self.settings.adaptor_hidden))
        return me

    def round(self, t: int, server: State, clients: list[int]) -> Round:
        sent = state_of(server.global_)
        replies = yield Ask("train.mutual", {k: Message(sent, {"round": str(t)}) for k in clients}, like=sent, gather=True)
        if replies:
            weights = [float(r.meta["num_samples"]) for r in replies.values()] if self.settings.weighted else None
            server.global_.load_state_dict(self.run.aggregate([r.tensors for r in replies.values()], weights))
        t_all = self.cfg.rounds
        return {"train_loss_local": replies.mean_loss(0), "train_loss_meme": replies.mean_loss(1),
                "alpha": self.settings.alpha.at(t, t_all), "beta": self.settings.beta.at(t, t_all)}

    @handles("train.mutual")
    def mutual(self, me: State, msg: Message, env: ClientEnv) -> Work:
        """Fork the meme from the global model, train it and the personalized model together, upload the meme."""
        s, t = self.settings, env.round
        alpha, beta = s.alpha.at(t, self.cfg.rounds), s.beta.at(t, self.cfg.rounds)
        if self.part is None and "meme" not in me:
            me.meme = self.run.new_model("global", name=self.arch)
        shared = me.meme if self.part is None else me.meme.encoder  # what is forked from and averaged into global
        shared.load_state_dict(msg.tensors)
        members = [
            Member(me.local, me.local_opt, w_ce=alpha, w_kl=1 - alpha),
            Member(me.meme, self.run.optimizer(me.meme), w_ce=beta, w_kl=1 - beta),  # meme optimizer reset each round
        ]
        return Work(env.job(members, temperature=s.temperature), lambda _: Message(state_of(shared), {"num_samples": str(env.n)}))

    def global_model(self, server: State) -> nn.Module | None:
        """The global model; None when it is an encoder, which has no task of its own."""
        return server.global_ if self.part is None else None

    def client_model(self, server: State, me: State) -> nn.Module:
        return me.local

    def extra_models(self, server: State, me: State) -> dict[str, nn.Module]:
        """With a partial global model: the global encoder with the client's adaptor head (its next meme)."""
        return {} if self.part is None else {"meme": with_head(server.global_, me.meme.head)}
