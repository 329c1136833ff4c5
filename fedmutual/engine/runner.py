"""The round loop: data, partition, algorithm, evaluation and the run directory."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fedmutual.algorithms import REGISTRY, Algorithm
from fedmutual.algorithms.base import ClientData, Context, client_name
from fedmutual import checkpoint
from fedmutual.checkpoint import CheckpointError
from fedmutual.config import Config, validate
from fedmutual.data import ArrayDataset, load_dataset, partition, stratified_subset, validation_splits
from fedmutual.data.tasks import Task, parse_task
from fedmutual.engine.cohort import accuracy, count_steps
from fedmutual.engine.evaluation import shared_accuracies
from fedmutual.engine.setup import configure_threads, resolve_device
from fedmutual.errors import ConfigError, DataError, NonFiniteLossError
from fedmutual.faults import plan_round
from fedmutual.report.metrics import MetricsWriter, summarize, write_json
from fedmutual.report.plots import plot_run
from fedmutual.report.tables import markdown_table, summary_rows
from fedmutual.seeding import derive_seed, numpy_rng
from fedmutual.transport import InProcessTransport


@dataclass
class RunResult:
    """What a finished run returns: its directory, its per-round metrics and its summary."""

    run_dir: Path
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]


@dataclass
class Prepared:
    """The data of a run, split among clients: a pure function of the config's data fields and seed."""

    dataset: ArrayDataset
    parts: list[np.ndarray]  # each client's training indices into train_x
    val: list[np.ndarray]  # each client's validation indices into test_x, or into train_x when val_on_train
    val_on_train: bool
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def prepare_data(cfg: Config) -> Prepared:
    """Load the dataset, take the seeded stratified limits, partition it and draw validation splits."""
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.download)
    tx, ty, vx, vy = ds.train_x, ds.train_y, ds.test_x, ds.test_y
    if cfg.limit_train is not None and cfg.limit_train < len(ty):
        idx = torch.from_numpy(stratified_subset(ty.numpy(), cfg.limit_train, cfg.seed))
        tx, ty = tx[idx], ty[idx]
    if cfg.limit_test is not None and cfg.limit_test < len(vy):
        idx = torch.from_numpy(stratified_subset(vy.numpy(), cfg.limit_test, cfg.seed + 1))
        vx, vy = vx[idx], vy[idx]
    if cfg.clients > len(ty):
        raise ConfigError(f"clients: {cfg.clients} clients but only {len(ty)} training samples; use fewer clients or more data")
    parts = partition(ty.numpy(), cfg.partition, cfg.clients, cfg.seed)
    if cfg.resolved_val_source() == "train":
        parts, val = holdout_splits(parts, cfg.val_fraction, cfg.seed)
        return Prepared(ds, parts, val, True, tx, ty, vx, vy)
    val = validation_splits(parts, ty.numpy(), vy.numpy(), ds.num_classes, cfg.val_size, cfg.seed)
    return Prepared(ds, parts, val, False, tx, ty, vx, vy)


def holdout_splits(parts: list[np.ndarray], fraction: float, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split each client's indices into train and validation (e.g. DFML's 80:20), seeded per client.

    A client keeps at least one training sample; its validation part has round(fraction·n) samples.
    """
    train, val = [], []
    for k, p in enumerate(parts):
        perm = numpy_rng(seed, "holdout", k).permutation(p)
        n_val = min(int(round(fraction * len(p))), len(p) - 1)
        train.append(np.sort(perm[n_val:]))
        val.append(np.sort(perm[:n_val]))
    return train, val


def client_tasks(cfg: Config, dataset_classes: int) -> list[Task]:
    """Each client's task, checked against the dataset; refused where the algorithm serves one task only."""
    tasks = [parse_task(spec, dataset_classes) for spec in cfg.task_specs()]
    if len(set(tasks)) > 1 and not REGISTRY[cfg.algorithm].client_tasks:
        allowed = ", ".join(sorted(a for a, cls in REGISTRY.items() if cls.client_tasks))
        raise ConfigError(
            f"task: {cfg.algorithm} trains one model for every client, so the clients need one task; "
            f"got {'; '.join(sorted({t.spec for t in tasks}))}. Per-client tasks work with {allowed}."
        )
    return tasks


