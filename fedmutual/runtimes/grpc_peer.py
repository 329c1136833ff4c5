"""gRPC between peers, with mutual TLS: how the peer-to-peer runtime's requests and replies travel.

Every peer runs one gRPC server and holds one channel to every other peer. A request is one unary call of
``/fedmutual.Peer/Call``: its body is the algorithm's message (the same safetensors bytes that the in-process runtime
counts; empty for a bare request) and its invocation metadata ``fedmutual-request`` holds the request's other plain
values as JSON (``kind``, ``round``, ...). The reply's body is the answer's message, its trailing metadata
``fedmutual-reply`` the answer's other values (``steps``, ``loss``, ``error``).

Both ends prove who they are with certificates of one CA (``scripts/peer-certs.sh`` makes test ones): a caller checks
that the peer it reaches holds peer k's certificate (the name ``peer<k>`` in its subjectAltName), and a server takes
the caller's identity from its certificate's common name, never from what the request says.

A call that fails to connect or passes its deadline is a missing reply; a call the other end refused is an error
text. Every message that leaves or reaches this peer is written to its transport log (who, to whom, which round and
kind, bytes, and the names, dtypes and shapes of the tensors, read from the safetensors header), so that what each
peer ever saw can be checked afterwards.
"""

from __future__ import annotations

import json
import struct
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any, Callable, Mapping

import grpc

from fedmutual.errors import ConfigError
from fedmutual.runtimes.remote import Payload

METHOD = "/fedmutual.Peer/Call"
REQUEST, REPLY = "fedmutual-request", "fedmutual-reply"
#: Channel settings: reconnect quickly to a peer that comes back, and carry messages up to the run's limit.
_BACKOFF = [("grpc.initial_reconnect_backoff_ms", 500), ("grpc.min_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 2000)]

#: Handles one request: (kind, payload, caller) -> the reply payload.
Serve = Callable[[str, Payload, int], Payload]


def peer_name(k: int) -> str:
    """The name in peer k's certificate (its common name and a subjectAltName)."""
    return f"peer{k}"


def tensor_header(data: bytes) -> tuple[dict[str, list[Any]], dict[str, str]]:
    """The tensors (name -> [dtype, shape]) and metadata of a safetensors message, from its header alone."""
    if len(data) < 8:
        return {}, {}
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
    except (ValueError, struct.error):
        return {"<unreadable>": ["", []]}, {}
    meta = header.pop("__metadata__", {}) or {}
    return {k: [v.get("dtype", ""), v.get("shape", [])] for k, v in header.items()}, dict(meta)


class TransportLog:
    """Appends one JSON line per message that leaves or reaches this peer."""

    def __init__(self, path: Path | None, me: int):
        self.path, self.me = path, me
        self._lock = threading.Lock()

    def add(self, way: str, other: int, kind: str, rnd: Any, data: bytes) -> None:
        if self.path is None:
            return
        tensors, meta = tensor_header(data)
        src, dst = (self.me, other) if way == "sent" else (other, self.me)
        row = {"time": round(time.time(), 3), "way": way, "src": src, "dst": dst, "kind": kind, "round": rnd,
               "bytes": len(data), "meta": meta, "tensors": tensors}
        with self._lock, open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _split(payload: Mapping[str, Any]) -> tuple[bytes, str]:
    """A payload as (its ``data`` bytes, the JSON of its other values)."""
    data = payload.get("data", b"")
    rest = {k: v for k, v in payload.items() if k != "data"}
    bad = [k for k, v in rest.items() if isinstance(v, bytes)]
    if not isinstance(data, bytes) or bad:
        raise ValueError(f"a peer request carries bytes only in 'data' (not in {', '.join(bad) or 'data'})")
    return data, json.dumps(rest)


def _join(data: bytes, values: str | bytes | None) -> Payload:
    out: Payload = json.loads(values) if values else {}
    out["data"] = data
    return out


def _metadata(pairs: Any, key: str) -> str | None:
    for k, v in pairs or ():
        if k == key:
            return v.decode() if isinstance(v, bytes) else str(v)
    return None


class Credentials:
    """The CA every peer trusts, and this peer's certificate and key (PEM bytes)."""

    def __init__(self, ca: Path, cert: Path, key: Path):
        try:
            self.ca, self.cert, self.key = ca.read_bytes(), cert.read_bytes(), key.read_bytes()
        except OSError as e:
            raise ConfigError(f"peers: cannot read a certificate or key: {e}; make test ones with "
                              "`sh scripts/peer-certs.sh DIR N`") from None


class PeerServer:
    """This peer's gRPC server: every call is handed to ``serve`` with the caller's identity from its certificate."""

    def __init__(self, address: str, me: int, creds: Credentials, serve: Serve, max_bytes: int, log: TransportLog,
                 workers: int = 8):
        self.me, self.serve, self.log = me, serve, log
        options = [("grpc.max_receive_message_length", max_bytes), ("grpc.max_send_message_length", max_bytes)]
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=options)
        handler = grpc.unary_unary_rpc_method_handler(self._call)
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("fedmutual.Peer", {"Call": handler})])
        tls = grpc.ssl_server_credentials([(creds.key, creds.cert)], root_certificates=creds.ca, require_client_auth=True)
        port = address.rpartition(":")[2]
        fallback = f"0.0.0.0:{port}" if address.startswith("[::]") else None  # a machine without IPv6
        if not self.server.add_secure_port(address, tls) and not (fallback and self.server.add_secure_port(fallback, tls)):
            raise ConfigError(f"peer {me}: cannot listen on {address} (in use, or not an address of this machine)")
        self.address = address

    def start(self) -> None:
        self.server.start()

    def stop(self, grace: float = 1.0) -> None:
        self.server.stop(grace).wait()

    def _caller(self, context: grpc.ServicerContext) -> int:
        names = context.auth_context().get("x509_common_name") or []
        name = names[0].decode() if names else ""
        if not name.startswith("peer") or not name[4:].isdigit():
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"a caller's certificate names {name!r}, not a peer")
        return int(name[4:])

    def _call(self, body: bytes, context: grpc.ServicerContext) -> bytes:
        caller = self._caller(context)
        try:
            req = _join(body, _metadata(context.invocation_metadata(), REQUEST))
        except ValueError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request's metadata is not JSON")
        kind = str(req.pop("kind", ""))
        self.log.add("received", caller, kind, req.get("round"), body)
        reply = self.serve(kind, req, caller)
        data, values = _split(reply)
        self.log.add("sent", caller, kind, req.get("round"), data)
        context.set_trailing_metadata(((REPLY, values),))
        return data


