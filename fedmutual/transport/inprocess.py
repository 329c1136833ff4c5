"""The simulation transport: every message is serialized, counted and parsed in memory."""

from __future__ import annotations

from collections import defaultdict

import torch

from fedmutual.transport.messages import Message, decode, encode


class InProcessTransport:
    """Delivers messages between parties in one process, counting the bytes of each.

    Parties are named by strings such as ``"server"`` or ``"client3"``. The
    receiver gets a parsed copy of what was serialized, so nothing is shared by
    reference between parties.
    """

    def __init__(self, device: torch.device | str = "cpu", record: bool = False):
        self.device = torch.device(device)
        self.sent: dict[str, int] = defaultdict(int)
        self.received: dict[str, int] = defaultdict(int)
        self.record = record
        self.log: list[tuple[str, str, int, dict[str, str]]] = []  # (src, dst, bytes, meta) when record is on
        self.messages: list[tuple[str, str, Message]] = []  # (src, dst, what dst received) when record is on

    def send(self, src: str, dst: str, msg: Message) -> Message:
        data = encode(msg)
        self.sent[src] += len(data)
        self.received[dst] += len(data)
        if self.record:
            self.log.append((src, dst, len(data), dict(msg.meta)))
        out = decode(data)
        if self.record:
            self.messages.append((src, dst, decode(data)))
        if self.device.type != "cpu":
            out.tensors = {k: v.to(self.device) for k, v in out.tensors.items()}
        return out

    def reset_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Return (sent, received) byte counts since the last reset, and start again."""
        sent, received = dict(self.sent), dict(self.received)
        self.sent.clear()
        self.received.clear()
        return sent, received
