"""End-to-end engine comparison on real Fashion-MNIST: FML rounds with --engine auto against --engine loop.

Each configuration runs in its own subprocess, so peak memory (max RSS) is that run's alone.
Prints the mean round time of each engine, their ratio, and the peak memory; also the peak
memory of FML with 100 LeNet5 clients. Usage:

    python benchmarks/e2e.py [--rounds 3] [--clients 20] [--big-clients 100]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys
from fedmutual import Config, run
cfg = Config.model_validate_json(sys.argv[1])
res = run(cfg, quiet=True)
secs = [r["seconds"] for r in res.metrics]
evaluated = [r["global_acc"] is not None for r in res.metrics]
print(json.dumps({"seconds": secs, "evaluated": evaluated, "acc": res.metrics[-1]["global_acc"],
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(cfg: dict) -> dict:
    from fedmutual import Config

    out = subprocess.run([sys.executable, "-c", CHILD, Config(**cfg).model_dump_json()], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--big-clients", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = dict(algorithm="fml", dataset="fashion-mnist", partition="shards:2", model="lenet5", local_epochs=1,
                    rounds=args.rounds, clients=args.clients, out=tmp, progress=False, threads=args.threads, eval_every=2,
                    batch_size=args.batch_size)
        res = {e: measure({**base, "engine": e}) for e in ("loop", "auto")}
        print(f"FML, Fashion-MNIST (60,000 train), shards:2, LeNet5, E=1, B={args.batch_size}, {args.clients} clients, {args.rounds} rounds, "
              "evaluation every 2nd round; round 1 (warm-up) excluded")
        print(f"{'engine':8} {'round s (all)':>13} {'round s (no eval)':>17} {'peak RSS MB':>12} {'final global acc':>17}")
        mean, train = {}, {}
        for e, r in res.items():
            rounds = list(zip(r["seconds"], r["evaluated"]))[1:]
            mean[e] = sum(s for s, _ in rounds) / len(rounds)
            plain = [s for s, ev in rounds if not ev] or [float("nan")]
            train[e] = sum(plain) / len(plain)
            print(f"{e:8} {mean[e]:13.2f} {train[e]:17.2f} {r['maxrss_mb']:12.0f} {r['acc']:17.4f}")
        print(f"round time ratio loop/auto: {mean['loop'] / mean['auto']:.2f}x with evaluation rounds, "
              f"{train['loop'] / train['auto']:.2f}x on rounds without evaluation")
        big = measure({**base, "clients": args.big_clients, "rounds": 1, "engine": "auto", "partition": "iid"})
        print(f"FML with {args.big_clients} LeNet5 clients (iid, 1 round, auto): peak RSS {big['maxrss_mb']:.0f} MB, "
              f"round {big['seconds'][0]:.1f} s")


if __name__ == "__main__":
    main()
