"""The experiment: data, parties, the round loop on the in-process runtime, evaluation and the run directory."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from fedmutual.config import Config, validate
from fedmutual.data import ArrayDataset
from fedmutual.data.folds import RoundData, load_public_dataset
from fedmutual.engine.cohort import accuracy
from fedmutual.engine.evaluation import own_accuracies, shared_accuracies
from fedmutual.engine.phases import phase
from fedmutual.engine.setup import configure_threads, resolve_device
from fedmutual.errors import DataError, FedmutualError, NonFiniteLossError
from fedmutual.experiment import checkpoint
from fedmutual.experiment.checkpoint import CheckpointError
from fedmutual.experiment.data import Prepared, client_data, client_tasks, partition_record, prepare_data, recorded_fields
from fedmutual.protocol import Algorithm, ClientData, RunSpec
from fedmutual.registry import ALGORITHMS
from fedmutual.report.metrics import MetricsWriter, summarize, write_json
from fedmutual.report.plots import plot_run
from fedmutual.report.tables import markdown_table, summary_rows
from fedmutual.runtimes.faults import RoundEvents, plan_round
from fedmutual.runtimes.inprocess import InProcess, client_envs, party_name
from fedmutual.runtimes.ondisk import OnDisk
from fedmutual.seeding import derive_seed, numpy_rng


@dataclass
class RunResult:
    """What a finished run returns: its directory, its per-round metrics and its summary."""

    run_dir: Path
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]


@dataclass
class Built:
    """A run ready to start: its data, its algorithm, the runtime holding every party, and the test set."""

    data: Prepared
    alg: Algorithm
    runtime: InProcess
    clients: list[ClientData]
    test_x: torch.Tensor
    test_y: torch.Tensor


@dataclass
class Parties:
    """What every party of a run derives alike from the config: the data, the algorithm and each client's data."""

    data: Prepared
    alg: Algorithm
    clients: list[ClientData]
    test_x: torch.Tensor
    test_y: torch.Tensor


def prepare_run(cfg: Config, data: Prepared | ArrayDataset | None = None, partition: Sequence[np.ndarray] | None = None) -> Parties:
    """The run's data, split among its clients, and its algorithm; every refusal of the config or the data happens here."""
    device = resolve_device(cfg.device)
    alg_cls = cfg.algorithm_class()
    if isinstance(data, Prepared):
        prepared = data
    else:
        prepared = prepare_data(cfg, data, partition, cfg.resolved_val_source())
    ds = prepared.dataset
    allowed = [n for n in ALGORITHMS.names() if ALGORITHMS.get(n).client_tasks]
    task, clients = client_data(prepared, client_tasks(cfg, ds.num_classes, alg_cls.client_tasks, allowed), device)
    test_x = clients[0].test_x  # the test set under the run's task, for a global model
    assert test_x is not None
    test_y = clients[0].test_y if task == clients[0].task else task.apply(prepared.test_y).to(device)
    assert test_y is not None
    rounds = None
    if cfg.local_data == "folds" or alg_cls.carves_public:
        p = cfg.public
        external = None
        if p.dataset is not None:
            external = load_public_dataset(p.dataset, cfg.data_dir, cfg.download, ds.input_shape, p.labels, device, task)
        rounds = RoundData([(c.x, c.y) for c in clients], cfg.seed, cfg.local_data == "folds", p.mode == "dynamic",
                           p.size, carve=True, external=external)
    spec = RunSpec(cfg, ds.input_shape, task.num_classes, device, task, [c.task for c in clients], alg_cls.name, rounds)
    return Parties(prepared, alg_cls(spec), clients, test_x, test_y)


def build(cfg: Config, data: Prepared | ArrayDataset | None = None, partition: Sequence[np.ndarray] | None = None,
          log: Callable[[str], None] | None = None, runtime: Callable[..., InProcess] = InProcess) -> Built:
    """Everything a run needs before its directory exists: :func:`prepare_run` and the runtime holding its parties."""
    p = prepare_run(cfg, data, partition)
    if runtime is InProcess and cfg.client_states == "disk":
        runtime = OnDisk
    rt = runtime(p.alg, client_envs(p.alg, p.clients), log=log)
    return Built(p.data, p.alg, rt, p.clients, p.test_x, p.test_y)


