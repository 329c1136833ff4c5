"""Every reason a received message is rejected, each with its message."""

import pytest
import torch

from fedmutual.protocol import Message, MessageRejected, encode
from fedmutual.protocol.validation import HEADER_SLACK, receive

LIKE = {"w": torch.zeros(3, 2), "b": torch.zeros(2), "n": torch.tensor(5)}


def _bytes(**tensors):
    return encode(Message(tensors))


def test_a_matching_message_is_accepted():
    msg = receive(_bytes(w=torch.ones(3, 2), b=torch.ones(2), n=torch.tensor(7)), LIKE, 1 << 30)
    assert msg.tensors["w"].shape == (3, 2) and int(msg.tensors["n"]) == 7


def test_oversized_message_is_refused_unread():
    big = _bytes(w=torch.zeros(3, 2), b=torch.zeros(2), n=torch.tensor(5), pad=torch.zeros(HEADER_SLACK))
    with pytest.raises(MessageRejected, match=r"the message has \d+ bytes, more than the \d+ bytes a message of the expected shape may have"):
        receive(big, LIKE, 1 << 30)
    # without an expected shape, the configured maximum applies
    with pytest.raises(MessageRejected, match=r"more than the 100 bytes"):
        receive(_bytes(w=torch.zeros(100)), None, 100)


def test_unreadable_bytes():
    with pytest.raises(MessageRejected, match="the message is not readable safetensors"):
        receive(b"\x05\x00\x00\x00\x00\x00\x00\x00garbage", LIKE, 1 << 30)
    good = _bytes(w=torch.ones(3, 2), b=torch.ones(2), n=torch.tensor(7))
    with pytest.raises(MessageRejected, match="not readable safetensors"):
        receive(good[:-5], LIKE, 1 << 30)  # truncated in transit


def test_missing_tensor():
    with pytest.raises(MessageRejected, match=r"missing tensors 'b'"):
        receive(_bytes(w=torch.ones(3, 2), n=torch.tensor(7)), LIKE, 1 << 30)


def test_unexpected_tensor():
    with pytest.raises(MessageRejected, match=r"unexpected tensors 'extra'"):
        receive(_bytes(w=torch.ones(3, 2), b=torch.ones(2), n=torch.tensor(7), extra=torch.ones(1)), LIKE, 1 << 30)


def test_wrong_shape():
    with pytest.raises(MessageRejected, match=r"tensor 'w' has shape \[2, 3\], expected \[3, 2\]"):
        receive(_bytes(w=torch.ones(2, 3), b=torch.ones(2), n=torch.tensor(7)), LIKE, 1 << 30)


def test_wrong_dtype():
    with pytest.raises(MessageRejected, match=r"tensor 'b' has dtype float64, expected float32"):
        receive(_bytes(w=torch.ones(3, 2), b=torch.ones(2, dtype=torch.float64), n=torch.tensor(7)), LIKE, 1 << 30)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values(bad):
    w = torch.ones(3, 2)
    w[1, 1] = bad
    with pytest.raises(MessageRejected, match=r"tensor 'w' has 1 non-finite values \(NaN or Inf\)"):
        receive(_bytes(w=w, b=torch.ones(2), n=torch.tensor(7)), LIKE, 1 << 30)
    # without an expected shape, every floating tensor is still checked
    with pytest.raises(MessageRejected, match=r"tensor 'w' has 1 non-finite values"):
        receive(_bytes(w=w), None, 1 << 30)


def test_a_rejected_client_reply_is_counted_logged_and_left_out(tmp_path):
    """In a run, a client's invalid reply still costs its bytes; the round goes on without it."""
    from fedmutual.config import Config
    from fedmutual.experiment.runner import run

    res = run(Config(algorithm="fedavg", clients=3, limit_train=300, limit_test=100, rounds=1, model="mlp", progress=False,
                     threads=1, out=str(tmp_path), attack={"kind": "nan", "clients": [1]}), quiet=True)
    row = res.metrics[0]
    (rejected,) = row["faults"]["rejected"]
    assert rejected["client"] == 1 and "non-finite values (NaN or Inf)" in rejected["reason"]
    up = row["bytes_up_per_client"]
    assert up[1] == up[0] == up[2] > 0  # the attacker's bytes crossed the network before the server refused them
