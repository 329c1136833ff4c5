"""Throughput of the cohort engines: the plain loop, the stacked engine, and one big model.

For each zoo model, cohort size K and batch size B, and for single-model
steps (FedAvg-like: one member, CE) and DML steps (FML-like: two members,
CE + KL), it prints client samples per second of:

- loop:    ``run_cohort(engine="loop")``, a Python loop over K modules and optimizers;
- stacked: ``run_cohort(engine="stacked")``;
- ref:     one model (or one pair, for DML) trained on one K·B batch (at most
           1024 samples), the speed of "one model on all their data at once";
- auto:    ``run_cohort(engine="auto")``, and the path it picked.

Each timed run is one round of a federation of K clients with S steps each, on
synthetic Fashion-MNIST-shaped data (1x28x28, 10 classes), SGD with momentum
0.9 and weight decay 5e-4: everything a round does is timed (batch gathering,
stacking the models, writing them back). S is what one epoch over 60 000
samples would give (60 000 / K / B), cut so that a run takes about a second.
The engines run in turn, twice, and each keeps its best run: other processes on
a shared machine only ever slow a run down. Speed is never asserted here.

A second table times evaluation: K models of one architecture tested on one
shared test set (what every round's evaluation does), model by model
(``loop``: ``accuracy`` with batches of 256) against one stacked forward
(``stacked``), and what ``auto`` picks.

    python benchmarks/engine.py            # both tables (about 10 minutes)
    python benchmarks/engine.py --quick    # K=20, B=32 only
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedmutual.engine.cohort import ClientJob, Member, run_cohort, sgd  # noqa: E402
from fedmutual.engine.evaluation import shared_accuracies  # noqa: E402
from fedmutual.engine.setup import configure_threads  # noqa: E402
from fedmutual.engine.stacked import keep_freed_memory, plan_cohort  # noqa: E402
from fedmutual.models import build_model  # noqa: E402

SHAPE, CLASSES, SAMPLES = (1, 28, 28), 10, 60_000
REF_CAP = 1024  # largest reference batch: larger ones run slower (out of cache), and CNN2 would need gigabytes
WARM_CAP = 20  # warm-up runs take one step on at most this many clients (fewer for slow models)
# Rough client samples/s of the slower engine, to size each run to about `seconds`.
SPEED = {"mlp": 30000, "lenet5": 12000, "cnn1": 15000, "cnn2": 900}


def make_jobs(model: str, k: int, b: int, steps: int, members: int, seed: int = 0) -> list[ClientJob]:
    """K clients with ``steps`` batches of B synthetic samples each, one or two members per client."""
    g = torch.Generator().manual_seed(seed)
    jobs = []
    for c in range(k):
        ms = []
        for _ in range(members):
            m = build_model(model, SHAPE, CLASSES)
            ms.append(Member(m, sgd(m, 0.01, 0.9, 5e-4), w_ce=0.5 if members > 1 else 1.0, w_kl=0.5 if members > 1 else 0.0))
        n = b * steps
        x = torch.rand(n, *SHAPE, generator=g)
        y = torch.randint(0, CLASSES, (n,), generator=g)
        jobs.append(ClientJob(c, ms, x, y, epochs=1, batch_size=b, shuffle_seed=seed + c))
    return jobs


def warm_up(jobs: list[ClientJob], engine: str, clients: int) -> None:
    """One step on the first ``clients`` clients, so that one-time costs (kernel selection) are not timed."""
    warm = [copy.copy(j) for j in jobs[:clients]]
    for w in warm:
        w.x, w.y = w.x[: w.batch_size], w.y[: w.batch_size]
    run_cohort(warm, 0, engine=engine)


def timed(jobs: list[ClientJob], engine: str) -> tuple[float, float]:
    """(client samples per second, seconds) of one ``run_cohort`` call: one round, everything included."""
    start = time.perf_counter()
    run_cohort(jobs, 0, engine=engine)
    seconds = time.perf_counter() - start
    return sum(len(j.y) for j in jobs) / seconds, seconds


def measure(model: str, k: int, b: int, members: int, seconds: float, repeats: int) -> dict[str, object]:
    """One table row: loop, stacked and auto on the same cohort, and the reference."""
    steps = max(1, min(math.ceil(SAMPLES / k / b), round(seconds * SPEED[model] / members / (k * b))))
    rb = min(k * b, REF_CAP)
    cohort = make_jobs(model, k, b, steps, members)
    sets = {
        "loop": (cohort, "loop"),
        "stacked": (make_jobs(model, k, b, steps, members), "stacked"),
        "ref": (make_jobs(model, 1, rb, max(1, round(steps * k * b / rb)), members), "loop"),
        "auto": (make_jobs(model, k, b, steps, members), "auto"),
    }
    picked = "stacked" if plan_cohort(sets["auto"][0], "auto").groups else "loop"
    warm = max(1, min(WARM_CAP, round(0.2 * SPEED[model] / members / b)))
    for jobs, engine in sets.values():
        warm_up(jobs, engine, warm)
    best = {name: 0.0 for name in sets}
    slow = False
    for _ in range(repeats):
        for name, (jobs, engine) in sets.items():
            if name == "auto" and slow:
                continue  # auto runs exactly the path it picked, already timed: reuse that time
            speed, took = timed(jobs, engine)
            best[name] = max(best[name], speed)
            slow = slow or took > 3 * seconds
        if slow:
            break  # the slowest rows (CNN2 at large K·B): one run each
    auto_timed = best["auto"] > 0
    if not auto_timed:
        best["auto"] = best[picked]
    return {"model": model, "mode": "dml" if members > 1 else "single", "K": k, "B": b, "steps": steps,
            "auto_path": picked + ("" if auto_timed else " (=)"), **best}


def measure_eval(model: str, k: int, repeats: int) -> dict[str, object]:
    """Test samples per second (models x samples) of evaluating K models on one shared test set."""
    n = 500 if model == "cnn2" else 2000
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(n, *SHAPE, generator=g), torch.randint(0, CLASSES, (n,), generator=g)
    models = [build_model(model, SHAPE, CLASSES) for _ in range(k)]
    best = {}
    for engine in ("loop", "stacked", "auto"):
        shared_accuracies(models[:2], x[:64], y[:64], 256, engine)  # warm-up
    for _ in range(repeats):
        for engine in ("loop", "stacked", "auto"):
            start = time.perf_counter()
            shared_accuracies(models, x, y, 256, engine)
            best[engine] = max(best.get(engine, 0.0), k * n / (time.perf_counter() - start))
    return {"model": model, "K": k, "n": n, **best}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="K=20, B=32 only")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the available cores)")
    ap.add_argument("--models", default="mlp,lenet5,cnn1,cnn2")
    ap.add_argument("--seconds", type=float, default=0.8, help="target seconds per timed run")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per engine and row; the best is kept")
    args = ap.parse_args()
    threads = configure_threads(args.threads)
    keep_freed_memory()  # what the stacked engine sets on its first run; set up front so every engine runs with it
    torch.manual_seed(0)
    ks, bs = ([20], [32]) if args.quick else ([5, 20, 100], [32, 128])
    print(f"# engine benchmark: torch {torch.__version__}, {threads} threads, {platform.machine()}; client samples/s, "
          f"best of {args.repeats} runs; ref = one model (DML: one pair) on a batch of min(K*B, {REF_CAP})", flush=True)
    header = ["model", "mode", "K", "B", "steps", "loop/s", "stacked/s", "ref/s", "st/loop", "st/ref", "auto", "auto/loop"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|", flush=True)
    start = time.perf_counter()
    for model in args.models.split(","):
        for members in (1, 2):
            for k in ks:
                for b in bs:
                    r = measure(model, k, b, members, args.seconds, args.repeats)
                    cells = [r["model"], r["mode"], r["K"], r["B"], r["steps"], f"{r['loop']:.0f}", f"{r['stacked']:.0f}",
                             f"{r['ref']:.0f}", f"{r['stacked'] / r['loop']:.2f}", f"{r['stacked'] / r['ref']:.2f}",
                             r["auto_path"], f"{r['auto'] / r['loop']:.2f}"]
                    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
    print(f"# training total {time.perf_counter() - start:.0f} s; (=): auto not timed separately in the slowest rows, "
          "its time is that of the path it picked (it runs exactly that path)")
    print("\n# evaluation: K models on one shared test set of n synthetic samples; model-samples/s, best of "
          f"{args.repeats} runs; loop = one model at a time with batches of 256")
    header = ["model", "K", "n", "loop/s", "stacked/s", "auto/s", "st/loop", "auto/loop"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|", flush=True)
    start = time.perf_counter()
    for model in args.models.split(","):
        for k in ks:
            r = measure_eval(model, k, args.repeats)
            cells = [r["model"], r["K"], r["n"], f"{r['loop']:.0f}", f"{r['stacked']:.0f}", f"{r['auto']:.0f}",
                     f"{r['stacked'] / r['loop']:.2f}", f"{r['auto'] / r['loop']:.2f}"]
            print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
    print(f"# evaluation total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
