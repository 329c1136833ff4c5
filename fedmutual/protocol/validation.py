"""Checks every received message passes before a party uses it.

A reply is compared with what the receiver expects (usually the tensors it sent,
e.g. the global model a client was asked to train): the same keys, shapes and
dtypes, only finite values, and a size that a message of that shape can have.
The size is checked on the raw bytes before they are parsed, so an oversized
message costs nothing to refuse. Every failure raises :class:`MessageRejected`
with one plain reason; the caller logs it with the sender's name and never
uses the message.
"""

from __future__ import annotations

from typing import Mapping

import torch

from fedmutual.protocol.messages import Message, decode

HEADER_SLACK = 64 * 1024  # safetensors header bytes allowed beyond the tensor payload


class MessageRejected(Exception):
    """A received message that fails validation; ``reason`` says why in plain words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def expected_bytes(like: Mapping[str, torch.Tensor]) -> int:
    """The tensor payload of a message shaped like ``like``."""
    return sum(t.numel() * t.element_size() for t in like.values())


def size_limit(like: Mapping[str, torch.Tensor] | None, max_bytes: int) -> int:
    """The largest message accepted: ``max_bytes``, or less when the expected shape is known."""
    if like is None:
        return max_bytes
    return min(max_bytes, expected_bytes(like) + HEADER_SLACK)


def parse(data: bytes, limit: int) -> Message:
    """Parse raw message bytes, refusing oversized or unreadable ones."""
    if len(data) > limit:
        raise MessageRejected(f"the message has {len(data)} bytes, more than the {limit} bytes a message of the expected shape may have")
    try:
        return decode(data)
    except Exception as e:  # safetensors, struct and json each raise their own kinds on garbage
        raise MessageRejected(f"the message is not readable safetensors ({type(e).__name__}: {str(e)[:120]})") from None


def check(msg: Message, like: Mapping[str, torch.Tensor] | None) -> None:
    """Keys, shapes and dtypes against ``like`` (when given), and finite values in every floating tensor."""
    if like is not None:
        missing = sorted(set(like) - set(msg.tensors))
        if missing:
            raise MessageRejected(f"missing tensors {_names(missing)}")
        extra = sorted(set(msg.tensors) - set(like))
        if extra:
            raise MessageRejected(f"unexpected tensors {_names(extra)}")
        for key, ref in like.items():
            got = msg.tensors[key]
            if tuple(got.shape) != tuple(ref.shape):
                raise MessageRejected(f"tensor {key!r} has shape {list(got.shape)}, expected {list(ref.shape)}")
            if got.dtype != ref.dtype:
                raise MessageRejected(f"tensor {key!r} has dtype {_dt(got.dtype)}, expected {_dt(ref.dtype)}")
    for key in (like if like is not None else msg.tensors):
        t = msg.tensors[key]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise MessageRejected(f"tensor {key!r} has {bad} non-finite values (NaN or Inf)")


def receive(data: bytes, like: Mapping[str, torch.Tensor] | None, max_bytes: int) -> Message:
    """Everything a receiver checks, in order: size, parse, keys, shapes, dtypes, finite values."""
    msg = parse(data, size_limit(like, max_bytes))
    check(msg, like)
    return msg


def _names(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:5])
    return shown + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
