"""The simulation transport: every message is serialized, counted, validated and parsed in memory."""

from __future__ import annotations

from collections import defaultdict
from typing import Mapping

import torch

from fedmutual.transport.messages import Message, decode, encode
from fedmutual.transport.validation import receive

DEFAULT_MAX_BYTES = 1 << 30


class InProcessTransport:
    """Delivers messages between parties in one process, counting the bytes of each.

    Parties are named by strings such as ``"server"`` or ``"client3"``. The
    receiver gets a parsed copy of what was serialized, so nothing is shared by
    reference between parties. Every message is validated on receipt
    (:func:`fedmutual.transport.validation.receive`), which raises
    :class:`~fedmutual.transport.validation.MessageRejected`.
    """

    def __init__(self, device: torch.device | str = "cpu", record: bool = False, max_bytes: int = DEFAULT_MAX_BYTES):
        self.device = torch.device(device)
        self.sent: dict[str, int] = defaultdict(int)
        self.received: dict[str, int] = defaultdict(int)
        self.record = record
        self.max_bytes = max_bytes
        self.log: list[tuple[str, str, int, dict[str, str]]] = []  # (src, dst, bytes, meta) when record is on
        self.messages: list[tuple[str, str, Message]] = []  # (src, dst, what dst received) when record is on

    def send(self, src: str, dst: str, msg: Message, like: Mapping[str, torch.Tensor] | None = None) -> Message:
        """Serialize, count, then validate against ``like`` and parse what the receiver gets."""
        return self.deliver(src, dst, encode(msg), like, dict(msg.meta))

    def deliver(self, src: str, dst: str, data: bytes, like: Mapping[str, torch.Tensor] | None = None,
                meta: dict[str, str] | None = None) -> Message:
        """Carry raw bytes from ``src`` to ``dst`` (a real network delivers bytes, whatever they hold)."""
        self.sent[src] += len(data)
        self.received[dst] += len(data)
        if self.record:
            self.log.append((src, dst, len(data), dict(meta or {})))
        out = receive(data, like, self.max_bytes)
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