def slug(text: str) -> str:
    """A short file-name-safe form of a config value (import strings and paths keep only their last name)."""
    text = text.rsplit("/", 1)[-1].rsplit(":", 1)[-1] if ("/" in text or "." in text.split(":", 1)[0]) else text
    return re.sub(r"[^A-Za-z0-9.+_-]+", "", text.replace(":", "")) or "x"


def _run_dir(cfg: Config) -> Path:
    base = Path(cfg.out)
    name = cfg.name or (f"{slug(cfg.algorithm)}-{slug(cfg.dataset)}-{slug(cfg.partition)}-{slug(cfg.model_label)}-s{cfg.seed}-"
                        f"{datetime.now():%Y%m%d-%H%M%S}")
    path, i = base / name, 1
    while path.exists():
        i += 1
        path = base / f"{name}-{i}"
    path.mkdir(parents=True)
    return path


def evaluated_clients(cfg: Config, t: int, last: bool) -> list[int]:
    """The clients whose models round t's evaluation measures: all of them when there are at most
    ``eval_clients`` (and at the last round), otherwise a sample of ``eval_clients`` drawn from the run seed and the
    round, so that runs with many clients are not dominated by evaluation."""
    k = cfg.clients
    if last or cfg.eval_clients is None or k <= cfg.eval_clients:
        return list(range(k))
    return sorted(int(i) for i in numpy_rng(cfg.seed, "evaluate", t).choice(k, cfg.eval_clients, replace=False))


def evaluate(b: Built, cfg: Config, t: int = 0, last: bool = True) -> dict[str, Any]:
    """global_acc, and each evaluated client's deployable model on the test set and on its validation split
    (:func:`evaluated_clients`; the others' entries are None, and ``evaluated_clients`` counts the measured ones)."""
    alg, rt, test_x, test_y, bs = b.alg, b.runtime, b.test_x, b.test_y, cfg.eval_batch_size
    with phase("eval"):
        server = rt.server_state()
        remote = rt.client_accuracies(server)
        if remote is not None:  # the clients' states live on their nodes, which measured them
            out = _assemble(alg.global_model(server), remote, test_x, test_y, bs)
        else:
            out = _evaluate_here(b, cfg, server, evaluated_clients(cfg, t, last))
        return out


EVAL_CHUNK = 128  # clients evaluated together: their states are in memory at once


