"""Every algorithm reproduces the metrics recorded in ``tests/golden`` (see ``tests/golden/scenarios.py``).

On a machine with the recording's torch version and CPU kernels (``environment.json``) the rows must be
identical apart from ``seconds``: every draw is seeded and every kernel is deterministic. Elsewhere the float
kernels differ (AVX2 against AVX-512 sum in other orders), so accuracies may move by a few test samples and
losses by float rounding grown over a few dozen SGD steps; the integers (rounds, participants, faults, bytes)
must still be exact, because they depend on shapes and seeds only.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "golden"))
import scenarios  # noqa: E402

from fedmutual import Config, run  # noqa: E402

SAME_KERNELS = json.loads((scenarios.HERE / "environment.json").read_text()) == scenarios.environment()
ACC_TOL = 4 / 200  # four of the 200 test samples: predictions at a near-tie can flip under other rounding
LOSS_RTOL = 1e-3


def _close(a: object, b: object, key: str) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, key) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], key) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return abs(a - b) <= (ACC_TOL if "acc" in key else LOSS_RTOL * max(abs(a), abs(b), 1e-12))
    return a == b


@pytest.mark.parametrize("engine", scenarios.ENGINES)
@pytest.mark.parametrize("name", list(scenarios.SCENARIOS))
def test_golden_metrics(name: str, engine: str, tmp_path: Path) -> None:
    expected = [json.loads(line) for line in scenarios.golden_path(name, engine).read_text().splitlines()]
    got = scenarios.without_seconds(run(Config(**scenarios.config(name, engine, str(tmp_path))), quiet=True).metrics)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        if SAME_KERNELS:
            assert g == e, f"round {e['round']}: " + ", ".join(k for k in e.keys() | g.keys() if g.get(k) != e.get(k))
        else:
            assert g.keys() == e.keys()
            bad = [k for k in e if not _close(g[k], e[k], k)]
            assert not bad, f"round {e['round']}: {bad}"
