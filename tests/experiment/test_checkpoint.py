"""Checkpoints: resumed runs equal uninterrupted ones; damaged checkpoints are refused and skipped."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from fedmutual.algorithms import REGISTRY
from fedmutual.checkpoint import CheckpointError, capture_attrs, list_checkpoints, read, restore_attrs
from fedmutual.config import Config
from fedmutual.engine.runner import prepare_data, resume, run

TINY = dict(clients=4, limit_train=480, limit_test=200, rounds=3, model="mlp", batch_size=32, local_epochs=1,
            progress=False, threads=1, partition="shards:2")


def _untimed(path: Path) -> str:
    """metrics.jsonl with the timings blanked: everything else must match byte for byte."""
    return re.sub(r'"seconds": [0-9.e+-]+', '"seconds": _', path.read_text())


def _interrupt_in_round(monkeypatch, algorithm: str, at: int) -> None:
    """Make round ``at`` (0-based) stop half-way, as Ctrl-C would: after training, before its metrics."""
    base = REGISTRY[algorithm]

    class Interrupted(base):  # type: ignore[misc, valid-type]
        def round(self, t, participants):
            out = super().round(t, participants)
            if t == at:
                raise KeyboardInterrupt
            return out

    monkeypatch.setitem(REGISTRY, algorithm, Interrupted)


EXTRA = {"dfml": {"dfml": {"participants": 3, "period": 2}}, "dfedavg": {"dfedavg": {"participants": 3}},
         "fml-partial": {"global_model": "lenet5:encoder"}}  # memes = a shared encoder + per-client heads


@pytest.mark.parametrize("case", sorted(REGISTRY) + ["fml-partial"])
def test_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch, case):
    algorithm, extra = case.split("-")[0], EXTRA.get(case, {})
    cfg = Config(algorithm=algorithm, out=str(tmp_path), **TINY, **extra,
                 faults={"dropout": 0.2, "crash": 0.2}, attack={"kind": "nan", "clients": [1]})
    data = prepare_data(cfg)
    full = run(cfg.model_copy(update={"name": "full"}), quiet=True, data=data)
    _interrupt_in_round(monkeypatch, algorithm, at=2)
    with pytest.raises(KeyboardInterrupt):
        run(cfg.model_copy(update={"name": "cut"}), quiet=True, data=data)
    monkeypatch.undo()
    cut = tmp_path / "cut"
    assert [p.name for p in list_checkpoints(cut / "checkpoints")] == ["round-000002", "round-000001"]
    again = resume(cut, quiet=True, data=data)
    assert _untimed(cut / "metrics.jsonl") == _untimed(full.run_dir / "metrics.jsonl")
    assert again.summary["status"] == "completed" and again.summary["rounds_completed"] == 3


@pytest.fixture
def finished(tmp_path):
    """A finished FML run with checkpoints after rounds 2 and 3, and a pristine copy of its metrics."""
    cfg = Config(algorithm="fml", out=str(tmp_path), name="run", **TINY)
    data = prepare_data(cfg)
    res = run(cfg, quiet=True, data=data)
    return res.run_dir, data, _untimed(res.run_dir / "metrics.jsonl")


@pytest.mark.parametrize("damage, reason", [
    (lambda d: (d / "state.safetensors").write_bytes((d / "state.safetensors").read_bytes()[:-100]),
     "state.safetensors does not match its checksum in manifest.json (truncated or modified)"),
    (lambda d: (d / "state.json").write_text((d / "state.json").read_text().replace('"round": 3', '"round": 4')),
     "state.json does not match its checksum in manifest.json (truncated or modified)"),
    (lambda d: (d / "manifest.json").unlink(), "has no manifest.json (it was not completely written)"),
    (lambda d: (d / "manifest.json").write_text("{"), "manifest.json is damaged"),
    (lambda d: (d / "state.json").unlink(), "is missing state.json"),
])
def test_a_damaged_checkpoint_is_named_and_the_previous_one_is_used(finished, capsys, damage, reason):
    run_dir, data, expected = finished
    newest = run_dir / "checkpoints" / "round-000003"
    damage(newest)
    with pytest.raises(CheckpointError, match=re.escape(reason)):
        read(newest)
    res = resume(run_dir, quiet=False, data=data)
    err = capsys.readouterr().err
    assert f"checkpoint {newest}" in err and reason in err and "falling back to the previous checkpoint" in err
    assert "resuming" in err and "after round 2 of 3 (round-000002)" in err
    assert _untimed(run_dir / "metrics.jsonl") == expected and res.summary["rounds_completed"] == 3


def test_no_usable_checkpoint_is_an_error_listing_each(finished):
    run_dir, data, _ = finished
    for d in list_checkpoints(run_dir / "checkpoints"):
        (d / "state.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint: checkpoint .*round-000003: state.safetensors does not match .*; "
                                              r"checkpoint .*round-000002: state.safetensors does not match"):
        resume(run_dir, quiet=True, data=data)


def test_an_edited_config_is_refused(finished):
    run_dir, data, _ = finished
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["lr"] = 0.5
    (run_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json differs from the config of checkpoint round-000003 in: lr; restore config.json"):
        resume(run_dir, quiet=True)


def test_resume_needs_a_run_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"not a run directory \(it has no config.json\)"):
        resume(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        resume(tmp_path)


def test_a_run_killed_before_its_first_checkpoint_starts_over(finished):
    run_dir, data, expected = finished
    shutil.rmtree(run_dir / "checkpoints")
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / ".round-000001.tmp-123").mkdir()  # a write cut short
    resume(run_dir, quiet=True, data=data)
    assert _untimed(run_dir / "metrics.jsonl") == expected
    assert not (run_dir / "checkpoints" / ".round-000001.tmp-123").exists()


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    res = run(Config(algorithm="local", out=str(tmp_path), **{**TINY, "rounds": 5}, checkpoint_keep=3, checkpoint_every=2), quiet=True)
    # every 2nd round and always the last
    assert [p.name for p in list_checkpoints(res.run_dir / "checkpoints")] == ["round-000005", "round-000004", "round-000002"]


class _Holder:
    """An object with state of every supported kind, some created on demand."""

    def __init__(self, make):
        self.model = make("a")
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.lazy: dict[int, nn.Module] = {}
        self.pair = (torch.zeros(2), [1, "x", None, 2.5])
        self.flags = [False, False]
        self.count = 0


def test_generic_capture_round_trips_every_supported_kind():
    def make(*stream, name="mlp", outputs=None):
        torch.manual_seed(len(stream))
        m = nn.Linear(3, outputs or 2)
        m.fedmutual_init = {"stream": list(stream), "name": name, "outputs": outputs}
        return m

    h = _Holder(make)
    h.model(torch.ones(4, 3)).sum().backward()
    h.opt.step()
    h.lazy[7] = make("b")
    with torch.no_grad():
        h.lazy[7].weight.fill_(0.25)
    h.pair, h.flags, h.count = (torch.tensor([1.0, 2.0]), [3, "y", None, 0.5]), [True, False], 4
    tensors, tree = capture_attrs(h, set())
    json.dumps(tree)  # the tree is plain JSON
    fresh = _Holder(make)
    restore_attrs(fresh, tensors, tree, make)
    assert torch.equal(fresh.model.weight, h.model.weight)
    buf = fresh.opt.state[fresh.model.weight]["momentum_buffer"]
    assert torch.equal(buf, h.opt.state[h.model.weight]["momentum_buffer"])
    assert fresh.opt.param_groups[0]["params"][0] is fresh.model.weight  # still optimizes the same module
    assert torch.equal(fresh.lazy[7].weight, torch.full((2, 3), 0.25))  # rebuilt with ctx.new_model's recipe
    assert fresh.pair[1] == [3, "y", None, 0.5] and torch.equal(fresh.pair[0], torch.tensor([1.0, 2.0]))
    assert fresh.flags == [True, False] and fresh.count == 4


def test_unsupported_state_is_refused_with_the_way_out():
    class Odd:
        def __init__(self):
            self.handle = object()

    with pytest.raises(CheckpointError, match=r"cannot checkpoint alg/handle of type object: .* name the attribute in the algorithm's "
                                              r"`transient`, or override Algorithm.state\(\) and load_state\(\)"):
        capture_attrs(Odd(), set())


@pytest.mark.slow
def test_kill_mid_round_and_resume_gives_the_uninterrupted_metrics(tmp_path):
    """A real `fedmutual run` process is SIGKILLed in the middle of round 3, then resumed with --resume."""
    args = ["--algorithm", "fml", "--clients", "4", "--limit-train", "2400", "--limit-test", "300", "--model", "mlp",
            "--rounds", "4", "--local-epochs", "2", "--batch-size", "16", "--threads", "1", "--out", str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = [sys.executable, "-m", "fedmutual", "run", *args]
    proc = subprocess.Popen([*cmd, "--name", "killed", "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run_dir = tmp_path / "killed"
    for _ in range(24_000):  # a hang guard (at most about 4 minutes of polling), not a speed check
        if (run_dir / "checkpoints" / "round-000002").exists():
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.01)
    else:
        proc.kill()
        pytest.fail("the run never wrote the checkpoint of round 2")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    time.sleep(0.5 * rows[-1]["seconds"])  # half-way through round 3
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2  # round 3 never finished
    assert not (run_dir / "summary.json").exists()

    resumed = subprocess.run([sys.executable, "-m", "fedmutual", "run", "--resume", str(run_dir)], env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr and "after round 2 of 4" in resumed.stderr
    full = subprocess.run([*cmd, "--name", "full", "--no-progress"], env=env, capture_output=True, text=True, timeout=240)
    assert full.returncode == 0, full.stderr
    assert _untimed(run_dir / "metrics.jsonl") == _untimed(tmp_path / "full" / "metrics.jsonl")
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
