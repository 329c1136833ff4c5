"""Checkpoints: resumed runs equal uninterrupted ones; damaged checkpoints are refused and skipped; party states round-trip."""

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

from fedmutual.config import Config
from fedmutual.experiment import checkpoint
from fedmutual.experiment.checkpoint import CheckpointError, list_checkpoints, read
from fedmutual.experiment.data import prepare_data
from fedmutual.experiment.runner import build, evaluate, resume, run
from fedmutual.protocol import State
from fedmutual.protocol.state import StateError, dump, load
from fedmutual.registry import ALGORITHMS
from fedmutual.runtimes.faults import plan_round

TINY = dict(clients=4, limit_train=480, limit_test=200, rounds=3, model="mlp", batch_size=32, local_epochs=1,
            progress=False, threads=1, partition="shards:2")


def _untimed(path: Path) -> str:
    """metrics.jsonl with the timings blanked: everything else must match byte for byte."""
    return re.sub(r'"seconds": [0-9.e+-]+', '"seconds": _', path.read_text())


def _data(cfg: Config):
    """The run's data, prepared once and shared by the runs of a test (validation where the algorithm takes it from)."""
    return prepare_data(cfg, val_source=cfg.resolved_val_source())


def _interrupt_in_round(monkeypatch, algorithm: str, at: int) -> None:
    """Make round ``at`` (0-based) stop half-way, as Ctrl-C would: after training, before its metrics."""
    base = ALGORITHMS.get(algorithm)

    class Interrupted(base):  # type: ignore[misc, valid-type]
        def round(self, t, state, clients):
            out = yield from super().round(t, state, clients)
            if t == at:
                raise KeyboardInterrupt
            return out

    monkeypatch.setitem(ALGORITHMS._entries, algorithm, Interrupted)


EXTRA = {"dfml": {"dfml": {"participants": 3, "period": 2}}, "dfedavg": {"dfedavg": {"participants": 3}},
         "fml-partial": {"global_model": "lenet5:encoder"}}  # memes = a shared encoder + per-client heads


@pytest.mark.parametrize("case", sorted(ALGORITHMS.builtin_names()) + ["fml-partial"])
def test_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch, case):
    algorithm, extra = case.split("-")[0], EXTRA.get(case, {})
    cfg = Config(algorithm=algorithm, out=str(tmp_path), **TINY, **extra,
                 faults={"dropout": 0.2, "crash": 0.2}, attack={"kind": "nan", "clients": [1]})
    data = _data(cfg)
    full = run(cfg.model_copy(update={"name": "full"}), quiet=True, data=data)
    _interrupt_in_round(monkeypatch, algorithm, at=2)
    with pytest.raises(KeyboardInterrupt):
        run(cfg.model_copy(update={"name": "cut"}), quiet=True, data=data)
    monkeypatch.undo()
    cut = tmp_path / "cut"
    assert json.loads((cut / "summary.json").read_text())["status"] == "interrupted"
    assert [p.name for p in list_checkpoints(cut / "checkpoints")] == ["round-000002", "round-000001"]
    again = resume(cut, quiet=True, data=data)
    assert _untimed(cut / "metrics.jsonl") == _untimed(full.run_dir / "metrics.jsonl")
    assert again.summary["status"] == "completed" and again.summary["rounds_completed"] == 3


@pytest.fixture
def finished(tmp_path):
    """A finished FML run with checkpoints after rounds 2 and 3, and a pristine copy of its metrics."""
    cfg = Config(algorithm="fml", out=str(tmp_path), name="run", **TINY)
    data = _data(cfg)
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


def test_a_checkpoint_of_another_format_is_refused(finished):
    run_dir, _, _ = finished
    newest = run_dir / "checkpoints" / "round-000003"
    manifest = json.loads((newest / "manifest.json").read_text())
    (newest / "manifest.json").write_text(json.dumps({**manifest, "format": 1}))
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {newest} has format 1; this fedmutual reads format {checkpoint.FORMAT}")):
        read(newest)


