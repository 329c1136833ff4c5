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

import numpy as np
from torch import nn

from fedmutual.algorithms.base import Algorithm, Context, client_name, state_of
from fedmutual.engine.cohort import Member
from fedmutual.losses import CEFn, class_shares, cross_entropy, wsm
from fedmutual.seeding import numpy_rng


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


class DFML(Algorithm):
    name = "dfml"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        n = len(ctx.clients)
        self.models = [ctx.new_model("local", k, name=ctx.client_model_name(k)) for k in range(n)]
        self.local_opt = [ctx.optimizer(m) for m in self.models]  # for optional local training before sending
        self.peak: list[nn.Module] = [copy.deepcopy(m) for m in self.models]
        self.has_trained = [False] * n
        self.scratch: dict[int, nn.Module] = {}  # the aggregator's copies of visiting models
        self.cfg = ctx.cfg.dfml

    def m(self) -> int:
        return self.cfg.participants or min(10, len(self.ctx.clients))

    def sample(self, t: int) -> list[int]:
        return draw_round(self.ctx.cfg.seed, t, len(self.ctx.clients), self.m())[0]

    def alpha(self, t: int) -> float:
        return cyclic_alpha(t, self.cfg.alpha_max, self.cfg.period, self.cfg.shape)

    def ce_for(self, k: int) -> CEFn:
        """WSM-CE with client k's class shares, or plain CE."""
        if not self.cfg.wsm:
            return cross_entropy
        return wsm(class_shares(self.ctx.clients[k].y, self.ctx.num_classes))

    def round(self, t: int, participants: list[int]) -> dict[str, float]:
        ctx = self.ctx
        _, a = draw_round(ctx.cfg.seed, t, len(ctx.clients), self.m())
        if a not in participants:  # a fault removed the aggregator: nobody trains this round
            return {"alpha": self.alpha(t), "aggregator": float("nan")}
        if self.cfg.local_train_before_send:
            jobs = [ctx.job(k, t, [Member(self.models[k], self.local_opt[k])]) for k in participants]
            for job in jobs:
                job.ce = self.ce_for(job.client)
            ctx.train(jobs, t)
        cohort: dict[int, nn.Module] = {a: self.models[a]}
        peers = [n for n in participants if n != a]
        arrived = ctx.gather(client_name(a), {n: state_of(self.models[n]) for n in peers}, round=t, owner=lambda n: n) if peers else {}
        if peers and not arrived:  # fewer than faults.min_replies: the round is skipped
            return {"alpha": self.alpha(t), "aggregator": float(a)}
        for n, msg in arrived.items():
            work = self.scratch.setdefault(n, ctx.new_model("scratch", n, name=ctx.client_model_name(n)))
            work.load_state_dict(msg.tensors)
            cohort[n] = work
        alpha = self.alpha(t)
        members = [Member(model, ctx.optimizer(model), w_ce=1 - alpha, w_kl=alpha) for model in cohort.values()]
        job = ctx.job(a, t, members)
        job.ce, job.temperature = self.ce_for(a), self.cfg.temperature
        (result,) = ctx.train([job], t)
        if not result.steps:  # the aggregator crashed: nothing comes back
            return {"alpha": alpha, "aggregator": float(a)}
        updated = [a]
        for n, model in cohort.items():
            if n != a:
                reply = ctx.send(client_name(a), client_name(n), state_of(model), like=state_of(self.models[n]), round=t, owner=n)
                if reply is not None:
                    self.models[n].load_state_dict(reply.tensors)
                    updated.append(n)
        peak = is_peak(t, self.cfg.alpha_max, self.cfg.period, self.cfg.shape)
        for n in updated:
            if peak or not self.has_trained[n]:
                self.peak[n].load_state_dict(self.models[n].state_dict())
            self.has_trained[n] = True
        return {"alpha": alpha, "aggregator": float(a), "peak_round": float(peak), "train_loss": float(np.mean(result.loss))}

    def client_model(self, k: int) -> nn.Module:
        return self.peak[k] if self.cfg.peak_models else self.models[k]

    def extra_models(self) -> dict[str, list[nn.Module]]:
        return {"current": self.models}
