"""Phase timing: off by default, and when on, every part of a round lands in its phase."""

from __future__ import annotations

from pathlib import Path

from fedmutual import Config, run
from fedmutual.engine import phases
from fedmutual.engine.phases import phase, timing


def test_phases_are_off_by_default_and_nest_when_on() -> None:
    with phase("x"):
        pass
    assert phases._seconds is None
    with timing() as t:
        with phase("outer"):
            with phase("outer.inner"):
                sum(range(10_000))
    assert set(t) == {"outer", "outer.inner"} and t["outer"] >= t["outer.inner"] > 0
    assert phases._seconds is None  # restored


def test_a_round_is_broken_down_into_training_evaluation_messages_and_checkpoints(tmp_path: Path) -> None:
    cfg = Config(algorithm="fml", clients=3, rounds=2, limit_train=300, limit_test=100, batch_size=32, threads=1,
                 progress=False, out=str(tmp_path))
    with timing() as t:
        res = run(cfg, quiet=True)
    assert {"train", "train.step", "train.gather", "train.stack", "train.write_back", "eval", "eval.test", "eval.val",
            "messages", "checkpoint", "metrics"} <= set(t)
    assert t["train"] >= t["train.step"] + t["train.gather"] and t["eval"] >= t["eval.test"]
    assert sum(r["seconds"] for r in res.metrics) >= t["train"] + t["eval"]
