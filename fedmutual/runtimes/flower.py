"""Flower's grid as a :class:`~fedmutual.runtimes.remote.Transport`: requests become Flower messages.

Each request is one Flower ``Message`` to its node, of the ask's own message type where Flower accepts it
(``train.mutual``; see :func:`flower_type`), whose content holds the request's plain values in one ``ConfigRecord`` named
``fedmutual`` (the algorithm's message is its ``data`` bytes, exactly what the in-process runtime counts).
The replies are pulled every ``poll`` seconds until all have come or the deadline passes; a reply that is a
Flower error (the ClientApp raised, or the node went away) is returned as its error text.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

from fedmutual.runtimes.remote import Payload

RECORD = "fedmutual"
CATEGORIES = ("train", "evaluate", "query")


def flower_type(kind: str) -> str:
    """The Flower message type for an ask's ``kind``: the kind itself when Flower accepts it (``train.mutual``),
    else ``train.<verb>_<action>`` (Flower's types start with train, evaluate or query; ``init.model`` does not).
    The request carries the kind itself as ``kind``, which the ClientApp dispatches on."""
    verb, _, action = kind.partition(".")
    if verb in CATEGORIES and action.isidentifier():
        return kind
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in kind)
    return f"train.{name if name.isidentifier() else 'x' + name}"


def to_record(payload: Mapping[str, Any]) -> Any:
    """A payload as Flower's ``RecordDict`` (one ConfigRecord)."""
    from flwr.app import ConfigRecord, RecordDict

    return RecordDict({RECORD: ConfigRecord(dict(payload))})


def from_record(content: Any) -> Payload:
    """The payload in a Flower message's content (``{"error": ...}`` when it has none)."""
    if RECORD not in content.config_records:
        return {"error": f"the message carries no {RECORD!r} record"}
    return dict(content.config_records[RECORD])


class GridTransport:
    """Requests and replies over a ServerApp's ``grid``."""

    def __init__(self, grid: Any, poll: float = 0.1):
        self.grid, self.poll = grid, poll

    def nodes(self) -> list[int]:
        return sorted(self.grid.get_node_ids())

    def exchange(self, kind: str, requests: Mapping[int, Payload], timeout: float) -> dict[int, Payload | str]:
        from flwr.app import Message

        if not requests:
            return {}
        msgs = [Message(to_record({**p, "kind": kind}), dst_node_id=node, message_type=flower_type(kind), ttl=timeout,
                        group_id=str(p.get("round", ""))) for node, p in requests.items()]
        ids = list(self.grid.push_messages(msgs))
        node_of = {mid: node for mid, node in zip(ids, requests) if mid}
        pending = set(node_of)
        out: dict[int, Payload | str] = {}
        deadline = time.monotonic() + timeout
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                mid = reply.metadata.reply_to_message_id
                if mid not in pending:
                    continue
                pending.discard(mid)
                node = node_of[mid]
                if reply.has_error():
                    out[node] = f"Flower error {reply.error.code}: {reply.error.reason}"
                else:
                    out[node] = from_record(reply.content)
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(self.poll)
        return out
