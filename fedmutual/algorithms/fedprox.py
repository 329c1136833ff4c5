"""FedProx (Li et al. 2020): FedAvg with the proximal term (mu/2)·||w - w_global||² in each client's loss."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedmutual.algorithms.fedavg import FedAvg
from fedmutual.registry import register_algorithm


class FedProxSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    mu: float = Field(default=0.01, ge=0)
    weighting: Literal["samples", "uniform"] = "samples"


@register_algorithm
class FedProx(FedAvg):
    name = "fedprox"
    Settings = FedProxSettings

    def prox_mu(self) -> float:
        return float(self.settings.mu)