def _merge_evaluations(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One evaluation from evaluations of disjoint groups of clients (each with None for the others' entries)."""
    per_client = []
    for k in range(len(parts[0]["client_acc_global_test"])):
        owner = next((p for p in parts if p["client_acc_global_test"][k] is not None or p["personal_acc"][k] is not None), parts[0])
        extra = {name[: -len("_acc_global_test")]: owner[name][k] for name in owner
                 if name.endswith("_acc_global_test") and name != "client_acc_global_test"}
        per_client.append({"test": owner["client_acc_global_test"][k], "val": owner["personal_acc"][k], "extra": extra})
    return assemble_accuracies(parts[0]["global_acc"], per_client)


def _evaluate_here(b: Built, cfg: Config, server: Any, chosen: list[int]) -> dict[str, Any]:
    """:func:`evaluate` on states held in this process: every chosen model on the shared test set in one call."""
    if len(chosen) > EVAL_CHUNK:  # a bounded number of clients' states at a time (they may come from disk)
        parts = [_evaluate_here(b, cfg, server, chosen[s : s + EVAL_CHUNK]) for s in range(0, len(chosen), EVAL_CHUNK)]
        return _merge_evaluations(parts)
    alg, rt, test_x, test_y, bs = b.alg, b.runtime, b.test_x, b.test_y, cfg.eval_batch_size
    states = {k: rt.client_state(k) for k in chosen}

    def shared(d: ClientData) -> bool:  # the client is tested on the run's test set under the run's task
        return d.test_y is None or d.test_y is test_y

    extras = {k: alg.extra_models(server, s) for k, s in states.items()}
    models = {k: alg.client_model(server, s) for k, s in states.items()}
    g = alg.global_model(server)
    on_test = [g] + [models[k] for k in chosen if shared(b.clients[k])]
    on_test += [m for k in chosen if shared(b.clients[k]) for m in extras[k].values()]
    listed = [m for m in on_test if m is not None]
    with phase("eval.test"):  # test accuracy per model object, stacked where it pays
        cache = dict(zip(map(id, listed), shared_accuracies(listed, test_x, test_y, bs, cfg.engine)))

    def client_test_acc(model: torch.nn.Module, d: ClientData) -> float:
        if not shared(d):
            assert d.test_x is not None and d.test_y is not None
            return accuracy(model, d.test_x, d.test_y, bs)
        if id(model) not in cache:
            cache[id(model)] = accuracy(model, test_x, test_y, bs)
        return cache[id(model)]

    with phase("eval.val"):  # each model on its client's validation split, stacked where it pays
        with_val = [k for k in chosen if b.clients[k].val_y.numel()]
        vals = dict(zip(with_val, own_accuracies([models[k] for k in with_val], [b.clients[k].val_x for k in with_val],
                                                 [b.clients[k].val_y for k in with_val], bs, cfg.engine)))
    per_client: list[dict[str, Any]] = []
    for k, d in enumerate(b.clients):
        if k not in states:
            per_client.append({"test": None, "val": None, "extra": {name: None for name in (extras[chosen[0]] if chosen else {})}})
            continue
        per_client.append({"test": client_test_acc(models[k], d), "val": vals.get(k),
                           "extra": {name: client_test_acc(m, d) for name, m in extras[k].items()}})
    return assemble_accuracies(cache[id(g)] if g is not None else None, per_client)


def _assemble(g: torch.nn.Module | None, per_client: list[dict[str, Any]], test_x: torch.Tensor, test_y: torch.Tensor,
              bs: int) -> dict[str, Any]:
    """:func:`evaluate`'s fields from each client's accuracies measured where its state lives (None: not measured)."""
    return assemble_accuracies(accuracy(g, test_x, test_y, bs) if g is not None else None, per_client)


def assemble_accuracies(global_acc: float | None, per_client: list[dict[str, Any]]) -> dict[str, Any]:
    """:func:`evaluate`'s fields from the global model's accuracy and each client's ``{"test", "val", "extra"}``
    accuracies (None: not measured)."""

    def mean(vals: list[float | None]) -> float | None:
        got = [v for v in vals if v is not None]
        return float(np.mean(got)) if got else None

    out: dict[str, Any] = {"global_acc": global_acc}
    out["client_acc_global_test"] = [c["test"] for c in per_client]
    out["personal_acc"] = [c["val"] for c in per_client]
    out["client_acc_global_test_mean"] = mean(out["client_acc_global_test"])
    out["personal_acc_mean"] = mean(out["personal_acc"])
    out["evaluated_clients"] = sum(c["test"] is not None or c["val"] is not None for c in per_client)
    names = list(dict.fromkeys(n for c in per_client for n in c["extra"]))
    for name in names:
        accs = [c["extra"].get(name) for c in per_client]
        out[f"{name}_acc_global_test"], out[f"{name}_acc_global_test_mean"] = accs, mean(accs)
    return out


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def run(cfg: Config, quiet: bool = False, data: Prepared | ArrayDataset | None = None,
        partition: Sequence[np.ndarray] | None = None, runtime: Callable[..., InProcess] = InProcess) -> RunResult:
    """Run one federated experiment end to end and write its run directory.

    ``data`` is a dataset from Python (e.g. :func:`fedmutual.data.from_arrays`) instead of the config's
    ``dataset``, or data prepared for the same data fields and seed (as ``compare`` does); ``partition`` gives
    each client's training indices instead of the config's ``partition``. ``config.json`` and
    ``partition.json`` record what was really used.

    Metrics are appended after every round and a checkpoint is written every ``checkpoint_every`` rounds, so
    an interrupted or failed run keeps everything it finished and :func:`resume` continues it. A run that
    fails records ``status: "failed"`` and the error in its summary, and raises. Nothing is written when the
    configuration or the data is refused. ``runtime`` drives the parties (the in-process runtime; tests use
    :class:`fedmutual.runtimes.isolated.Isolated`).
    """
    return _execute(cfg, quiet, data, partition, None, runtime)


def resume(run_dir: str | Path, quiet: bool = False, data: Prepared | ArrayDataset | None = None,
           runtime: Callable[..., InProcess] = InProcess) -> RunResult:
    """Continue the run in ``run_dir`` from its newest checkpoint that verifies.

    The config is the run's own ``config.json``; metrics of rounds after the checkpoint are
    dropped and recomputed, so the finished run's metrics equal an uninterrupted run's.
    """
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"--resume {run_dir}: not a run directory (it has no config.json)")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"--resume {run_dir}: config.json is not valid JSON ({e})") from None
    return _execute(validate(raw), quiet, data, None, run_dir, runtime)


