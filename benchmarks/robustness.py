"""Fault and attack experiments on real Fashion-MNIST, as `fedmutual run` commands; prints markdown tables.

    python benchmarks/robustness.py dropout [--out runs/robustness]
    python benchmarks/robustness.py attack  [--out runs/robustness]

``dropout``: FML with 20 clients (shards:2) and no faults, 30% dropout per round, and 30% dropout
with 10% crashes and 20% stragglers (deadline 2). ``attack``: FML with 10 clients (IID), 2 of them
sending sign-flipped memes (scale 4), against no attack, each with the plain mean, the coordinate-wise
median and the trimmed mean (trim 0.2). Every run's exact command is printed before its table row.
Run it niced with one thread, e.g. ``nice -n 10 python benchmarks/robustness.py dropout``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

FML20 = ["--algorithm", "fml", "--clients", "20", "--partition", "shards:2", "--model", "lenet5", "--limit-train", "6000",
         "--limit-test", "2000", "--rounds", "30", "--batch-size", "32", "--threads", "1", "--eval-every", "2", "--no-progress"]
FML10 = ["--algorithm", "fml", "--clients", "10", "--partition", "iid", "--model", "lenet5", "--limit-train", "5000",
         "--limit-test", "2000", "--rounds", "20", "--batch-size", "32", "--threads", "1", "--eval-every", "2", "--no-progress"]

SUITES: dict[str, list[tuple[str, list[str]]]] = {
    "dropout": [
        ("no faults", FML20),
        ("30% dropout", FML20 + ["--set", "faults.dropout=0.3"]),
        ("30% dropout, 10% crash, 20% stragglers (deadline 2)", FML20 + [
            "--set", "faults.dropout=0.3", "--set", "faults.crash=0.1", "--set", "faults.straggler=0.2",
            "--set", "faults.slowdown=4", "--set", "faults.deadline=2"]),
    ],
    "attack": [
        (f"{attack}, {rule}", FML10 + (["--set", "attack.kind=sign_flip", "--set", "attack.count=2", "--set", "attack.scale=4"]
                                       if attack == "2 sign-flippers" else [])
         + ["--set", f"aggregation.rule={rule}"] + (["--set", "aggregation.trim=0.2"] if rule == "trimmed_mean" else []))
        for attack in ("no attack", "2 sign-flippers") for rule in ("mean", "median", "trimmed_mean")
    ],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", choices=sorted(SUITES))
    ap.add_argument("--out", default="runs/robustness")
    args = ap.parse_args()
    rows = []
    for i, (label, flags) in enumerate(SUITES[args.suite]):
        cmd = [sys.executable, "-m", "fedmutual", "run", *flags, "--out", args.out, "--name", f"{args.suite}-{i}"]
        print("$ nice -n 10 fedmutual run " + " ".join(shlex.quote(a) for a in cmd[4:]), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        run_dir = Path(args.out) / f"{args.suite}-{i}"
        s = json.loads((run_dir / "summary.json").read_text())
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        f = [m["faults"] for m in metrics]
        counts = {k: sum(len(x[k]) for x in f) for k in ("dropped", "crashed", "late", "rejected")}
        curve = " ".join(f"{100 * m['global_acc']:.0f}" for m in metrics if m["global_acc"] is not None and m["round"] % 10 == 0)
        rows.append((label, s["final_global_acc"], s["best_global_acc"], s["final_personal_acc_mean"], counts,
                     sum(x["skipped"] for x in f), curve, s["total_seconds"]))
    print("\n| setting | global final | global best | personal final | dropped / crashed / late / rejected replies | skipped rounds | global every 10 rounds | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for label, fin, best, pers, c, skipped, curve, secs in rows:
        print(f"| {label} | {100 * fin:.2f} | {100 * best:.2f} | {100 * pers:.2f} | {c['dropped']} / {c['crashed']} / {c['late']} / {c['rejected']} "
              f"| {skipped} | {curve} | {secs:.0f} |")


if __name__ == "__main__":
    main()