class PeerClient:
    """Channels to the other peers; an exchange calls them all at once and waits for the replies until a deadline."""

    def __init__(self, me: int, addresses: Mapping[int, str], creds: Credentials, max_bytes: int, log: TransportLog):
        self.me, self.log = me, log
        tls = grpc.ssl_channel_credentials(root_certificates=creds.ca, private_key=creds.key, certificate_chain=creds.cert)
        self.channels: dict[int, grpc.Channel] = {}
        self.calls: dict[int, Any] = {}
        for k, address in addresses.items():
            if k == me:
                continue
            options = [("grpc.ssl_target_name_override", peer_name(k)), ("grpc.max_receive_message_length", max_bytes),
                       ("grpc.max_send_message_length", max_bytes), *_BACKOFF]
            channel = grpc.secure_channel(address, tls, options=options)
            self.channels[k] = channel
            self.calls[k] = channel.unary_unary(METHOD)

    def nodes(self) -> list[int]:
        return sorted(self.channels)

    def exchange(self, kind: str, requests: Mapping[int, Payload], timeout: float) -> dict[int, Payload | str]:
        """Send each peer its request; the replies that came within ``timeout`` s (an error as its text)."""
        pending = {}
        for k, payload in requests.items():
            if k not in self.calls:
                raise ValueError(f"peer {k} is not in peers.toml")
            data, values = _split({**payload, "kind": kind})
            self.log.add("sent", k, kind, payload.get("round"), data)
            # the future is also the call: its trailing metadata carries the reply's values
            pending[k] = self.calls[k].future(data, metadata=((REQUEST, values),), timeout=timeout, wait_for_ready=True)
        out: dict[int, Payload | str] = {}
        for k, fut in pending.items():
            try:
                body = fut.result()
            except grpc.RpcError as e:
                code = fut.code()
                if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    continue  # down or slow: a missing reply
                out[k] = f"peer {k} refused the request ({code.name if code else 'error'}): {fut.details() or e}"
                continue
            reply = _join(body, _metadata(fut.trailing_metadata(), REPLY))
            self.log.add("received", k, kind, requests[k].get("round"), body)
            out[k] = reply
        return out

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()
