"""A transport that hands each request to a :class:`fedmutual.deploy.node.Node` in this process.

Requests and replies still cross as the flat records a network carries (bytes and plain values), so the
server and each node share no object; a node that is "down" answers nothing, as a killed one would.
"""

from __future__ import annotations

from typing import Mapping

from fedmutual.deploy.node import Node
from fedmutual.runtimes.remote import Payload


class Loopback:
    def __init__(self, nodes: Mapping[int, Node]):
        self.live: dict[int, Node] = dict(nodes)
        self.down: set[int] = set()
        self.sent: list[tuple[str, int, Payload]] = []

    def nodes(self) -> list[int]:
        return sorted(n for n in self.live if n not in self.down)

    def exchange(self, kind: str, requests: Mapping[int, Payload], timeout: float) -> dict[int, Payload | str]:
        out: dict[int, Payload | str] = {}
        for node, req in requests.items():
            self.sent.append((kind, node, dict(req)))
            if node in self.down or node not in self.live:
                continue
            out[node] = dict(self.live[node].handle(kind, dict(req)))
        return out
