"""Message passing between parties, counted in bytes."""

from fedmutual.transport.messages import Message, decode, encode
from fedmutual.transport.inprocess import InProcessTransport

__all__ = ["Message", "encode", "decode", "InProcessTransport"]
