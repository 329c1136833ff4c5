"""Message passing between parties, counted in bytes and validated on receipt."""

from fedmutual.transport.messages import Message, decode, encode
from fedmutual.transport.inprocess import InProcessTransport
from fedmutual.transport.validation import MessageRejected

__all__ = ["Message", "encode", "decode", "InProcessTransport", "MessageRejected"]
