"""fedmutual: federated mutual learning (FML, DFML, DML-FL) and its baselines on one engine.

    from fedmutual import Config, run
    result = run(Config(algorithm="fml", rounds=5, limit_train=5000))

Users extend it without editing it: ``register_algorithm``, ``register_model``, ``register_dataset`` and
``register_partition`` add entries that configs name, and import strings (``model = "mypkg.nets:Tiny"``)
work without registering.
"""

from typing import Any

from fedmutual.config import Config, build_config
from fedmutual.errors import ConfigError, DataError, FedmutualError, NonFiniteLossError
from fedmutual.registry import register_algorithm

__version__ = "0.1.0"


def run(config: Config, quiet: bool = False, data: Any = None, partition: Any = None):  # noqa: ANN201 - lazy import keeps `import fedmutual` light
    """Run one experiment; returns a RunResult (run_dir, metrics, summary).

    ``data``: a dataset from Python (:func:`fedmutual.data.from_arrays`) instead of the config's ``dataset``;
    ``partition``: each client's training indices instead of the config's ``partition``.
    """
    from fedmutual.experiment.runner import run as _run

    return _run(config, quiet=quiet, data=data, partition=partition)


def resume(run_dir: str, quiet: bool = False):  # noqa: ANN201
    """Continue an interrupted run from its newest checkpoint; returns a RunResult."""
    from fedmutual.experiment.runner import resume as _resume

    return _resume(run_dir, quiet=quiet)


def compare(config: Config, algorithms: list[str], quiet: bool = False, data: Any = None, partition: Any = None):  # noqa: ANN201
    """Run several algorithms on the same data and seed; returns a CompareResult."""
    from fedmutual.experiment.compare import compare as _compare

    return _compare(config, algorithms, quiet=quiet, data=data, partition=partition)


def load_runs(paths: Any) -> Any:
    """The runs under ``paths`` (run directories, or directories holding them) as a pandas DataFrame: one row per
    run, its summary joined with its config (``config.<dotted key>`` columns). Needs ``fedmutual[report]``."""
    from fedmutual.report.runs import load_runs as _load

    return _load([paths] if isinstance(paths, (str, bytes)) or hasattr(paths, "__fspath__") else paths)


def register_model(name: str, builder: Any, replace: bool = False) -> Any:
    """Register a model builder ``(input_shape, num_outputs) -> nn.Module`` under ``name`` (see fedmutual.models)."""
    from fedmutual.models import register_model as _register

    return _register(name, builder, replace=replace)


def register_dataset(name: str, loader: Any, replace: bool = False) -> Any:
    """Register a dataset (an ArrayDataset, or a loader ``(data_dir, download) -> ArrayDataset``) under ``name``."""
    from fedmutual.data import register_dataset as _register

    return _register(name, loader, replace=replace)


def register_partition(name: str, fn: Any, replace: bool = False) -> Any:
    """Register a partitioner ``(labels, num_clients, seed, arg) -> list of index arrays`` under ``name``."""
    from fedmutual.data import register_partition as _register

    return _register(name, fn, replace=replace)


__all__ = [
    "Config", "build_config", "run", "resume", "compare", "load_runs", "register_algorithm", "register_model", "register_dataset",
    "register_partition", "ConfigError", "DataError", "FedmutualError", "NonFiniteLossError",
]