def client_data(data: Prepared, tasks: list[Task], device: torch.device) -> tuple[Task, list[ClientData]]:
    """Each client's data on ``device``, labelled by its own task, and the run's task.

    The run's task is the clients' task when they all share one, else the dataset's own classes.
    A client's training, validation and test labels are the dataset's labels mapped by its task;
    clients of the same task share one tensor of test labels.
    """
    task = tasks[0] if len(set(tasks)) == 1 else parse_task("classes", data.dataset.num_classes)
    test_x = data.test_x.to(device)
    test_y_of: dict[Task, torch.Tensor] = {}
    for t in tasks:
        test_y_of.setdefault(t, t.apply(data.test_y).to(device))
    val_x, val_y = (data.train_x, data.train_y) if data.val_on_train else (data.test_x, data.test_y)
    clients = [
        ClientData(data.train_x[p].to(device), t.apply(data.train_y[p]).to(device), val_x[v].to(device),
                   t.apply(val_y[v]).to(device), test_x, test_y_of[t], t)
        for p, v, t in zip(data.parts, data.val, tasks)
    ]
    return task, clients


def _run_dir(cfg: Config) -> Path:
    base = Path(cfg.out)
    name = cfg.name or f"{cfg.algorithm}-{cfg.dataset}-{cfg.partition.replace(':', '')}-{cfg.model_label}-s{cfg.seed}-{datetime.now():%Y%m%d-%H%M%S}"
    path, i = base / name, 1
    while path.exists():
        i += 1
        path = base / f"{name}-{i}"
    path.mkdir(parents=True)
    return path


def sample_participants(cfg: Config, t: int) -> list[int]:
    """The clients of round t: all, or a seeded fraction (at least one)."""
    if cfg.sample_fraction >= 1.0:
        return list(range(cfg.clients))
    m = max(1, int(round(cfg.sample_fraction * cfg.clients)))
    return sorted(numpy_rng(cfg.seed, "sampling", t).choice(cfg.clients, size=m, replace=False).tolist())


def evaluate(alg: Algorithm, ctx: Context, test_x: torch.Tensor, test_y: torch.Tensor) -> dict[str, Any]:
    """global_acc, and each client's deployable model on the test set and on its validation split."""
    bs = ctx.cfg.eval_batch_size

    def shared(d: ClientData) -> bool:  # the client is tested on the run's test set under the run's task
        return d.test_y is None or d.test_y is test_y

    extras = alg.extra_models()
    on_test = [alg.global_model()] + [alg.client_model(k) for k, d in enumerate(ctx.clients) if shared(d)]
    on_test += [m for extra in extras.values() for m, d in zip(extra, ctx.clients) if shared(d)]
    on_test = [m for m in on_test if m is not None]
    # test accuracy per model object: every model on the shared test set in one call (stacked where it pays)
    cache = dict(zip(map(id, on_test), shared_accuracies(on_test, test_x, test_y, bs, ctx.cfg.engine)))

    def test_acc(model: torch.nn.Module) -> float:
        if id(model) not in cache:
            cache[id(model)] = accuracy(model, test_x, test_y, bs)
        return cache[id(model)]

    def client_test_acc(model: torch.nn.Module, d: ClientData) -> float:
        return test_acc(model) if shared(d) else accuracy(model, d.test_x, d.test_y, bs)

    g = alg.global_model()
    out: dict[str, Any] = {"global_acc": test_acc(g) if g is not None else None}
    models = [alg.client_model(k) for k in range(len(ctx.clients))]
    out["client_acc_global_test"] = [client_test_acc(m, d) for m, d in zip(models, ctx.clients)]
    out["personal_acc"] = [accuracy(m, d.val_x, d.val_y, bs) if d.val_y.numel() else None for m, d in zip(models, ctx.clients)]
    out["client_acc_global_test_mean"] = float(np.mean(out["client_acc_global_test"]))
    vals = [v for v in out["personal_acc"] if v is not None]
    out["personal_acc_mean"] = float(np.mean(vals)) if vals else None
    for name, extra in extras.items():
        accs = [client_test_acc(m, d) for m, d in zip(extra, ctx.clients)]
        out[f"{name}_acc_global_test"], out[f"{name}_acc_global_test_mean"] = accs, float(np.mean(accs))
    return out


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def run(cfg: Config, quiet: bool = False, data: Prepared | None = None) -> RunResult:
    """Run one federated experiment end to end and write its run directory.

    Metrics are appended after every round and a checkpoint is written every
    ``checkpoint_every`` rounds, so an interrupted or failed run keeps everything
    it finished and :func:`resume` continues it. A non-finite loss stops the run with
    :class:`NonFiniteLossError` after the summary is written with status "failed".
    ``data`` reuses data prepared for the same data fields and seed (as ``compare`` does).
    Nothing is written when the configuration or the data is refused.
    """
    return _execute(cfg, quiet, data, None)


