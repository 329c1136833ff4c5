"""Every algorithm reproduces the metrics recorded in ``tests/golden`` (see ``tests/golden/scenarios.py``).

On a machine with the recording's torch version and CPU kernels (``environment.json``) the rows must be
identical apart from ``seconds``: every draw is seeded and every kernel is deterministic. Elsewhere the float
kernels differ (AVX2 against AVX-512 sum in other orders), so accuracies may move by a few test samples and
losses by float rounding grown over a few dozen SGD steps; the integers (rounds, participants, faults, bytes)
must still be exact, because they depend on shapes and seeds only. In a scenario whose attack drives training
far off (``scenarios.CHAOTIC``) rounding is amplified too much for any float bound, so only those are compared.
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
FLIPS = 4  # predictions at a near-tie that other rounding may flip, per evaluated set
LOSS_RTOL = 1e-3  # float32 rounding (~1e-7) grown over a few dozen SGD steps stays far below this
EXACT = ("round", "participants", "faults", "bytes_up", "bytes_down", "bytes_up_per_client", "bytes_down_per_client")


def _acc_tol(key: str, val_sizes: list[int], test_size: int) -> float | list[float]:
    """How far an accuracy may move when FLIPS predictions flip: relative to the set it was measured on."""
    if key.startswith("personal_acc") or key == "val_acc_mean":
        per_client = [FLIPS / max(n, 1) for n in val_sizes]
        return per_client if key == "personal_acc" else max(per_client)
    return FLIPS / test_size


def _close(a: object, b: object, key: str, tol: float | list[float]) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        tols = tol if isinstance(tol, list) else [tol] * len(a)
        return len(a) == len(b) == len(tols) and all(_close(x, y, key, t) for x, y, t in zip(a, b, tols))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], key, tol) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        limit = max(tol) if isinstance(tol, list) else tol
        return abs(a - b) <= (limit + 1e-12 if "acc" in key else LOSS_RTOL * max(abs(a), abs(b), 1e-12))
    return a == b


def compare_rows(name: str, got: list[dict], expected: list[dict], val_sizes: list[int], test_size: int) -> list[tuple[int, str]]:
    """The (round, key) pairs where ``got`` is not within the foreign-kernel bounds of ``expected``."""
    bad = []
    for g, e in zip(got, expected):
        keys = EXACT if name in scenarios.CHAOTIC else list(e)
        bad += [(e["round"], k) for k in keys if g.keys() != e.keys() or not _close(g[k], e[k], k, _acc_tol(k, val_sizes, test_size))]
    return bad


@pytest.mark.parametrize("engine", scenarios.ENGINES)
@pytest.mark.parametrize("name", list(scenarios.SCENARIOS))
def test_golden_metrics(name: str, engine: str, tmp_path: Path) -> None:
    expected = [json.loads(line) for line in scenarios.golden_path(name, engine).read_text().splitlines()]
    cfg = scenarios.config(name, engine, str(tmp_path))
    result = run(Config(**cfg), quiet=True)
    got = scenarios.without_seconds(result.metrics)
    assert len(got) == len(expected)
    if SAME_KERNELS:
        for g, e in zip(got, expected):
            assert g == e, f"round {e['round']}: " + ", ".join(k for k in e.keys() | g.keys() if g.get(k) != e.get(k))
    else:
        val_sizes = json.loads((result.run_dir / "partition.json").read_text())["val_sizes"]
        assert not compare_rows(name, got, expected, val_sizes, cfg["limit_test"])


def test_the_foreign_kernel_bounds_accept_other_rounding_and_refuse_other_results() -> None:
    """The loop and stacked engines round differently on one machine, as other CPUs do: the bounds must accept
    one engine's goldens against the other's (where the runs draw the same random numbers: no dropout model), and
    refuse them against another scenario's."""
    from fedmutual.experiment.data import prepare_data

    def val_sizes(name: str) -> list[int]:
        cfg = Config(**scenarios.config(name, "loop", "unused"))
        return [len(v) for v in prepare_data(cfg, val_source=cfg.resolved_val_source()).val]

    def rows(name: str, engine: str) -> list[dict]:
        return [json.loads(x) for x in scenarios.golden_path(name, engine).read_text().splitlines()]

    for name in ("fedavg", "fml", "fml-mh", "dfml", "dmlfl", "fedprox", "local"):
        assert not compare_rows(name, rows(name, "stacked"), rows(name, "loop"), val_sizes(name), 200), name
    assert compare_rows("fedavg", rows("fedprox", "loop"), rows("fedavg", "loop"), val_sizes("fedavg"), 200)
