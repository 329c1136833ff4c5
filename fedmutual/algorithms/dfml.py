"""DFML, Decentralized Federated Mutual Learning (Khalil et al. 2024). No server.

Round t:
1. every peer derives the same draw from the seed and t: participants S_t and an aggregator a in S_t;
2. (optional) participants train locally on their own data first;
3. every n in S_t other than a sends its model W_n to a, peer to peer;
4. a trains the models of S_t that reached it valid together on its own data, each with
       L_n = (1 - alpha_t)·WSM-CE(z_n, y) + alpha_t·mean_{j != n} KL(p_j || p_n)
   where WSM re-weights the softmax by a's class shares and alpha_t is cyclic;
5. a sends each updated model back to its owner (an owner keeps its model if the reply is lost);
6. when alpha_t is at its peak, each owner copies its model to its peak model, the deployable one.
Architectures may all differ: nothing is averaged.
"""

from __future__ import annotations

import copy
import math
from typing import Literal, Mapping

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedmutual.engine.cohort import Member
from fedmutual.losses import CEFn, class_shares, cross_entropy, wsm
from fedmutual.protocol import Algorithm, Ask, ClientEnv, Message, Replies, Round, State, Work, handles, state_of
from fedmutual.registry import register_algorithm
from fedmutual.seeding import numpy_rng


class DFMLSettings(BaseModel):
    """DFML (Khalil et al. 2024): serverless mutual learning at a rotating aggregator."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    participants: int | None = Field(default=None, ge=1)  # m clients per round; default min(10, K)
    alpha_max: float = Field(default=0.8, ge=0, le=1)
    period: int = Field(default=10, ge=1)
    shape: Literal["rise", "symmetric", "constant"] = "rise"
    wsm: bool = True  # re-weighted softmax CE (Legate et al. 2023); False = plain CE
    peak_models: bool = True  # False: a client's deployable model is its current model
    local_train_before_send: bool = False
    temperature: float = Field(default=1.0, gt=0)


def cyclic_alpha(t: int, alpha_max: float, period: int, shape: str) -> float:
    """alpha of round t (0-based). ``rise``: 0 -> alpha_max over each period, peak on its last round;
    ``symmetric``: 0 -> alpha_max -> 0 within each period; ``constant``: alpha_max."""
    if shape == "constant" or period == 1:
        return alpha_max
    pos = t % period
    if shape == "rise":
        return alpha_max * 0.5 * (1.0 - math.cos(math.pi * pos / (period - 1)))
    return alpha_max * 0.5 * (1.0 - math.cos(2.0 * math.pi * pos / period))


def is_peak(t: int, alpha_max: float, period: int, shape: str) -> bool:
    """Whether alpha of round t is the highest value of its period."""
    start = t - t % period
    top = max(cyclic_alpha(s, alpha_max, period, shape) for s in range(start, start + period))
    return cyclic_alpha(t, alpha_max, period, shape) >= top - 1e-12


def draw_round(seed: int, t: int, num_clients: int, m: int, stream: str = "dfml") -> tuple[list[int], int]:
    """Participants S_t (sorted) and the aggregator of round t, from the seed and t alone."""
    rng = numpy_rng(seed, stream, "draw", t)
    chosen = sorted(rng.choice(num_clients, size=min(m, num_clients), replace=False).tolist())
    return chosen, chosen[int(rng.integers(len(chosen)))]


def bundle(models: Mapping[int, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Several owners' tensors in one message, named ``<owner>/<name>``."""
    return {f"{n}/{key}": v for n, state in models.items() for key, v in state.items()}


