"""What a coordinator's round and the clients' handlers exchange: asks, replies and training work.

A round is a generator. Each ``yield Ask(...)`` sends one named request to some clients; the runtime
delivers it, runs the addressees' handlers for ``Ask.kind``, trains their :class:`Work` together, and
sends the generator back the :class:`Replies` that arrived valid. Lost, late, crashed and rejected
replies are simply absent, so a round never sees a fault, only fewer replies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Generator, Mapping

import torch

from fedmutual.engine.cohort import ClientJob, JobResult
from fedmutual.protocol.messages import Message

Schema = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Ask:
    """One step of a round: each client in ``to`` runs the handler of ``kind`` on its message and replies.

    - ``kind``: the handler's name, ``"<verb>.<action>"`` as Flower's message types (``train.mutual``,
      ``query.model``);
    - ``to``: client index -> its message (``Message()`` for a bare request, which costs no bytes);
    - ``like``: what every reply must match in keys, shapes and dtypes (None: only the checks that need no
      schema: size, readability, finite values). A hostile client's ``sign_flip`` reflects its reply about it;
    - ``content``: what the replies carry (``weights``, ``probabilities`` or ``logits``), for attacks;
    - ``gather``: the replies are gathered to be combined, so with fewer than ``faults.min_replies`` valid
      replies from other parties the round is skipped and the replies come back empty;
    - ``expect``: per addressee, what its request must match (default: the request itself). A peer
      coordinator's requests are checked by their receivers like any client's message.
    """

    kind: str
    to: Mapping[int, Message]
    like: Schema | None = None
    content: str = "weights"
    gather: bool = False
    expect: Mapping[int, Schema] | None = None


@dataclass
class Work:
    """A handler's answer when it has training to do: the job, and how to build the reply from its result.

    The runtime trains the jobs of all addressees of one ask together (one cohort, stacked where the
    models allow), then calls ``reply`` with each job's result, as FedJAX's client_init/step/final.
    """

    job: ClientJob
    reply: Callable[[JobResult], Message]


class Replies(dict[int, Message]):
    """The valid replies that reached the coordinator, by client, in the order the ask listed them.

    ``trained`` holds the training results the runtime measured for this ask, by client: in process, of every
    client that finished its training (whether or not its reply arrived); over a network, of the replies that
    arrived. They are telemetry for the round's statistics, not part of any message.
    """

    def __init__(self, replies: Mapping[int, Message] | None = None, trained: Mapping[int, JobResult] | None = None):
        super().__init__(replies or {})
        self.trained: dict[int, JobResult] = dict(trained or {})

    def mean_loss(self, member: int = 0) -> float:
        """Mean over clients of one member's mean training loss (NaN when no client finished training)."""
        vals = [r.loss[member] for r in self.trained.values() if r.steps]
        return sum(vals) / len(vals) if vals else math.nan


#: A coordinator's round (or setup): yields asks, receives replies, returns the round's statistics.
Round = Generator[Ask, Replies, dict[str, float]]


@dataclass
class Handler:
    """A client handler registered with :func:`handles`."""

    kind: str
    fn: Callable[..., Message | Work] = field(repr=False)


def handles(kind: str) -> Callable[[Callable[..., Message | Work]], Callable[..., Message | Work]]:
    """Mark an algorithm method as the client handler of message type ``kind``.

    The method is called as ``handler(me, msg, env)``: this client's own state, the message it received, and
    its environment (:class:`fedmutual.protocol.ClientEnv`). It returns the reply, or :class:`Work`.
    """
    if "." not in kind or not all(kind.split(".", 1)):
        raise ValueError(f"message type {kind!r}: use '<verb>.<action>', e.g. 'train.mutual' or 'query.model'")

    def mark(fn: Callable[..., Message | Work]) -> Callable[..., Message | Work]:
        fn.fedmutual_handles = kind  # type: ignore[attr-defined]
        return fn

    return mark
