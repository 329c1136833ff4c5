"""ServerApp: send one `query.hello` per connected node per round, record the replies."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


def _payload(size: int) -> bytes:
    return bytes(i % 256 for i in range(size))  # b"\x00\x01\x02..."


def _write(out_file: str, record: dict[str, Any]) -> None:
    if out_file:
        with open(out_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _wait_for_nodes(grid: Grid, n: int, timeout: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        ids = sorted(grid.get_node_ids())
        if len(ids) >= n or time.monotonic() > deadline:
            return ids
        time.sleep(0.5)


def _exchange(grid: Grid, messages: list[Message], timeout: float,
              poll: float) -> list[Message]:
    """send_and_receive (which re-polls every 3 s), or the same with a `poll` s loop."""
    if poll <= 0:
        return list(grid.send_and_receive(messages, timeout=timeout))
    pending = {mid for mid in grid.push_messages(messages) if mid}
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while pending and time.monotonic() < deadline:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if pending:
            time.sleep(poll)
    return replies


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    out_file = str(cfg["out-file"])
    rounds = int(cfg["rounds"])
    timeout = float(cfg["round-timeout"])
    payload = _payload(int(cfg["payload-bytes"]))
    print(f"[demo ServerApp] print() output, pid={os.getpid()}", flush=True)
    if cfg["fail"]:
        raise RuntimeError("demo ServerApp failing on purpose (fail=true)")

    t0 = time.monotonic()
    node_ids = _wait_for_nodes(grid, int(cfg["min-nodes"]))
    _write(out_file, {
        "event": "start",
        "node_ids": node_ids,
        "wait_nodes_s": round(time.monotonic() - t0, 3),
        "run_config_types": {k: type(v).__name__ for k, v in cfg.items()},
        "blob_len": len(str(cfg["blob"])),
        "server_pid": os.getpid(),
    })

    for rnd in range(1, rounds + 1):
        node_ids = sorted(grid.get_node_ids())
        messages = [
            Message(
                RecordDict({"hello": ConfigRecord({"round": rnd, "payload": payload})}),
                dst_node_id=nid,
                message_type="query.hello",
                group_id=str(rnd),
            )
            for nid in node_ids
        ]
        t = time.monotonic()
        replies = _exchange(grid, messages, timeout, float(cfg["poll"]))
        elapsed = time.monotonic() - t
        rows = []
        for rep in replies:
            row: dict[str, Any] = {"src_node_id": rep.metadata.src_node_id}
            if rep.has_error():
                row["error"] = {"code": rep.error.code, "reason": rep.error.reason}
            else:
                r = rep.content.config_records["hello"]
                echo = r["payload"]
                row.update({
                    "node_id": int(str(r["node-id"])),
                    "partition_id": r["partition-id"],
                    "module_calls": r["module-calls"],
                    "state_calls": r["state-calls"],
                    "pid": r["pid"],
                    "echo_ok": echo == payload,
                    "echo_len": len(echo) if isinstance(echo, bytes) else -1,
                    "blob_len": r["blob-len"],
                    "node_config_keys": r["node-config-keys"],
                })
            rows.append(row)
        _write(out_file, {
            "event": "round", "round": rnd, "sent_to": node_ids,
            "seconds": round(elapsed, 3), "replies": rows,
        })
        print(f"[demo ServerApp] round {rnd}: {len(rows)}/{len(node_ids)} replies "
              f"in {elapsed:.2f}s", flush=True)

    _write(out_file, {"event": "done", "seconds": round(time.monotonic() - t0, 3)})
