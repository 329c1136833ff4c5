"""FedProx (Li et al. 2020): FedAvg with the proximal term (mu/2)·||w - w_global||² in each client's loss."""

from __future__ import annotations

from pydantic import Field

from fedmutual.algorithms.fedavg import FedAvg, FedAvgSettings
from fedmutual.registry import register_algorithm


class FedProxSettings(FedAvgSettings):
    mu: float = Field(default=0.01, ge=0)


@register_algorithm
class FedProx(FedAvg):
    name = "fedprox"
    Settings = FedProxSettings

    def prox_mu(self) -> float:
        return float(self.settings.mu)
