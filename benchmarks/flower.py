"""A round over a real Flower deployment on localhost against the same round in process.

Starts a SuperLink and one SuperNode per client on localhost (TLS and SuperNode authentication on, as the
deployment tests do), runs the config as a Flower app, then runs the same config in process, and prints for
each: the wall time per round (training and evaluation; the one-off setup excluded), the bytes per round,
and the fixed cost of one exchange, estimated as (Flower round - in-process round) / exchanges per round
(each round sends every exchange of the method plus one evaluation). Every process runs one torch thread;
all of them share this machine's cores, so on a small machine the nodes' work does not run in parallel as it
would on separate machines. Speed is never asserted here.

    python benchmarks/flower.py [--algorithm fml] [--rounds 3] [--clients 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path
from statistics import mean

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedmutual import Config  # noqa: E402
from fedmutual.deploy.app import write_app  # noqa: E402
from fedmutual.experiment.runner import run  # noqa: E402
from fedmutual.report.metrics import read_metrics  # noqa: E402
from tests.deploy.cluster import Federation  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algorithm", default="fml")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--limit-train", type=int, default=600)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        raw = {"algorithm": args.algorithm, "clients": args.clients, "rounds": args.rounds, "limit_train": args.limit_train,
               "limit_test": 300, "engine": "loop", "threads": 1, "out": str(tmp / "runs"), "progress": False}
        app = write_app(Config(**raw), tmp / "app", root_certificates=str(tmp / "unused.crt"))
        print(f"{args.algorithm}, {args.clients} clients on {args.clients} SuperNodes, {args.rounds} rounds, "
              f"{args.limit_train} Fashion-MNIST training samples, loop engine, 1 thread per process; "
              f"{platform.processor() or platform.machine()}", flush=True)
        with Federation(tmp / "fed", nodes=args.clients) as fed:
            fed.start_superlink()
            fed.start_supernodes({i: {"partition-id": i, "num-partitions": args.clients, "state-dir": str(tmp / f"state{i}")}
                                  for i in range(args.clients)})
            run_id = fed.submit(app, {"name": "flower", "timeout": 300.0, "wait": 60.0, "record-messages": True})
            fed.wait(run_id, timeout=1800)
        far = read_metrics(tmp / "runs" / "flower" / "metrics.jsonl")
        messages = [json.loads(line) for line in (tmp / "runs" / "flower" / "messages.jsonl").read_text().splitlines()]
        near = run(Config(**{**raw, "name": "in-process"}), quiet=True).metrics
    exchanges = [len({m["kind"] for m in messages if m["round"] == r["round"]}) + (r["personal_acc"] is not None) for r in far]
    t_far, t_near = mean(r["seconds"] for r in far), mean(r["seconds"] for r in near)
    per_exchange = mean((f["seconds"] - n["seconds"]) / e for f, n, e in zip(far, near, exchanges))
    print(f"{'runtime':11} {'s / round':>10} {'bytes up / round':>17} {'bytes down / round':>19}")
    for name, rows, t in (("flower", far, t_far), ("in-process", near, t_near)):
        print(f"{name:11} {t:10.2f} {mean(r['bytes_up'] for r in rows):17,.0f} {mean(r['bytes_down'] for r in rows):19,.0f}")
    print(f"flower / in-process: {t_far / t_near:.1f}x per round; {mean(exchanges):.1f} exchanges per round; "
          f"fixed cost of one exchange: {per_exchange:.2f} s")
    print("same metrics (apart from seconds):",
          [{k: v for k, v in r.items() if k != "seconds"} for r in far] == [{k: v for k, v in r.items() if k != "seconds"} for r in near])


if __name__ == "__main__":
    main()
