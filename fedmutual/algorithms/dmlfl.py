"""DML-FL, mutual learning by sharing predictions on a public set (Gupta 2025). No weights travel.

Round t:
1. every client trains ``local_epochs`` on its own data (a fresh fold, or its partition) with the task loss;
2. every party derives the round's public set from the seed and t (a fresh stratified fold, or a static set);
3. every client publishes its predictions on the public set (softmax, or sigmoid on a binary task),
   optionally compressed, to a relay that forwards each client the others' predictions that arrived valid;
4. every client trains ``dmlfl.collab_epochs`` on the public set with
       L_i = w_ce·L_task(z_i, y) + w_kl·mean_{j != i} KL(P_j || p_i)
   where the P_j are the received predictions, fixed for the round (w_ce = 0 on an unlabelled public set);
   with a robust ``aggregation.rule`` the P_j are replaced by one teacher, their coordinate-wise median
   or trimmed mean, renormalized.
After a common initialization (clients with the same architecture start equal), only predictions travel,
so any mix of architectures works.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from fedmutual.config import parse_compression
from fedmutual.engine.cohort import Member
from fedmutual.errors import ConfigError
from fedmutual.losses import published_probs
from fedmutual.protocol import Algorithm, Ask, ClientEnv, Message, Round, RunSpec, State, Work, handles, state_of
from fedmutual.registry import register_algorithm
from fedmutual.seeding import derive_seed


class DMLFLSettings(BaseModel):
    """DML-FL (Gupta 2025): clients share predictions on a public set (``[public]``), never weights."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    collab_epochs: int = Field(default=1, ge=1)  # epochs on the public set; local epochs are `local_epochs`
    kl: Literal["auto", "softmax", "bernoulli", "faithful"] = "auto"  # auto: softmax, or bernoulli on a binary task
    kl_weight: float = Field(default=1.0, ge=0)
    temperature: float = Field(default=1.0, gt=0)
    compression: str = "none"  # "none" (float32), "fp16", or "topk:K" (K largest probabilities + their classes)
    common_init: bool = True  # clients with the same architecture start from the same weights

    @field_validator("compression")
    @classmethod
    def _compression(cls, v: str) -> str:
        parse_compression(v)
        return v.strip().lower()


def compress(probs: torch.Tensor, spec: str) -> dict[str, torch.Tensor]:
    """A client's predictions ``[N, C]`` as message tensors: float32, float16, or the top K per sample."""
    kind, k = parse_compression(spec)
    if kind == "none":
        return {"probs": probs.float()}
    if kind == "fp16":
        return {"probs": probs.half()}
    values, classes = probs.topk(min(k, probs.shape[1]), dim=1)
    return {"topk_probs": values.float(), "topk_classes": classes.to(torch.uint8 if probs.shape[1] <= 256 else torch.int32)}


def decompress(tensors: dict[str, torch.Tensor], num_outputs: int) -> torch.Tensor:
    """Predictions ``[N, C]`` (float32) back from :func:`compress`'s tensors.

    Top-k: the classes not sent share the remaining probability mass equally.
    """
    if "probs" in tensors:
        return tensors["probs"].float()
    values, classes = tensors["topk_probs"].float(), tensors["topk_classes"].long()
    rest = num_outputs - values.shape[1]
    fill = ((1 - values.sum(1, keepdim=True)).clamp_min(0) / max(rest, 1)).expand(-1, num_outputs)
    return fill.clone().scatter_(1, classes, values)


def unpack(tensors: dict[str, torch.Tensor], sender: str) -> dict[str, torch.Tensor]:
    """One sender's tensors out of a relayed message whose names are ``sender/name``."""
    return {n.split("/", 1)[1]: v for n, v in tensors.items() if n.split("/", 1)[0] == sender}


def consensus(probs: torch.Tensor) -> torch.Tensor:
    """Robustly combined predictions ``[N, C]`` made a distribution again (a coordinate-wise median's rows need not sum to 1)."""
    if probs.shape[-1] == 1:  # binary: one probability per sample
        return probs.clamp(0, 1)
    return probs.clamp_min(0) / probs.clamp_min(0).sum(-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, mode: str, temperature: float, batch_size: int) -> torch.Tensor:
    """The model's published predictions on ``x``, in eval mode (no dropout)."""
    was = model.training
    model.eval()
    out = torch.cat([published_probs(model(x[s : s + batch_size]), mode, temperature) for s in range(0, len(x), batch_size)])
    model.train(was)
    return out