def test_a_checkpoint_holds_one_state_per_party(finished):
    run_dir, _, _ = finished
    ck = read(run_dir / "checkpoints" / "round-000003")
    assert ck.rounds_done == 3 and ck.data["next_round"] == 3 and ck.data["format"] == checkpoint.FORMAT
    assert sorted(ck.data["parties"]) == ["client0", "client1", "client2", "client3", "server"]
    parties = {k.split("/")[1] for k in ck.tensors if k.startswith("party/")}
    assert parties == {"server", "client0", "client1", "client2", "client3"}
    assert "rng/torch" in ck.tensors and [r["round"] for r in ck.data["metrics"]] == [1, 2, 3]


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


def test_a_checkpoint_from_before_a_setting_existed_resumes_with_its_default(finished):
    """A run written before a config setting was added (its files lack the key) resumes: the setting takes its default."""
    run_dir, data, metrics = finished
    shutil.rmtree(list_checkpoints(run_dir / "checkpoints")[0])  # resume from round 2's checkpoint, as if the run stopped there
    d = list_checkpoints(run_dir / "checkpoints")[0]
    assert d.name.endswith("2")
    state = json.loads((d / "state.json").read_text())
    for key in ("eval_clients", "client_states"):
        del state["config"][key]
    (d / "state.json").write_text(json.dumps(state))
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["sha256"]["state.json"] = checkpoint._sha256(d / "state.json")
    (d / "manifest.json").write_text(json.dumps(manifest))
    cfg = json.loads((run_dir / "config.json").read_text())
    for key in ("eval_clients", "client_states"):
        del cfg[key]
    (run_dir / "config.json").write_text(json.dumps(cfg))
    res = resume(run_dir, quiet=True, data=data)
    assert _untimed(res.run_dir / "metrics.jsonl") == metrics


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


def _fail_checkpoint_of_round(monkeypatch, rounds_done: int) -> None:
    """Make the checkpoint write after round ``rounds_done`` fail as a full disk would."""
    real = checkpoint.write

    def write(directory, done, *args, **kwargs):
        if done == rounds_done:
            raise OSError(28, "No space left on device")
        return real(directory, done, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "write", write)


def test_a_failed_checkpoint_write_fails_the_run_and_keeps_what_it_finished(tmp_path, monkeypatch):
    cfg = Config(algorithm="fml", out=str(tmp_path), **TINY)
    data = _data(cfg)
    full = run(cfg.model_copy(update={"name": "full"}), quiet=True, data=data)
    _fail_checkpoint_of_round(monkeypatch, 2)
    with pytest.raises(OSError, match="No space left on device"):
        run(cfg.model_copy(update={"name": "disk"}), quiet=True, data=data)
    monkeypatch.undo()
    run_dir = tmp_path / "disk"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["error"] == "OSError: [Errno 28] No space left on device"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (full.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {k: v for k, v in rows[0].items() if k != "seconds"} == {k: v for k, v in expected[0].items() if k != "seconds"}
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["round-000001"]
    # the run continues from round 1's checkpoint as if it had never stopped
    again = resume(run_dir, quiet=True, data=data)
    assert _untimed(run_dir / "metrics.jsonl") == _untimed(full.run_dir / "metrics.jsonl")
    assert again.summary["status"] == "completed" and "error" not in again.summary


# ---------------------------------------------------------------- party states


def _make(*stream, name="mlp", outputs=None):
    """A tiny model whose weights depend on its stream, recording its recipe as RunSpec.new_model does."""
    torch.manual_seed(len(stream))
    m = nn.Linear(3, outputs or 2)
    m.fedmutual_init = {"stream": list(stream), "name": name, "outputs": outputs}
    return m


def _party() -> State:
    """A party's state at start: state of every supported kind; ``lazy`` fills with models made on demand."""
    model = _make("a")
    return State(model=model, opt=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), lazy={},
                 pair=(torch.zeros(2), [1, "x", None, 2.5]), flags=[False, False], count=0, cut=torch.zeros(3).numpy())


