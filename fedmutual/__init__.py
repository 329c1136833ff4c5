"""fedmutual: federated mutual learning (FML, DFML, DML-FL) and its baselines on one engine.

    from fedmutual import Config, run
    result = run(Config(algorithm="fml", rounds=5, limit_train=5000))
"""

from fedmutual.config import Config, build_config
from fedmutual.errors import ConfigError, DataError, FedmutualError, NonFiniteLossError

__version__ = "0.1.0"


def run(config: Config, quiet: bool = False):  # noqa: ANN201 - lazy import keeps `import fedmutual` light
    """Run one experiment; returns a RunResult (run_dir, metrics, summary)."""
    from fedmutual.engine.runner import run as _run

    return _run(config, quiet=quiet)


def compare(config: Config, algorithms: list[str], quiet: bool = False):  # noqa: ANN201
    """Run several algorithms on the same data and seed; returns a CompareResult."""
    from fedmutual.engine.compare import compare as _compare

    return _compare(config, algorithms, quiet=quiet)


__all__ = ["Config", "build_config", "run", "compare", "ConfigError", "DataError", "FedmutualError", "NonFiniteLossError"]
