"""Clients' states on disk between rounds: the same metrics as in memory, states written back, resumable runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmutual import Config, run
from fedmutual.experiment.runner import build, resume
from fedmutual.runtimes.ondisk import OnDisk

BASE = dict(clients=6, rounds=3, limit_train=600, limit_test=200, batch_size=32, threads=1, progress=False)


def _rows(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in metrics]


@pytest.mark.parametrize("over", [dict(algorithm="fml", sample_fraction=0.5),  # a server coordinates
                                  dict(algorithm="dfml", model="mlp,lenet5"),  # a client coordinates: its state is open
                                  dict(algorithm="fedavg", faults={"crash": 0.3})])  # a crash leaves a half-trained state
def test_states_on_disk_give_the_metrics_of_states_in_memory(tmp_path: Path, over: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    memory = run(Config(**BASE, **over, out=str(tmp_path), name="memory"), quiet=True)
    reads = []
    real = OnDisk._read
    monkeypatch.setattr(OnDisk, "_read", lambda self, k: reads.append(k) or real(self, k))
    disk = run(Config(**BASE, **over, client_states="disk", out=str(tmp_path), name="disk"), quiet=True)
    assert _rows(disk.metrics) == _rows(memory.metrics)
    assert len(reads) >= 6  # the states came from their files


def test_only_the_rounds_clients_are_in_memory_and_the_files_hold_every_state(tmp_path: Path) -> None:
    cfg = Config(**BASE, algorithm="fml", sample_fraction=0.5)
    b = build(cfg, runtime=lambda *a, **k: OnDisk(*a, **k, directory=tmp_path / "states"))
    rt = b.runtime
    assert isinstance(rt, OnDisk) and sorted(p.name for p in (tmp_path / "states").iterdir()) == [f"client{k}.safetensors" for k in range(6)]
    before = {k: (tmp_path / "states" / f"client{k}.safetensors").read_bytes() for k in range(6)}
    rt.setup()
    sampled = b.alg.sample(0)
    from fedmutual.runtimes.faults import plan_round

    rt.run_round(0, sampled, plan_round(cfg, 0, sampled))
    assert rt._open == {}  # every state went back to its file
    after = {k: (tmp_path / "states" / f"client{k}.safetensors").read_bytes() for k in range(6)}
    assert {k for k in range(6) if after[k] != before[k]} == set(sampled)  # the participants' states changed
    assert rt.bytes_on_disk() == sum(len(v) for v in after.values())


def test_a_run_with_states_on_disk_resumes_from_its_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = dict(**BASE, algorithm="fml", client_states="disk", out=str(tmp_path))
    whole = run(Config(**cfg, name="whole"), quiet=True)
    from fedmutual.experiment import runner

    real = runner.evaluate
    calls = []

    def stop_in_round_2(b, c, t=0, last=True):  # an interruption after round 1's checkpoint
        calls.append(t)
        if t == 1:
            raise KeyboardInterrupt
        return real(b, c, t, last)

    monkeypatch.setattr(runner, "evaluate", stop_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        run(Config(**cfg, name="cut"), quiet=True)
    monkeypatch.setattr(runner, "evaluate", real)
    resumed = resume(tmp_path / "cut", quiet=True)
    assert _rows(resumed.metrics) == _rows(whole.metrics)
