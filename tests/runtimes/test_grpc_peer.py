"""gRPC between peers with mutual TLS: real servers and channels on localhost ports, certificates from
scripts/peer-certs.sh."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("grpc")

from fedmutual.protocol import Message  # noqa: E402
from fedmutual.protocol.messages import encode  # noqa: E402
from fedmutual.runtimes.grpc_peer import Credentials, PeerClient, PeerServer, TransportLog, tensor_header  # noqa: E402


REPO_ROOT = Path(__file__).resolve().parents[2]

MAX = 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    subprocess.run(["sh", str(REPO_ROOT / "scripts" / "peer-certs.sh"), str(d / "a"), "3"], check=True, capture_output=True)
    subprocess.run(["sh", str(REPO_ROOT / "scripts" / "peer-certs.sh"), str(d / "b"), "3"], check=True, capture_output=True)
    return d


def _creds(d: Path, k: int) -> Credentials:
    return Credentials(d / "ca.crt", d / f"peer{k}.crt", d / f"peer{k}.key")


def test_the_safetensors_header_names_the_tensors_and_metadata() -> None:
    data = encode(Message({"w": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.float64)}, {"owner": "2"}))
    tensors, meta = tensor_header(data)
    assert tensors == {"w": ["F32", [2, 3]], "b": ["F64", [4]]} and meta["owner"] == "2"
    assert tensor_header(b"") == ({}, {})


def test_a_call_carries_the_message_and_values_and_the_server_knows_the_caller_from_its_certificate(certs: Path, tmp_path: Path) -> None:
    seen: list[tuple[str, dict[str, Any], int]] = []

    def serve(kind: str, req: dict[str, Any], caller: int) -> dict[str, Any]:
        seen.append((kind, req, caller))
        return {"data": req["data"][::-1], "steps": 7, "loss": [0.5]}

    port = free_port()
    server = PeerServer(f"127.0.0.1:{port}", 1, _creds(certs / "a", 1), serve, MAX, TransportLog(tmp_path / "s.jsonl", 1))
    server.start()
    client = PeerClient(0, {0: "127.0.0.1:1", 1: f"127.0.0.1:{port}"}, _creds(certs / "a", 0), MAX, TransportLog(tmp_path / "c.jsonl", 0))
    try:
        got = client.exchange("query.model", {1: {"data": b"abc", "round": 3, "run": "r"}}, timeout=20)
    finally:
        client.close()
        server.stop()
    assert got == {1: {"data": b"cba", "steps": 7, "loss": [0.5]}}
    assert seen == [("query.model", {"data": b"abc", "round": 3, "run": "r"}, 0)]  # caller 0, from its certificate
    rows = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert [(r["way"], r["src"], r["dst"], r["bytes"], r["round"]) for r in rows] == [("sent", 0, 1, 3, 3), ("received", 1, 0, 3, 3)]


def test_a_caller_with_a_certificate_of_another_ca_is_refused(certs: Path, tmp_path: Path) -> None:
    port = free_port()
    server = PeerServer(f"127.0.0.1:{port}", 1, _creds(certs / "a", 1), lambda *a: {"data": b""}, MAX, TransportLog(None, 1))
    server.start()
    stranger = PeerClient(0, {1: f"127.0.0.1:{port}"}, _creds(certs / "b", 0), MAX, TransportLog(None, 0))
    try:
        got = stranger.exchange("query.model", {1: {"round": 0}}, timeout=3)
    finally:
        stranger.close()
        server.stop()
    assert got == {}  # the handshake fails: no reply, as from a peer that is down


def test_a_peer_that_is_down_or_slow_is_a_missing_reply_after_the_deadline(certs: Path) -> None:
    port, down = free_port(), free_port()
    release = threading.Event()

    def slow(kind: str, req: dict[str, Any], caller: int) -> dict[str, Any]:
        release.wait(10)
        return {"data": b""}

    server = PeerServer(f"127.0.0.1:{port}", 1, _creds(certs / "a", 1), slow, MAX, TransportLog(None, 1))
    server.start()
    client = PeerClient(0, {1: f"127.0.0.1:{port}", 2: f"127.0.0.1:{down}"}, _creds(certs / "a", 0), MAX, TransportLog(None, 0))
    try:
        start = time.monotonic()
        got = client.exchange("query.model", {1: {"round": 0}, 2: {"round": 0}}, timeout=1.5)
        took = time.monotonic() - start
    finally:
        release.set()
        client.close()
        server.stop()
    assert got == {} and took < 9  # both missing; the calls ran side by side, each stopped at its deadline


def test_a_refusal_is_an_error_text(certs: Path) -> None:
    port = free_port()

    def refuse(kind: str, req: dict[str, Any], caller: int) -> dict[str, Any]:
        raise RuntimeError("boom")

    server = PeerServer(f"127.0.0.1:{port}", 1, _creds(certs / "a", 1), refuse, MAX, TransportLog(None, 1))
    server.start()
    client = PeerClient(0, {1: f"127.0.0.1:{port}"}, _creds(certs / "a", 0), MAX, TransportLog(None, 0))
    try:
        got = client.exchange("query.model", {1: {"round": 0}}, timeout=20)
    finally:
        client.close()
        server.stop()
    assert isinstance(got[1], str) and "refused" in got[1]
