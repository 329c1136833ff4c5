"""FedProx (Li et al. 2020): FedAvg with the proximal term (mu/2)·||w - w_global||² in each client's loss."""

from __future__ import annotations

from fedmutual.algorithms.base import Context
from fedmutual.algorithms.fedavg import FedAvg


class FedProx(FedAvg):
    name = "fedprox"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.weighting = ctx.cfg.fedprox.weighting

    def prox_mu(self) -> float:
        return self.ctx.cfg.fedprox.mu