def resume(run_dir: str | Path, quiet: bool = False, data: Prepared | None = None) -> RunResult:
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
    return _execute(validate(raw), quiet, data, run_dir)


def _execute(cfg: Config, quiet: bool, data: Prepared | None, resume_dir: Path | None) -> RunResult:
    threads = configure_threads(cfg.threads)
    torch.manual_seed(derive_seed(cfg.seed, "torch"))  # the global generator draws dropout masks
    device = resolve_device(cfg.device)
    data = data or prepare_data(cfg)
    ds = data.dataset
    task, clients = client_data(data, client_tasks(cfg, ds.num_classes), device)
    test_x = clients[0].test_x  # the test set under the run's task, for a global model
    test_y = clients[0].test_y if task == clients[0].task else task.apply(data.test_y).to(device)
    ctx = Context(cfg, clients, ds.input_shape, task.num_classes, device, InProcessTransport(device), task=task,
                  log=lambda m: _log(m, quiet))
    alg = REGISTRY[cfg.algorithm](ctx)  # refuses a bad setting before anything is written
    start, rows = 0, []
    if resume_dir is None:
        run_dir = _run_dir(cfg)
        write_json(run_dir / "config.json", cfg.to_dict())
        (run_dir / "partition.json").write_text(json.dumps({
            "train_sizes": [len(p) for p in data.parts], "val_sizes": [len(v) for v in data.val],
            "label_counts": [np.bincount(data.train_y.numpy()[p], minlength=ds.num_classes).tolist() for p in data.parts],
        }) + "\n")
    else:
        run_dir = resume_dir
        start, rows = _restore(run_dir, cfg, alg, data, ctx.log)
        if start:  # messages sent while building the algorithm (a common initialization) count in round 1 only
            ctx.transport.reset_counts()
    _log(f"fedmutual: {cfg.algorithm} on {ds.name} ({len(data.train_y)} train / {len(data.test_y)} test, from {ds.source}), "
         f"{cfg.clients} clients, {cfg.partition}, {cfg.model_label}, {cfg.rounds} rounds, device {device}, {threads} threads", quiet)

    writer = MetricsWriter(run_dir / "metrics.jsonl")
    writer.rows = rows
    show = cfg.progress and not quiet
    rounds_bar = tqdm(total=cfg.rounds, initial=start, desc="rounds", unit="round", disable=not show, file=sys.stderr, position=0)
    status = "completed"
    try:
        for t in range(start, cfg.rounds):
            sampled = alg.sample(t)
            plan = plan_round(cfg, t, sampled)
            ctx.begin_round(t, plan)
            participants = [k for k in sampled if k not in plan.dropped]
            if plan.dropped:
                ctx.log(f"fedmutual: round {t + 1}: client(s) {', '.join(map(str, plan.dropped))} dropped out")
            steps = count_steps([ctx.job(k, t, []) for k in participants])
            step_bar = tqdm(total=steps, desc=f"round {t + 1}", unit="step", leave=False, disable=not show, file=sys.stderr, position=1)
            ctx.on_step = lambda: step_bar.update(1)
            start_time = time.perf_counter()
            if participants:
                stats = alg.round(t, participants)
            else:
                stats, ctx.events.skipped = {}, True
                ctx.log(f"fedmutual: round {t + 1}: every sampled client dropped out; the round is skipped")
            step_bar.close()
            sent, received = ctx.transport.reset_counts()
            row: dict[str, Any] = {"round": t + 1, "participants": participants}
            last = t + 1 == cfg.rounds
            if (t + 1) % cfg.eval_every == 0 or last:
                row.update(evaluate(alg, ctx, test_x, test_y))
            else:
                row.update({"global_acc": None, "client_acc_global_test": None, "personal_acc": None})
            up = [sent.get(client_name(k), 0) for k in range(cfg.clients)]
            down = [received.get(client_name(k), 0) for k in range(cfg.clients)]
            row.update({"bytes_up": sum(up), "bytes_down": sum(down), "bytes_up_per_client": up, "bytes_down_per_client": down})
            row.update({k: float(v) for k, v in stats.items()})
            row["faults"] = ctx.events.as_row()
            row["seconds"] = time.perf_counter() - start_time
            writer.write(row)
            if cfg.checkpoint_every and ((t + 1) % cfg.checkpoint_every == 0 or last):
                _save_checkpoint(run_dir, cfg, alg, data, writer.rows, t + 1)
            rounds_bar.set_postfix_str(_postfix(row))
            rounds_bar.update(1)
    except NonFiniteLossError:
        status = "failed"
        raise
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        rounds_bar.close()
        summary = summarize(writer.rows, status)
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


