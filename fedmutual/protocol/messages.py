"""Messages are explicit dicts of tensors plus string metadata.

They are serialized with safetensors, which cannot execute code when read, so a
message can cross a real network and be counted byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


@dataclass
class Message:
    """What one party sends another: named tensors and string metadata.

    A message with neither is an acknowledgement (or a bare request): it carries nothing, so it
    costs no bytes, and no deadline applies to it.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """Whether the message carries nothing (no tensors, no metadata)."""
        return not self.tensors and not self.meta


def encode(msg: Message) -> bytes:
    """Serialize to safetensors bytes (tensors are moved to the CPU and made contiguous)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in msg.tensors.items()}
    return st_save(tensors, metadata=dict(msg.meta) or None)


def decode(data: bytes) -> Message:
    """Parse safetensors bytes back into a Message."""
    import json
    import struct

    tensors = st_load(data)
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    return Message(tensors=tensors, meta=dict(header.get("__metadata__", {}) or {}))
