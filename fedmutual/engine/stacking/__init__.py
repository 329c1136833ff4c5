"""Stacked models: S identical ``nn.Sequential`` models run as one model with ``[S, ...]`` parameters.

Three layers, each importing only the ones before it:

- :mod:`~fedmutual.engine.stacking.analysis`: which models can be stacked
  (:func:`architecture`, the signature that equal models share), what the
  stacked forward costs per sample (:func:`trace`, :class:`Footprint`);
- :mod:`~fedmutual.engine.stacking.layers`: the stacked form of each layer and
  :class:`StackedModel`, which converts a group of models and writes the
  trained parameters and buffers back into them;
- :mod:`~fedmutual.engine.stacking.optim`: the members' SGD or Adam as one
  update on the stacked parameters (:func:`optimizer_spec`,
  :func:`stacked_optimizer`), their state read from and written back to the
  members' ``torch.optim`` optimizers.

Every member sees exactly the computation it would see alone; only the
floating-point summation order of the kernels differs. Anything that cannot be
expressed this way (other layer types, subclasses, hooks, shared parameters,
unsupported optimizer options) is reported as not stackable (``None``), and the
engine trains it with the plain loop.
"""

from fedmutual.engine.stacking.analysis import (
    ELEMENTWISE, IMG, POOLS, VEC, Footprint, Signature, architecture, flat_layers, has_batchnorm, trace,
)
from fedmutual.engine.stacking.layers import StackedModel
from fedmutual.engine.stacking.optim import (
    OptimSpec, StackedAdam, StackedOptimizer, StackedSGD, optimizer_spec, stacked_optimizer,
)

__all__ = [
    "ELEMENTWISE", "IMG", "POOLS", "VEC", "Footprint", "OptimSpec", "Signature", "StackedAdam", "StackedModel",
    "StackedOptimizer", "StackedSGD", "architecture", "flat_layers", "has_batchnorm", "optimizer_spec",
    "stacked_optimizer", "trace",
]