def _execute(cfg: Config, quiet: bool, data: Prepared | ArrayDataset | None, partition: Sequence[np.ndarray] | None,
             resume_dir: Path | None, runtime: Callable[..., InProcess]) -> RunResult:
    threads = configure_threads(cfg.threads)
    torch.manual_seed(derive_seed(cfg.seed, "torch"))  # the global generator draws dropout masks
    b = build(cfg, data, partition, log=lambda m: _log(m, quiet), runtime=runtime)  # refuses a bad setting before anything is written
    rt, ds = b.runtime, b.data.dataset
    start, rows = 0, []
    if resume_dir is None:
        run_dir = _run_dir(cfg)
        record = partition_record(b.data)
        (run_dir / "partition.json").write_text(json.dumps(record) + "\n")
        fields = recorded_fields(b.data)
        if "partition" in fields:
            fields["partition"] = f"indices:{(run_dir / 'partition.json').resolve()}"
        if fields:  # data given from Python: the record names what the run really used
            cfg = validate({**cfg.to_dict(), **fields})
        write_json(run_dir / "config.json", cfg.to_dict())
        rt.setup()  # e.g. a common initialization; its messages count in round 1
    else:
        run_dir = resume_dir
        start, rows = _restore(run_dir, cfg, b, rt.log)
        if not start:
            rt.setup()
    _log(f"fedmutual: {cfg.algorithm} on {ds.name} ({len(b.data.train_y)} train / {len(b.data.test_y)} test, from {ds.source}), "
         f"{cfg.clients} clients, {cfg.partition}, {cfg.model_label}, {cfg.rounds} rounds, device {b.alg.run.device}, {threads} threads", quiet)

    writer = MetricsWriter(run_dir / "metrics.jsonl")
    writer.rows = rows
    show = cfg.progress and not quiet
    rounds_bar = tqdm(total=cfg.rounds, initial=start, desc="rounds", unit="round", disable=not show, file=sys.stderr, position=0)
    status, error = "completed", None
    try:
        for t in range(start, cfg.rounds):
            sampled = b.alg.sample(t)
            plan = plan_round(cfg, t, sampled)
            participants = [k for k in sampled if k not in plan.dropped]
            if plan.dropped:
                rt.log(f"fedmutual: round {t + 1}: client(s) {', '.join(map(str, plan.dropped))} dropped out")
            steps = rt.count_steps(t, participants)
            step_bar = tqdm(total=steps, desc=f"round {t + 1}", unit="step", leave=False, disable=not show, file=sys.stderr, position=1)
            rt.on_step = lambda: step_bar.update(1)
            start_time = time.perf_counter()
            if participants:
                stats = rt.run_round(t, participants, plan)
            else:
                stats, rt.events = {}, RoundEvents(dropped=list(plan.dropped), skipped=True)
                rt.log(f"fedmutual: round {t + 1}: every sampled client dropped out; the round is skipped")
            step_bar.close()
            sent, received = rt.traffic.reset()
            if rt.traffic.record:  # the messages themselves: who sent what to whom, tensor names, dtypes and shapes
                with open(run_dir / "messages.jsonl", "a") as f:
                    f.writelines(json.dumps({"round": t + 1, **m}) + "\n" for m in rt.traffic.take())
            row: dict[str, Any] = {"round": t + 1, "participants": participants}
            last = t + 1 == cfg.rounds
            if (t + 1) % cfg.eval_every == 0 or last:
                row.update(evaluate(b, cfg, t, last))
            else:
                row.update({"global_acc": None, "client_acc_global_test": None, "personal_acc": None, "evaluated_clients": 0})
            up = [sent.get(party_name(k), 0) for k in range(cfg.clients)]
            down = [received.get(party_name(k), 0) for k in range(cfg.clients)]
            row.update({"bytes_up": sum(up), "bytes_down": sum(down), "bytes_up_per_client": up, "bytes_down_per_client": down})
            row.update({k: float(v) for k, v in stats.items()})
            row["faults"] = rt.events.as_row()
            row["seconds"] = time.perf_counter() - start_time
            with phase("metrics"):
                writer.write(row)
            if cfg.checkpoint_every and ((t + 1) % cfg.checkpoint_every == 0 or last):
                with phase("checkpoint"):
                    _save_checkpoint(run_dir, cfg, b, writer.rows, t + 1)
            rounds_bar.set_postfix_str(_postfix(row))
            rounds_bar.update(1)
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except BaseException as e:  # every other failure is recorded, with its reason, before it propagates
        status, error = "failed", f"{type(e).__name__}: {e}" if not isinstance(e, NonFiniteLossError) else str(e)
        raise
    finally:
        rounds_bar.close()
        summary = summarize(writer.rows, status)
        if error is not None:
            summary["error"] = error
        write_json(run_dir / "summary.json", summary)
        if writer.rows:
            plot_run(writer.rows, run_dir / "accuracy.png", f"{cfg.algorithm} · {ds.name} · {cfg.partition} · {cfg.model_label}")
    if not quiet:
        header, table = summary_rows({cfg.algorithm: summary})
        print(markdown_table(header, table))
        print(f"run directory: {run_dir}")
    return RunResult(run_dir, writer.rows, summary)