def test_a_party_state_round_trips_every_supported_kind():
    me = _party()
    me.model(torch.ones(4, 3)).sum().backward()
    me.opt.step()
    me.lazy[7] = _make("b")
    with torch.no_grad():
        me.lazy[7].weight.fill_(0.25)
    me.pair, me.flags, me.count = (torch.tensor([1.0, 2.0]), [3, "y", None, 0.5]), [True, False], 4
    me.cut[1] = 5.0
    tensors, tree = dump(me, "client0/")
    assert all(k.startswith("client0/") for k in tensors)
    tree = json.loads(json.dumps(tree))  # the tree is plain JSON, as a checkpoint stores it
    fresh = _party()
    model_before = fresh.model
    load(fresh, tensors, tree, _make, "client0/")
    assert fresh.model is model_before and torch.equal(fresh.model.weight, me.model.weight)
    buf = fresh.opt.state[fresh.model.weight]["momentum_buffer"]
    assert torch.equal(buf, me.opt.state[me.model.weight]["momentum_buffer"])
    assert fresh.opt.param_groups[0]["params"][0] is fresh.model.weight  # still optimizes the same module
    assert torch.equal(fresh.lazy[7].weight, torch.full((2, 3), 0.25))  # rebuilt from its recipe
    assert fresh.pair[1] == [3, "y", None, 0.5] and torch.equal(fresh.pair[0], torch.tensor([1.0, 2.0]))
    assert isinstance(fresh.pair, tuple) and fresh.flags == [True, False] and fresh.count == 4
    assert fresh.cut.tolist() == [0.0, 5.0, 0.0]


def test_unsupported_state_is_refused_with_the_way_out():
    with pytest.raises(StateError, match=r"cannot capture client0/handle of type object: keep a party's state in modules, "
                                         r"optimizers, tensors, lists, dicts or JSON values"):
        dump(State(handle=object()), "client0/")
    with pytest.raises(StateError, match=r"cannot capture server/peers: dict keys must be str or int, found \(1, 2\)"):
        dump(State(peers={(1, 2): 3}), "server/")
    orphan = State(lazy={3: nn.Linear(3, 2)})  # made without RunSpec.new_model: no recipe
    tensors, tree = dump(orphan)
    with pytest.raises(StateError, match=r"saved state has a model at lazy/3 that the party did not create at start, "
                                         r"and it was not made with RunSpec.new_model"):
        load(State(lazy={}), tensors, tree, _make)


def _dumped(b):
    tensors, tree = b.runtime.dump()
    return {k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(tree))


def test_the_runtime_dump_restores_every_party_onto_a_fresh_build():
    cfg = Config(algorithm="fml", **TINY)
    data = _data(cfg)
    a = build(cfg, data, log=lambda _: None)
    a.runtime.setup()
    a.runtime.run_round(0, list(range(cfg.clients)), plan_round(cfg, 0, list(range(cfg.clients))))
    tensors, tree = _dumped(a)
    assert sorted(tree) == ["client0", "client1", "client2", "client3", "server"]
    b = build(cfg, data, log=lambda _: None)
    assert any(not torch.equal(v, tensors[k]) for k, v in _dumped(b)[0].items())  # a fresh build differs
    b.runtime.load(tensors, tree)
    again, again_tree = _dumped(b)
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors) and again_tree == tree
    assert evaluate(a, cfg) == evaluate(b, cfg)
    # both continue alike: round 2 from the restored states equals round 2 from the original ones
    for x in (a, b):
        torch.manual_seed(0)
        x.runtime.run_round(1, list(range(cfg.clients)), plan_round(cfg, 1, list(range(cfg.clients))))
    after_a, after_b = _dumped(a)[0], _dumped(b)[0]
    assert all(torch.equal(after_a[k], after_b[k]) for k in after_a)


def test_the_runtime_refuses_a_party_state_it_cannot_capture():
    cfg = Config(algorithm="local", **TINY)
    b = build(cfg, _data(cfg), log=lambda _: None)
    b.runtime.client_state(2).handle = object()
    with pytest.raises(StateError, match=r"cannot capture client2/handle of type object"):
        b.runtime.dump()


@pytest.mark.slow
def test_kill_mid_round_and_resume_gives_the_uninterrupted_metrics(tmp_path):
    """A real `fedmutual run` process is SIGKILLed in the middle of round 3, then resumed with --resume."""
    args = ["--algorithm", "fml", "--clients", "4", "--limit-train", "2400", "--limit-test", "300", "--model", "mlp",
            "--rounds", "4", "--local-epochs", "2", "--batch-size", "16", "--threads", "1", "--out", str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
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