@register_algorithm
class DMLFL(Algorithm):
    name = "dmlfl"
    Settings = DMLFLSettings
    carves_public = True

    def __init__(self, run: RunSpec):
        super().__init__(run)
        self.kl = run.kl_mode(self.settings.kl, "dmlfl.kl")
        if run.binary and self.settings.compression.startswith("topk"):
            raise ConfigError(f"dmlfl.compression: {self.settings.compression!r} needs several classes; a binary task "
                              "publishes one probability per sample (use 'none' or 'fp16')")

    def init_client(self, env: ClientEnv) -> State:
        model = self.run.new_model("local", env.k, name=self.run.client_model_name(env.k))
        return State(model=model, opt=self.run.optimizer(model))  # one optimizer for both phases, for the whole run

    def setup(self, server: State, clients: list[int]) -> Round:
        """The only weights that ever travel: one common initial model per architecture."""
        if not self.settings.common_init:
            return {}
        by_arch: dict[str, list[int]] = defaultdict(list)
        for k in clients:
            by_arch[self.run.client_model_name(k)].append(k)
        inits = {name: state_of(self.run.new_model("common", name, name=name)) for name in by_arch}
        yield Ask("init.model", {k: Message(inits[name], {"phase": "init"}) for name, ks in by_arch.items() for k in ks})
        return {}

    def round(self, t: int, server: State, clients: list[int]) -> Round:
        size = len(self.run.public_set(t)[1])
        shape = compress(torch.zeros(size, self.run.num_outputs), self.settings.compression)  # what a publication must match
        published = yield Ask("train.local", {k: Message() for k in clients}, like=shape, content="probabilities", gather=True)
        stats = {"train_loss_local": published.mean_loss(), "public_size": float(size)}
        if len(published) < 2 and not self.cfg.public.labels:
            return stats
        relays = {k: Message({f"client{j}/{n}": v for j, m in published.items() if j != k for n, v in m.tensors.items()},
                             {"round": str(t + 1)}) for k in clients}
        done = yield Ask("train.collab", relays)
        stats["train_loss_collab"] = done.mean_loss()
        return stats

    @handles("init.model")
    def init(self, me: State, msg: Message, env: ClientEnv) -> Message:
        me.model.load_state_dict(msg.tensors)
        return Message()

    @handles("train.local")
    def train_local(self, me: State, msg: Message, env: ClientEnv) -> Work:
        """Train on the client's own data, then publish predictions on the round's public set."""
        px, _ = env.public_set()

        def publish(_: object) -> Message:
            probs = predict(me.model, px, self.kl, self.settings.temperature, self.cfg.eval_batch_size)
            return Message(compress(probs, self.settings.compression), {"round": str(env.round + 1)})

        return Work(env.job([Member(me.model, me.opt)]), publish)

    @handles("train.collab")
    def train_collab(self, me: State, msg: Message, env: ClientEnv) -> Work:
        """Learn from the others' predictions (fixed teachers) on the public set."""
        s, px, py = self.settings, *env.public_set()
        senders = sorted({n.split("/", 1)[0] for n in msg.tensors}, key=lambda j: int(j.removeprefix("client")))
        teachers = [decompress(unpack(msg.tensors, j), self.run.num_outputs) for j in senders]
        if teachers and self.cfg.aggregation.rule != "mean":  # one robust consensus instead of every peer
            teachers = [consensus(self.run.reduce(torch.stack(teachers)))]
        member = Member(me.model, me.opt, w_ce=1.0 if self.cfg.public.labels else 0.0, w_kl=s.kl_weight)
        job = env.job([member], x=px, y=py, epochs=s.collab_epochs, temperature=s.temperature, kl=self.kl,
                      shuffle_seed=derive_seed(self.cfg.seed, "shuffle", "public", env.k, env.round),
                      teachers=[torch.stack(teachers, 1) if teachers else None])
        return Work(job, lambda _: Message())

    def client_model(self, server: State, me: State) -> nn.Module:
        return me.model
