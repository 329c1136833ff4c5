"""Messages: safetensors bytes that round-trip, and byte counts that are the serialized size."""

import torch

from fedmutual.protocol import Message, decode, encode
from fedmutual.runtimes.inprocess import Traffic


def test_round_trip_and_the_receiver_holds_a_copy():
    msg = Message({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "n": torch.tensor([3])}, {"round": "4"})
    data = encode(msg)
    back = decode(data)
    assert torch.equal(back.tensors["w"], msg.tensors["w"]) and torch.equal(back.tensors["n"], msg.tensors["n"])
    assert back.meta == {"round": "4"}
    # 24 bytes of float32 and 8 of int64 payload, plus the header
    assert len(data) > 32
    back.tensors["w"][0, 0] = 100.0
    assert msg.tensors["w"][0, 0] == 0.0


def test_an_empty_message_carries_nothing():
    assert Message().empty and not Message(meta={"a": "b"}).empty and not Message({"x": torch.zeros(1)}).empty
    back = decode(encode(Message()))
    assert back.tensors == {} and back.meta == {}


def test_traffic_counts_the_bytes_of_each_sender_and_receiver():
    msg = Message({"w": torch.zeros(2, 3)}, {"round": "1"})
    n = len(encode(msg))
    t = Traffic(record=True)
    t.add("server", "client0", n, msg.meta)
    t.add("server", "client1", n, msg.meta)
    t.add("client0", "server", 2 * n, {})
    sent, received = t.reset()
    assert sent == {"server": 2 * n, "client0": 2 * n} and received == {"client0": n, "client1": n, "server": 2 * n}
    assert t.log == [("server", "client0", n, {"round": "1"}), ("server", "client1", n, {"round": "1"}), ("client0", "server", 2 * n, {})]
    assert t.reset() == ({}, {})  # counts start again after a reset
    quiet = Traffic()
    quiet.add("server", "client0", n, {})
    assert quiet.log == [] and quiet.reset() == ({"server": n}, {"client0": n})