def _save_checkpoint(run_dir: Path, cfg: Config, alg: Algorithm, data: Prepared, rows: list[dict[str, Any]], rounds_done: int) -> None:
    alg_tensors, tree = alg.state()
    rng_tensors, rng_json = checkpoint.rng_state()
    checkpoint.write(run_dir / "checkpoints", rounds_done, {**alg_tensors, **rng_tensors}, {
        "config": cfg.to_dict(), "algorithm": cfg.algorithm, "algorithm_state": tree, "rng": rng_json,
        "metrics": rows, "partition": _partition_json(data), "next_round": rounds_done,
    }, cfg.checkpoint_keep)


def _restore(run_dir: Path, cfg: Config, alg: Algorithm, data: Prepared, log: Any) -> tuple[int, list[dict[str, Any]]]:
    """Load the newest good checkpoint into ``alg`` and the RNGs; rewrite metrics.jsonl to match it."""
    directory = run_dir / "checkpoints"
    checkpoint.remove_partial(directory)
    ck = checkpoint.latest(directory, log)
    if ck is None:
        log(f"fedmutual: {run_dir} has no checkpoint yet; starting again from round 1")
        start, rows = 0, []
    else:
        if ck.data["config"] != cfg.to_dict():
            changed = sorted(k for k in set(ck.data["config"]) | set(cfg.to_dict()) if ck.data["config"].get(k) != cfg.to_dict().get(k))
            raise CheckpointError(f"{run_dir}/config.json differs from the config of checkpoint {ck.path.name} in: {', '.join(changed)}; "
                                  "restore config.json or start a new run")
        if ck.data["partition"] != _partition_json(data):
            raise DataError(f"the dataset or its partition differs from the one checkpoint {ck.path} was trained on; "
                            "resume with the same dataset files")
        alg.load_state({k: v for k, v in ck.tensors.items() if k.startswith("alg/")}, ck.data["algorithm_state"])
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
