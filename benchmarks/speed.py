"""FML round time against a peer simulator, where the round goes, a roofline, and many clients.

Everything is measured in one invocation, each run in a subprocess of its own (so that peak memory is that run's):

1. **Peak**: this machine's sustained fp32 GFLOP/s, the best of a few large matrix products.
2. **Roofline**: for each zoo model, one FedAvg-like round (one model per client) and one FML-like round (a pair
   per client) of K = 5 clients with batches of 128 on synthetic Fashion-MNIST-shaped data, through the engine
   ``auto`` picks; training FLOPs per sample are counted layer by layer (forward 2 x multiply-adds, backward
   twice that, less the input gradient the first layer does not need), and achieved GFLOP/s is given as a
   fraction of the peak.
3. **The peer workload**: FML on real Fashion-MNIST, ``configs/fml-fedavgcnn-fmnist.toml`` (5 clients, shards:2,
   FedAvgCNN as meme and personalized model, B = 128, plain SGD, E = 1, evaluation every round). The median round
   time, with and without evaluation, against PEER_SECONDS: PFLlib's median round on this workload and machine
   kind (measured separately, PFLlib unmodified). The breakdown of a round comes from
   :mod:`fedmutual.engine.phases` (mean per round, round 1 included).
4. **Scale**: FML with 1,000 LeNet5 clients of 60 samples each (iid): a round with evaluation of the default
   client sample, with every client evaluated, and without evaluation; peak memory.
5. **Many clients**: FML with 10,000 LeNet5 clients, 1% sampled per round, with the clients' states on disk
   (``client_states = "disk"``) and in memory: set-up, round and evaluation times, memory and bytes per client.

    python benchmarks/speed.py                 # everything (about 15 minutes on 2 cores)
    python benchmarks/speed.py --only peak,roofline
    python benchmarks/speed.py --rounds 3 --engines auto,loop

Speed is never asserted in tests; this prints figures and ratios taken in this one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEER_SECONDS = {"round": 88.0, "train": 71.0, "eval": 17.0}  # PFLlib d832e76, quiet machine of this kind, median
PRESET = ROOT / "configs" / "fml-fedavgcnn-fmnist.toml"

RUN_CHILD = r"""
import json, resource, sys
from fedmutual import Config, run
from fedmutual.engine.phases import timing
cfg = Config.model_validate_json(sys.argv[1])
with timing() as phases:
    res = run(cfg, quiet=True)
