"""One short file per algorithm; importing this package registers the built-in ones (in this order)."""

from fedmutual.algorithms.fedavg import FedAvg
from fedmutual.algorithms.fedprox import FedProx
from fedmutual.algorithms.local import Independent, Local
from fedmutual.algorithms.fml import FML
from fedmutual.algorithms.dfml import DFML
from fedmutual.algorithms.dfedavg import DFedAvg
from fedmutual.algorithms.dmlfl import DMLFL
from fedmutual.algorithms.asyncfl import AsyncFL

__all__ = ["AsyncFL", "DFML", "DFedAvg", "DMLFL", "FML", "FedAvg", "FedProx", "Independent", "Local"]
