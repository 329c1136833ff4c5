"""Every algorithm gives the same metrics when no Python object is shared between its parties.

The isolation runtime serializes every party's state between calls and every message (see
``fedmutual.runtimes.isolated``); the runs are the golden scenarios of ``tests/golden``, whose recorded
metrics come from the in-process runtime. Both runtimes run the same kernels in the same order, so on the
recording's kernels the metrics must be identical apart from ``seconds``; elsewhere, where a kernel's rounding
might depend on a tensor's place in memory, the golden test's bounds apply.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "golden"))
sys.path.insert(0, str(Path(__file__).parents[1]))
import scenarios  # noqa: E402
from test_golden import SAME_KERNELS, compare_rows  # noqa: E402

from fedmutual import Config  # noqa: E402
from fedmutual.experiment.runner import run  # noqa: E402
from fedmutual.runtimes.inprocess import InProcess  # noqa: E402
from fedmutual.runtimes.isolated import Isolated  # noqa: E402


@pytest.mark.parametrize("name", list(scenarios.SCENARIOS))
def test_isolated_runtime_equals_in_process(name: str, tmp_path: Path) -> None:
    cfg = scenarios.config(name, "stacked", str(tmp_path))
    alone = run(Config(**{**cfg, "name": "isolated"}), quiet=True, runtime=Isolated)
    shared = run(Config(**{**cfg, "name": "in-process"}), quiet=True, runtime=InProcess)
    a, b = scenarios.without_seconds(alone.metrics), scenarios.without_seconds(shared.metrics)
    if SAME_KERNELS:
        assert a == b, [k for ra, rb in zip(a, b) for k in ra if ra[k] != rb.get(k)]
    else:  # kernels whose rounding may depend on where a tensor lies in memory: the golden bounds
        val_sizes = json.loads((shared.run_dir / "partition.json").read_text())["val_sizes"]
        assert not compare_rows(name, a, b, val_sizes, cfg["limit_test"])
