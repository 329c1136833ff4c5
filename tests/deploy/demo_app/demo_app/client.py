"""ClientApp: answer `query.hello` with the node's partition-id and echo the payload."""

from __future__ import annotations

import os

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()

# Module-level state: survives between messages only if the module stays imported.
_MODULE_CALLS = 0


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    global _MODULE_CALLS
    _MODULE_CALLS += 1
    # Context.state: kept by the SuperNode per run, shipped to each ClientApp process.
    rec = context.state.get("demo", ConfigRecord({"calls": 0}))
    assert isinstance(rec, ConfigRecord)
    calls = rec["calls"]
    assert isinstance(calls, int)
    rec["calls"] = calls + 1
    context.state["demo"] = rec
    inbound = msg.content.config_records["hello"]
    print(f"[demo ClientApp] node {context.node_id} round {inbound['round']!r} "
          f"pid {os.getpid()}", flush=True)
    reply = ConfigRecord({
        "node-id": str(context.node_id),  # str: uint64 may exceed int64 range
        "partition-id": context.node_config["partition-id"],
        "module-calls": _MODULE_CALLS,
        "state-calls": rec["calls"],
        "pid": os.getpid(),
        "payload": inbound["payload"],
        "blob-len": len(str(context.run_config["blob"])),
        "node-config-keys": sorted(context.node_config),
    })
    return Message(RecordDict({"hello": reply}), reply_to=msg)
