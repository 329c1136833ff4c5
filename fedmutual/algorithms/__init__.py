"""One short file per algorithm."""

from fedmutual.algorithms.asyncfl import AsyncFL
from fedmutual.algorithms.base import Algorithm, Context
from fedmutual.algorithms.dfedavg import DFedAvg
from fedmutual.algorithms.dfml import DFML
from fedmutual.algorithms.dmlfl import DMLFL
from fedmutual.algorithms.fedavg import FedAvg
from fedmutual.algorithms.fedprox import FedProx
from fedmutual.algorithms.fml import FML
from fedmutual.algorithms.local import Independent, Local

REGISTRY: dict[str, type[Algorithm]] = {a.name: a for a in (FedAvg, FedProx, Local, Independent, FML, DFML, DFedAvg, DMLFL, AsyncFL)}

__all__ = ["Algorithm", "Context", "REGISTRY", "FedAvg", "FedProx", "FML", "Local", "Independent", "DFML", "DFedAvg", "DMLFL", "AsyncFL"]