def unbundle(tensors: Mapping[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """The owners' tensors back out of :func:`bundle`'s names, by owner in ascending order."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for name, v in tensors.items():
        owner, key = name.split("/", 1)
        out.setdefault(int(owner), {})[key] = v
    return dict(sorted(out.items()))


@register_algorithm
class DFML(Algorithm):
    name = "dfml"
    Settings = DFMLSettings
    val_source = "train"  # the paper's 80:20 split of each client's own data

    def m(self) -> int:
        return self.settings.participants or min(10, self.cfg.clients)

    def sample(self, t: int) -> list[int]:
        return draw_round(self.cfg.seed, t, self.cfg.clients, self.m())[0]

    def coordinator(self, t: int) -> int:
        return draw_round(self.cfg.seed, t, self.cfg.clients, self.m())[1]

    def alpha(self, t: int) -> float:
        s = self.settings
        return cyclic_alpha(t, s.alpha_max, s.period, s.shape)

    def init_client(self, env: ClientEnv) -> State:
        model = self.run.new_model("local", env.k, name=self.run.client_model_name(env.k))
        # the optimizer is for optional local training before sending; the peak model is the deployable one
        return State(model=model, opt=self.run.optimizer(model), peak=copy.deepcopy(model), has_trained=False)

    def round(self, t: int, me: State, clients: list[int]) -> Round:
        a, alpha = self.coordinator(t), self.alpha(t)
        if a not in clients:  # a fault removed the aggregator: nobody trains this round
            return {"alpha": alpha, "aggregator": float("nan")}
        if self.settings.local_train_before_send:
            yield Ask("train.local", {k: Message() for k in clients})
        peers = [n for n in clients if n != a]
        arrived = (yield Ask("query.model", {n: Message() for n in peers}, gather=True)) if peers else Replies()
        stats = {"alpha": alpha, "aggregator": float(a)}
        if peers and not arrived:  # fewer than faults.min_replies: the round is skipped
            return stats
        visitors = {n: msg.tensors for n, msg in arrived.items()}
        done = yield Ask("train.mutual", {a: Message(bundle(visitors))})  # to itself: a trains the cohort on its data
        if a not in done:  # the aggregator's update failed: nothing comes back
            return stats
        trained = unbundle(done[a].tensors)
        yield Ask("update.model", {n: Message(trained[n], {"round": str(t), "owner": str(n)}) for n in visitors},
                  expect=visitors)
        peak = is_peak(t, self.settings.alpha_max, self.settings.period, self.settings.shape)
        return {**stats, "peak_round": float(peak), "train_loss": float(np.mean(done.trained[a].loss))}

    def ce_for(self, env: ClientEnv) -> CEFn:
        """WSM-CE with this client's class shares, or plain CE."""
        return wsm(class_shares(env.data.y, self.run.num_classes)) if self.settings.wsm else cross_entropy

    def keep_peak(self, me: State, t: int) -> None:
        """After an update: at alpha's peak (and on a model's first update), the model becomes the peak model."""
        s = self.settings
        if is_peak(t, s.alpha_max, s.period, s.shape) or not me.has_trained:
            me.peak.load_state_dict(me.model.state_dict())
        me.has_trained = True

    @handles("train.local")
    def train_local(self, me: State, msg: Message, env: ClientEnv) -> Work:
        return Work(env.job([Member(me.model, me.opt)], ce=self.ce_for(env)), lambda _: Message())

    @handles("query.model")
    def send_model(self, me: State, msg: Message, env: ClientEnv) -> Message:
        return Message(state_of(me.model), {"round": str(env.round), "owner": str(env.k)})

    @handles("train.mutual")
    def mutual(self, me: State, msg: Message, env: ClientEnv) -> Work:
        """The aggregator: its own model and the visiting ones learn from each other on its data."""
        models = {env.k: me.model}
        for n, tensors in unbundle(msg.tensors).items():
            models[n] = self.run.new_model("scratch", n, name=self.run.client_model_name(n))
            models[n].load_state_dict(tensors)
        alpha = self.alpha(env.round)
        members = [Member(m, self.run.optimizer(m), w_ce=1 - alpha, w_kl=alpha) for m in models.values()]
        job = env.job(members, ce=self.ce_for(env), temperature=self.settings.temperature)

        def reply(_: object) -> Message:
            self.keep_peak(me, env.round)
            return Message(bundle({n: state_of(m) for n, m in models.items() if n != env.k}))

        return Work(job, reply)

    @handles("update.model")
    def update(self, me: State, msg: Message, env: ClientEnv) -> Message:
        me.model.load_state_dict(msg.tensors)
        self.keep_peak(me, env.round)
        return Message()

    def client_model(self, server: State, me: State) -> nn.Module:
        return me.peak if self.settings.peak_models else me.model

    def extra_models(self, server: State, me: State) -> dict[str, nn.Module]:
        return {"current": me.model}
