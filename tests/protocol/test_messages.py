import torch

from fedmutual.transport import InProcessTransport, Message, decode, encode


def test_round_trip_and_byte_count_is_the_serialized_size():
    msg = Message({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "n": torch.tensor([3])}, {"round": "4"})
    data = encode(msg)
    back = decode(data)
    assert torch.equal(back.tensors["w"], msg.tensors["w"]) and back.meta == {"round": "4"}
    t = InProcessTransport()
    got = t.send("server", "client0", msg)
    sent, received = t.reset_counts()
    assert sent == {"server": len(data)} and received == {"client0": len(data)}
    # 24 bytes of float32 and 8 of int64 payload, plus the header
    assert len(data) > 32
    got.tensors["w"][0, 0] = 100.0
    assert msg.tensors["w"][0, 0] == 0.0  # the receiver holds a copy
    assert t.reset_counts() == ({}, {})