print(json.dumps({"seconds": [r["seconds"] for r in res.metrics], "evaluated": [r["global_acc"] is not None for r in res.metrics],
                  "acc": res.metrics[-1]["global_acc"], "phases": dict(phases), "rounds": len(res.metrics),
                  "evaluated_clients": [r.get("evaluated_clients") for r in res.metrics],
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

PEAK_CHILD = r"""
import json, sys, time, torch
from fedmutual.engine.setup import configure_threads
threads = configure_threads(int(sys.argv[1]) or None)
best = 0.0
for n in (1024, 2048, 4096):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    reps = max(1, int(4e9 / n ** 3))
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e9)
print(json.dumps({"gflops": best, "threads": threads}))
"""

ROOF_CHILD = r"""
import json, sys, time, torch
from torch import nn
from fedmutual.engine.cohort import ClientJob, Member, run_cohort, sgd
from fedmutual.engine.setup import configure_threads
from fedmutual.engine.stacked import keep_freed_memory, plan_cohort
from fedmutual.models import build_model
model, members, k, b, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
threads = configure_threads(int(sys.argv[6]) or None)
keep_freed_memory()
torch.manual_seed(0)

def train_flops(net):
    "Training FLOPs per sample: forward 2 x MACs, backward 4 x MACs, less the first layer's input gradient (2 x MACs)."
    macs, first = [], []
    def hook(mod, inp, out):
        per = out[0].numel()
        if isinstance(mod, nn.Conv2d):
            per *= mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        else:
            per = mod.in_features * mod.out_features
        macs.append(per)
    hs = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        net.eval()(torch.zeros(1, 1, 28, 28))
    for h in hs:
        h.remove()
    return 6 * sum(macs) - 2 * macs[0]

g = torch.Generator().manual_seed(0)
def jobs():
    out = []
    for c in range(k):
        ms = []
        for _ in range(members):
            m = build_model(model, (1, 28, 28), 10)
            ms.append(Member(m, sgd(m, 0.01, 0.0, 0.0), w_ce=0.5 if members > 1 else 1.0, w_kl=0.5 if members > 1 else 0.0))
        out.append(ClientJob(c, ms, torch.rand(b * steps, 1, 28, 28, generator=g), torch.randint(0, 10, (b * steps,), generator=g),
                             1, b, c))
    return out
cohort = jobs()
warm = [ClientJob(j.client, j.members, j.x[:b], j.y[:b], 1, b, 0) for j in cohort]
run_cohort(warm, 0)
best = 0.0
for _ in range(2):
    start = time.perf_counter()
    run_cohort(cohort, 0)
    best = max(best, k * b * steps / (time.perf_counter() - start))
flops = members * train_flops(build_model(model, (1, 28, 28), 10))
print(json.dumps({"samples_s": best, "flops_per_sample": flops, "gflops": best * flops / 1e9,
                  "path": "stacked" if plan_cohort(cohort, "auto").groups else "loop", "threads": threads}))
"""


MANY_CHILD = r"""
import json, resource, sys, time
from fedmutual import Config
from fedmutual.engine.setup import configure_threads
from fedmutual.experiment.runner import build, evaluate
from fedmutual.runtimes.faults import plan_round
cfg = Config.model_validate_json(sys.argv[1])
configure_threads(cfg.threads)
start = time.perf_counter()
b = build(cfg, log=lambda m: None)
rt = b.runtime
rt.setup()
built = time.perf_counter() - start
rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
rounds, evals = [], []
for t in range(cfg.rounds):
    sampled = b.alg.sample(t)
    plan = plan_round(cfg, t, sampled)
    s = time.perf_counter()
    rt.run_round(t, [k for k in sampled if k not in plan.dropped], plan)
    rounds.append(time.perf_counter() - s)
    s = time.perf_counter()
    row = evaluate(b, cfg, t, last=False)
    evals.append(time.perf_counter() - s)
disk = rt.bytes_on_disk() if hasattr(rt, "bytes_on_disk") else 0
print(json.dumps({"build_s": built, "rounds": rounds, "evals": evals, "evaluated": row["evaluated_clients"], "sampled": len(sampled),
                  "rss_built_mb": rss_built, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "disk_mb": disk / 2**20}))
"""


def child(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fml_run(cfg: dict) -> dict:
    from fedmutual import Config

    return child(RUN_CHILD, Config(**cfg).model_dump_json())


def _rounds(r: dict, evaluated: bool) -> list[float]:
    """Round times after the first (warm-up), of rounds with or without evaluation."""
    return [s for i, (s, e) in enumerate(zip(r["seconds"], r["evaluated"])) if i > 0 and e == evaluated]


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


BREAKDOWN = [("train", "training, all of it"), ("train.step", "  steps: forward, loss, backward and update"),
             ("train.gather", "  batch gathering"), ("train.stack", "  stacking models and optimizers"),
             ("train.write_back", "  write-back into the clients' models"), ("train.loop", "  jobs on the plain loop"),
             ("eval", "evaluation, all of it"), ("eval.test", "  every model on the test set"),
             ("eval.val", "  personalized models on validation splits"), ("messages", "messages: serialization, bytes, validation"),
             ("checkpoint", "checkpoints"), ("metrics", "metrics file")]


def breakdown(r: dict) -> list[str]:
    per = {k: v / r["rounds"] for k, v in r["phases"].items()}
    total = sum(r["seconds"]) / r["rounds"]
    lines = ["| phase | s per round | share |", "|---|---|---|"]
    for key, label in BREAKDOWN:
        if key in per:
            lines.append(f"| {label} | {per[key]:.2f} | {per[key] / total:.0%} |")
    rest = total - per.get("train", 0) - per.get("eval", 0) - per.get("messages", 0) - per.get("checkpoint", 0) - per.get("metrics", 0)
    lines.append(f"| other (the algorithm's own work, aggregation) | {rest:.2f} | {rest / total:.0%} |")
    lines.append(f"| round | {total:.2f} | 100% |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="peak,roofline,workload,scale,many", help="sections to run, comma-separated")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: the available cores)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the workload runs (the first is a warm-up)")
    ap.add_argument("--engines", default="auto", help="engines for the workload, e.g. auto,loop")
    ap.add_argument("--models", default="mlp,lenet5,cnn1,cnn2,fedavgcnn")
    ap.add_argument("--clients", type=int, default=1000, help="clients of the scale section")
    ap.add_argument("--many", type=int, default=10_000, help="clients of the sampled-federation section (1%% per round)")
    ap.add_argument("--limit-train", type=int, default=None, help="training samples of the workload (default: all 60,000)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    import torch

    print(f"# fedmutual speed: torch {torch.__version__}, {platform.machine()}, {args.threads or 'all'} threads; "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    peak = None
    if only & {"peak", "roofline"}:
        p = child(PEAK_CHILD, str(args.threads))
        peak = p["gflops"]
        print(f"\n## Peak\n\nfp32 matrix product, best of sizes 1024-4096: {peak:.1f} GFLOP/s on {p['threads']} threads", flush=True)
    if "roofline" in only and peak:
        print("\n## Roofline: training, K = 5, B = 128, synthetic data, the engine auto picks\n")
        print("| model | mode | path | MFLOP per client sample | client samples/s | GFLOP/s | of peak |\n|---|---|---|---|---|---|---|", flush=True)
        for model in args.models.split(","):
            for members, mode in ((1, "single"), (2, "pair (DML)")):
                steps = 4 if model in ("cnn2",) else 12
                r = child(ROOF_CHILD, model, str(members), "5", "128", str(steps), str(args.threads))
                print(f"| {model} | {mode} | {r['path']} | {r['flops_per_sample'] / 1e6:.2f} | {r['samples_s']:.0f} | "
                      f"{r['gflops']:.1f} | {r['gflops'] / peak:.2f} |", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if "workload" in only:
            preset = tomllib.loads(PRESET.read_text())
            base = {**preset, "rounds": args.rounds, "out": tmp, "progress": False, "checkpoint_every": 0,
                    "threads": args.threads or None, "limit_train": args.limit_train}
            print(f"\n## The peer workload: {PRESET.relative_to(ROOT)}, {args.rounds} rounds (round 1 is a warm-up)\n")
            print("| engine | round s, with evaluation | vs peer | round s, no evaluation | vs peer's training | peak RSS MB | final global acc |")
            print("|---|---|---|---|---|---|---|", flush=True)
            results = {}
            for engine in args.engines.split(","):
                with_eval = fml_run({**base, "engine": engine, "eval_every": 1, "name": f"{engine}-eval"})
                no_eval = fml_run({**base, "engine": engine, "eval_every": 10_000, "name": f"{engine}-noeval"})
                results[engine] = with_eval
                a, b = _median(_rounds(with_eval, True)), _median(_rounds(no_eval, False))
                print(f"| {engine} | {a:.1f} | {PEER_SECONDS['round'] / a:.2f}x | {b:.1f} | {PEER_SECONDS['train'] / b:.2f}x | "
                      f"{with_eval['maxrss_mb']:.0f} | {with_eval['acc']:.4f} |", flush=True)
            print(f"\npeer: {PEER_SECONDS['round']:.0f} s per round, of which {PEER_SECONDS['train']:.0f} s training and "
                  f"{PEER_SECONDS['eval']:.0f} s evaluation (PFLlib, median)")
            for engine, r in results.items():
                print(f"\n### Breakdown, engine {engine} (mean per round, with evaluation)\n")
                print("\n".join(breakdown(r)), flush=True)
        if "scale" in only:
            n = args.clients
            base = {"algorithm": "fml", "dataset": "fashion-mnist", "partition": "iid", "clients": n, "model": "lenet5",
                    "limit_train": 60 * n, "rounds": 2, "local_epochs": 1, "out": tmp, "progress": False, "checkpoint_every": 0,
                    "threads": args.threads or None}
            print(f"\n## Scale: FML, {n} LeNet5 clients of 60 samples (iid), round 2 timed\n")
            print("| evaluation | round s | evaluated clients | peak RSS MB |\n|---|---|---|---|", flush=True)
            for label, over in (("none", {"eval_every": 10_000, "rounds": 3}),
                                ("a seeded sample (the default, eval_clients = 20)", {"eval_every": 1, "rounds": 3}),
                                ("every client", {"eval_every": 1, "eval_clients": None})):
                r = fml_run({**base, **over, "name": f"scale-{len(label)}"})
                print(f"| {label} | {r['seconds'][1]:.1f} | {r['evaluated_clients'][1]} | {r['maxrss_mb']:.0f} |", flush=True)
        if "many" in only:
            from fedmutual import Config

            n = args.many
            base = {"algorithm": "fml", "dataset": "fashion-mnist", "partition": "iid", "clients": n, "model": "lenet5",
                    "sample_fraction": 0.01, "rounds": 3, "local_epochs": 1, "out": tmp, "progress": False,
                    "checkpoint_every": 0, "threads": args.threads or None}
            print(f"\n## Many clients: FML, {n} LeNet5 clients on all 60,000 samples (iid), 1% sampled per round, "
                  "rounds 2-3 timed, evaluation of the default sample after each round\n")
            print("| client states | set-up s | round s (training) | evaluation s | evaluated | peak RSS MB | RSS after set-up MB "
                  "| state files MB | per client (disk: file; memory: RSS above the disk run) |\n|---|---|---|---|---|---|---|---|---|", flush=True)
            baseline = 0.0
            for store in ("disk", "memory"):
                r = child(MANY_CHILD, Config(**{**base, "client_states": store}).model_dump_json())
                # per client: its state file on disk; in memory, the RSS above the disk run's (which holds no states)
                per = r["disk_mb"] / n if store == "disk" else (r["rss_built_mb"] - baseline) / n
                baseline = r["rss_built_mb"]
                print(f"| {store} | {r['build_s']:.0f} | {_median(r['rounds'][1:]):.2f} | {_median(r['evals'][1:]):.1f} | "
                      f"{r['evaluated']} of {n} | {r['maxrss_mb']:.0f} | {r['rss_built_mb']:.0f} | {r['disk_mb']:.0f} | "
                      f"{per * 1024:.0f} KB |", flush=True)


if __name__ == "__main__":
    main()
