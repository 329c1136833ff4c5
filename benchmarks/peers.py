"""A round over peer processes on localhost (gRPC, mutual TLS, no server) against the same round in process.

Starts one ``fedmutual peer`` process per client, as the deployment tests do, runs the config, merges the peers'
rows (``fedmutual peer-report``), then runs the same config in process, and prints for each: the wall time per
round (the aggregator's training, the transfers and every peer's evaluation; round 1, with the processes'
warm-up, shown apart), and the bytes each peer sent and received against the simulation's. Every process runs one
torch thread; all of them share this machine's cores. Speed is never asserted here.

    python benchmarks/peers.py [--algorithm dfml] [--rounds 4] [--clients 4] [--model mlp,lenet5,cnn1]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path
from statistics import mean

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedmutual import Config  # noqa: E402
from fedmutual.deploy.peer import merge_reports  # noqa: E402
from fedmutual.experiment.runner import run  # noqa: E402
from fedmutual.report.metrics import read_metrics  # noqa: E402
from tests.deploy.peers import PeerCluster  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algorithm", default="dfml")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--model", default="mlp,lenet5,cnn1")
    ap.add_argument("--limit-train", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        raw = {"algorithm": args.algorithm, "clients": args.clients, "rounds": args.rounds, "model": args.model,
               "limit_train": args.limit_train, "limit_test": 1000, "engine": "loop", "threads": 1,
               "out": str(tmp / "runs"), "progress": False}
        print(f"{args.algorithm}, {args.clients} peers ({args.model}), {args.rounds} rounds, {args.limit_train} Fashion-MNIST "
              f"training samples, loop engine, 1 thread per process; {platform.processor() or platform.machine()}", flush=True)
        with PeerCluster(tmp / "peers", raw, n=args.clients) as peers:
            for k in range(args.clients):
                peers.start(k)
            codes = [peers.wait(k, 1800) for k in range(args.clients)]
            if codes != [0] * args.clients:
                sys.exit("a peer failed:\n" + "\n".join(peers.tail(k) for k in range(args.clients)))
            far = read_metrics(merge_reports([peers.dir(k) for k in range(args.clients)], tmp / "merged") / "metrics.jsonl")
        near = run(Config(**{**raw, "name": "in-process"}), quiet=True).metrics
    print(f"{'runtime':11} {'round 1 s':>10} {'later rounds s':>15}")
    for name, rows in (("peers", far), ("in-process", near)):
        print(f"{name:11} {rows[0]['seconds']:10.2f} {mean(r['seconds'] for r in rows[1:]):15.2f}")
    print(f"peers / in-process, later rounds: {mean(r['seconds'] for r in far[1:]) / mean(r['seconds'] for r in near[1:]):.1f}x")
    print(f"{'peer':5} {'bytes sent':>12} {'(simulation)':>13} {'received':>12} {'(simulation)':>13}")
    for k in range(args.clients):
        up = [sum(r["bytes_up_per_client"][k] for r in rows) for rows in (far, near)]
        down = [sum(r["bytes_down_per_client"][k] for r in rows) for rows in (far, near)]
        print(f"{k:5} {up[0]:12,} {up[1]:13,} {down[0]:12,} {down[1]:13,}")
    print("same metrics (apart from seconds):",
          [{k: v for k, v in r.items() if k != "seconds"} for r in far] == [{k: v for k, v in r.items() if k != "seconds"} for r in near])


if __name__ == "__main__":
    main()
