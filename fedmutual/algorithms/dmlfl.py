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

import dataclasses
from collections import defaultdict

import torch
from torch import nn

from fedmutual.algorithms.base import Algorithm, Context, client_name, mean_loss, state_of
from fedmutual.config import parse_compression
from fedmutual.engine.cohort import Member
from fedmutual.errors import ConfigError
from fedmutual.losses import published_probs
from fedmutual.seeding import derive_seed


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


class DMLFL(Algorithm):
    name = "dmlfl"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.cfg = cfg = ctx.cfg.dmlfl
        self.kl = ctx.kl_mode(cfg.kl, "dmlfl.kl")
        if ctx.binary and cfg.compression.startswith("topk"):
            raise ConfigError(f"dmlfl.compression: {cfg.compression!r} needs several classes; a binary task publishes one probability per sample (use 'none' or 'fp16')")
        self.models = [ctx.new_model("local", k, name=ctx.client_model_name(k)) for k in range(len(ctx.clients))]
        if cfg.common_init:  # the only weights that ever travel: one initial model per architecture
            by_arch: dict[str, list[int]] = defaultdict(list)
            for k in range(len(ctx.clients)):
                by_arch[ctx.client_model_name(k)].append(k)
            for name, ks in by_arch.items():
                init = state_of(ctx.new_model("common", name, name=name))
                for k in ks:
                    self.models[k].load_state_dict(ctx.send("server", client_name(k), init, phase="init").tensors)
        self.opts = [ctx.optimizer(m) for m in self.models]  # one per client, for both phases, for the whole run

    def round(self, t: int, participants: list[int]) -> dict[str, float]:
        ctx, cfg = self.ctx, self.cfg
        local = ctx.train([ctx.job(k, t, [Member(self.models[k], self.opts[k])]) for k in participants], t)
        px, py = ctx.round_data().public_set(t)
        crashed = set(ctx.events.crashed)
        preds = {k: compress(predict(self.models[k], px, self.kl, cfg.temperature, ctx.cfg.eval_batch_size), cfg.compression)
                 for k in participants if k not in crashed}
        published = {k: m.tensors for k, m in ctx.gather("server", preds, content="probabilities", round=t + 1).items()}
        stats = {"train_loss_local": mean_loss(local), "public_size": float(len(py))}
        if len(published) < 2 and not cfg.public_labels:
            return stats
        jobs = []
        for k in participants:
            if k in crashed:
                continue
            others = [j for j in published if j != k]  # the predictions that reached the relay valid
            relay = ctx.send("server", client_name(k), {f"{client_name(j)}/{n}": v for j in others for n, v in published[j].items()}, round=t + 1)
            teachers = [decompress(unpack(relay.tensors, client_name(j)), ctx.num_outputs) for j in others]
            if teachers and ctx.cfg.aggregation.rule != "mean":  # one robust consensus instead of every peer
                teachers = [consensus(ctx.reduce(torch.stack(teachers)))]
            member = Member(self.models[k], self.opts[k], w_ce=1.0 if cfg.public_labels else 0.0, w_kl=cfg.kl_weight)
            job = dataclasses.replace(
                ctx.job(k, t, [member]), x=px, y=py, epochs=cfg.collab_epochs, temperature=cfg.temperature, kl=self.kl,
                shuffle_seed=derive_seed(ctx.cfg.seed, "shuffle", "public", k, t),
                teachers=[torch.stack(teachers, 1) if teachers else None],
            )
            jobs.append(job)
        stats["train_loss_collab"] = mean_loss(ctx.train(jobs, t))
        return stats

    def client_model(self, k: int) -> nn.Module:
        return self.models[k]