def _partition_json(data: Prepared) -> dict[str, list[list[int]]]:
    return {"train": [p.tolist() for p in data.parts], "val": [v.tolist() for v in data.val]}


def _save_checkpoint(run_dir: Path, cfg: Config, b: Built, rows: list[dict[str, Any]], rounds_done: int) -> None:
    party_tensors, tree = b.runtime.dump()
    rng_tensors, rng_json = checkpoint.rng_state()
    checkpoint.write(run_dir / "checkpoints", rounds_done, {**{f"party/{k}": v for k, v in party_tensors.items()}, **rng_tensors}, {
        "config": cfg.to_dict(), "algorithm": cfg.algorithm, "parties": tree, "rng": rng_json,
        "metrics": rows, "partition": _partition_json(b.data), "next_round": rounds_done,
    }, cfg.checkpoint_keep)


def _restore(run_dir: Path, cfg: Config, b: Built, log: Any) -> tuple[int, list[dict[str, Any]]]:
    """Load the newest good checkpoint into ``alg`` and the RNGs; rewrite metrics.jsonl to match it."""
    directory = run_dir / "checkpoints"
    checkpoint.remove_partial(directory)
    ck = checkpoint.latest(directory, log)
    if ck is None:
        log(f"fedmutual: {run_dir} has no checkpoint yet; starting again from round 1")
        start, rows = 0, []
    else:
        saved = ck.data["config"]
        try:  # a setting added since the checkpoint was written takes its default on both sides
            saved = validate(saved).to_dict()
        except FedmutualError:
            pass
        if saved != cfg.to_dict():
            changed = sorted(k for k in set(saved) | set(cfg.to_dict()) if saved.get(k) != cfg.to_dict().get(k))
            raise CheckpointError(f"{run_dir}/config.json differs from the config of checkpoint {ck.path.name} in: {', '.join(changed)}; "
                                  "restore config.json or start a new run")
        if ck.data["partition"] != _partition_json(b.data):
            raise DataError(f"the dataset or its partition differs from the one checkpoint {ck.path} was trained on; "
                            "resume with the same dataset files")
        b.runtime.load({k.removeprefix("party/"): v for k, v in ck.tensors.items() if k.startswith("party/")}, ck.data["parties"])
        checkpoint.set_rng_state(ck.tensors, ck.data["rng"])
        start, rows = ck.rounds_done, ck.data["metrics"]
        log(f"fedmutual: resuming {run_dir} after round {start} of {cfg.rounds} ({ck.path.name})")
    metrics = run_dir / "metrics.jsonl"
    tmp = metrics.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, metrics)
    return start, rows


def _postfix(row: dict[str, Any]) -> str:
    parts = []
    if row.get("global_acc") is not None:
        parts.append(f"global {100 * row['global_acc']:.2f}%")
    if row.get("personal_acc_mean") is not None:
        parts.append(f"personal {100 * row['personal_acc_mean']:.2f}%")
    return ", ".join(parts)
