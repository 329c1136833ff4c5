"""Prove tests/deploy/cluster.py against a real flwr 1.42 deployment (not a pytest test).

    .venv/bin/python tests/deploy/demo_app/prove.py [WORKDIR]

Part A: SuperLink + 3 SuperNodes (TLS + node auth), one run of 3 `query.hello`
rounds with a 1 MB bytes echo, one run that fails on purpose, then close() and a
check that no process is left.  Part B: a 4-round run during which SuperNode 1 is
SIGKILLed after round 1 and restarted (same key) after round 2.
Prints JSON-ish findings and timings; exits non-zero on any failed check.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

APP = Path(__file__).resolve().parent
sys.path.insert(0, str(APP.parent.parent))  # tests/ (what pytest's rootdir import does)

from deploy.cluster import Federation  # noqa: E402

BLOB = json.dumps({"layers": [{"name": f"l{i}", "w": [0.5] * 50} for i in range(40)],
                   "quote": "it's \"quoted\"", "unicode": "naïve ✓"})
failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(("  ok   " if ok else "  FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(path: Path, pred: Any, timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        recs = records(path)
        if pred(recs):
            return recs
        time.sleep(0.2)
    raise TimeoutError(f"{path}: condition not met in {timeout}s: {records(path)}")


def flower_ps(fed: Federation) -> list[str]:
    """`ps` lines of live flower/flwr processes that belong to ``fed``.

    Other sessions may run their own Flower processes on the same machine, so a
    line counts only if it names fed's workdir or one of its ports.
    """
    out = subprocess.run(["ps", "-eo", "pid,stat,args"], capture_output=True, text=True).stdout
    mine = [str(fed.workdir)] + [f"127.0.0.1:{p}" for p in
                                 [fed.superlink_port, *fed.supernode_ports]]
    return [ln for ln in out.splitlines()[1:]
            if ("flower-" in ln or "flwr" in ln) and ln.split()[1][0] != "Z"
            and any(m in ln for m in mine)]


def start_all(fed: Federation, n: int) -> dict[str, float]:
    t = time.monotonic()
    fed.start_superlink()
    t_link = time.monotonic() - t
    t = time.monotonic()
    fed.start_supernode(0, {"partition-id": 0, "name": "alice's node"})
    t_one = time.monotonic() - t
    t = time.monotonic()
    fed.start_supernodes({i: {"partition-id": i, "name": f"n{i}"} for i in range(1, n)})
    t_rest = time.monotonic() - t
    return {"superlink_ready_s": round(t_link, 2), "supernode0_ready_s": round(t_one, 2),
            f"supernodes_1..{n - 1}_together_s": round(t_rest, 2)}


def part_a(work: Path) -> None:
    print("== Part A: 3 nodes, TLS + auth, 3 rounds of query.hello", flush=True)
    out = work / "a-out.jsonl"
    with Federation(work / "a", nodes=3) as fed:
        timings = start_all(fed, 3)
        print("  timings:", timings)
        print("  node ids:", fed.node_ids)
        print("  supernode ls:", [(n["node-id"], n["status"]) for n in fed.list_nodes()])
        t = time.monotonic()
        run_id = fed.submit(APP, {"out-file": str(out), "rounds": 3, "min-nodes": 3,
                                  "blob": BLOB})
        t_submit = time.monotonic() - t
        st = fed.wait(run_id, timeout=150)
        t_run = time.monotonic() - t
        recs = records(out)
        start = recs[0]
        rounds = [r for r in recs if r["event"] == "round"]
        print(f"  submit (flwr run) {t_submit:.2f}s; submit->finished {t_run:.2f}s; "
              f"ServerApp wall {recs[-1]['seconds']}s; status {st['status']}")
        print("  round seconds:", [r["seconds"] for r in rounds])
        print("  run_config types seen by ServerApp:", start["run_config_types"])
        for r in rounds:
            print(f"  round {r['round']}:", [(x.get("partition_id"), x.get("module_calls"),
                                            x.get("state_calls"), x.get("pid"))
                                           for x in r["replies"]])
        ids = sorted(x["partition_id"] for x in rounds[0]["replies"])
        check(ids == [0, 1, 2], f"partition ids {ids} == [0, 1, 2]")
        check(all(x["echo_ok"] and x["echo_len"] == 1048576
                  for r in rounds for x in r["replies"]), "1 MB bytes echo round-trips")
        check(start["blob_len"] == len(BLOB) and
              all(x["blob_len"] == len(BLOB) for x in rounds[0]["replies"]),
              f"long JSON run_config string ({len(BLOB)} chars) reaches Server+ClientApp")
        check(set(fed.node_ids.values()) == {x["node_id"] for x in rounds[0]["replies"]},
              "node ids from SuperNode logs == reply senders")
        calls = {(x["node_id"], r["round"]): x for r in rounds for x in r["replies"]}
        check(all(x["module_calls"] == 1 for x in calls.values()),
              "module-level counter is 1 in every reply (new process per message)")
        check(all(x["state_calls"] == r for (_, r), x in calls.items()),
              "context.state counter == round (Context.state persists per run)")
        sn_log = fed.log("supernode1")
        check("[demo ClientApp]" in sn_log, "ClientApp print() appears in supernode log")
        app_log = fed.app_log(run_id)
        check("[demo ServerApp] print() output" in app_log,
              "ServerApp print() is in `flwr log` output")
        check("[demo ServerApp]" not in fed.log("superlink"),
              "ServerApp print() is NOT in the superlink log file")

        print("== Part A1b: same, ServerApp polling pull_messages every 0.2 s", flush=True)
        out_fast = work / "a-fast.jsonl"
        t = time.monotonic()
        fast = fed.submit(APP, {"out-file": str(out_fast), "rounds": 3, "min-nodes": 3,
                                "poll": 0.2})
        fed.wait(fast, timeout=150)
        recs = records(out_fast)
        print(f"  submit->finished {time.monotonic() - t:.2f}s; round seconds:",
              [r["seconds"] for r in recs if r["event"] == "round"])
        check(all(len(r["replies"]) == 3 for r in recs if r["event"] == "round"),
              "fast-poll rounds get all 3 replies")

        print("== Part A2: a run whose ServerApp raises", flush=True)
        bad = fed.submit(APP, {"fail": True})
        t = time.monotonic()
        try:
            fed.wait(bad, timeout=60)
            check(False, "wait() raises for a failed run")
        except RuntimeError as err:
            msg = str(err)
            print(f"  wait() raised after {time.monotonic() - t:.1f}s; first lines:")
            print("    " + "\n    ".join(msg.splitlines()[:3]))
            check("finished:failed" in msg, "error names finished:failed")
            check("Traceback" in msg and "failing on purpose" in msg,
                  "error contains the ServerApp traceback (from flwr log)")
        live = fed.live_processes()
        print(f"  live processes before close: {len(live)}")
        t = time.monotonic()
    print(f"  close() took {time.monotonic() - t:.2f}s")
    left = fed.live_processes()
    check(not left, f"no tagged process left after close(): {left}")
    time.sleep(0.5)
    ps = flower_ps(fed)
    check(not ps, f"`ps` shows no flower/flwr process: {ps}")


def part_b(work: Path) -> None:
    print("== Part B: kill SuperNode 1 mid-run, restart it", flush=True)
    out = work / "b-out.jsonl"
    with Federation(work / "b", nodes=3, superexec_poll_interval=0.25) as fed:
        start_all(fed, 3)
        ids_before = dict(fed.node_ids)
        run_id = fed.submit(APP, {"out-file": str(out), "rounds": 8, "min-nodes": 3,
                                  "round-timeout": 12.0})
        wait_for(out, lambda rs: any(r.get("round") == 1 for r in rs), 90)
        t_kill = time.monotonic()
        before = set(fed.live_processes())
        fed.kill_supernode(1)
        gone = before - set(fed.live_processes())
        print(f"  killed supernode1 (+children): {len(gone)} processes gone")
        print("  supernode ls right after kill:",
              [(n["node-id"], n["status"]) for n in fed.list_nodes()])
        recs = wait_for(out, lambda rs: any(r.get("round") == 2 for r in rs), 60)
        r2 = next(r for r in recs if r.get("round") == 2)
        print(f"  round 2 returned after {r2['seconds']}s "
              f"({time.monotonic() - t_kill:.1f}s after kill): "
              f"{[(x['src_node_id'], x.get('partition_id'), x.get('error')) for x in r2['replies']]}")
        check(sorted(x.get("partition_id") for x in r2["replies"]) == [0, 2],
              "round 2: only live nodes 0 and 2 reply")
        check(11.5 <= r2["seconds"] <= 16.0, "round 2 ends at its 12 s timeout")
        t = time.monotonic()
        fed.start_supernode(1, {"partition-id": 1, "name": "n1"})
        attempts = fed.log("supernode1").count("harness: starting") - 1
        print(f"  restarted supernode1 in {time.monotonic() - t:.2f}s "
              f"({time.monotonic() - t_kill:.1f}s after kill, {attempts} launch(es)); "
              f"id before {ids_before[1]}, after {fed.node_ids[1]}")
        check(fed.node_ids[1] == ids_before[1], "restarted node keeps its node id")
        fed.wait(run_id, timeout=150)
        for r in records(out):
            if r["event"] == "round":
                print(f"  round {r['round']} ({r['seconds']}s) sent_to={len(r['sent_to'])}:",
                      [(x.get("partition_id"), x.get("error", {}).get("code"))
                       for x in r["replies"]])
        last = [r for r in records(out) if r["event"] == "round"][-1]
        check(sorted(x.get("partition_id") for x in last["replies"]) == [0, 1, 2],
              "restarted node 1 answers again in the last round")
        print("  supernode ls at end:", [(n["node-id"], n["status"]) for n in fed.list_nodes()])
    check(not fed.live_processes(), "no tagged process left after close()")
    time.sleep(0.5)
    ps = flower_ps(fed)
    check(not ps, f"`ps` shows no flower/flwr process: {ps}")


def main() -> int:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="fed-"))
    work.mkdir(parents=True, exist_ok=True)
    print("workdir:", work)
    t = time.monotonic()
    part_a(work)
    part_b(work)
    print(f"total {time.monotonic() - t:.1f}s; failures: {failures or 'none'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
