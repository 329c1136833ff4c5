"""The protocol layer: messages, party states, asks and replies, and the :class:`Algorithm` interface.

Everything an algorithm file needs, and nothing of any runtime.
"""

from fedmutual.protocol.algorithm import Algorithm, sample_participants
from fedmutual.protocol.asks import Ask, Replies, Round, Work, handles
from fedmutual.protocol.messages import Message, decode, encode
from fedmutual.protocol.run import ClientData, ClientEnv, RunSpec
from fedmutual.protocol.state import State, state_of
from fedmutual.protocol.validation import MessageRejected

__all__ = [
    "Algorithm", "Ask", "ClientData", "ClientEnv", "Message", "MessageRejected", "Replies", "Round", "RunSpec",
    "State", "Work", "decode", "encode", "handles", "sample_participants", "state_of",
]
