import pytest
import torch

from fedmutual.algorithms.base import ClientData, Context
from fedmutual.config import Config
from fedmutual.transport import InProcessTransport


@pytest.fixture
def make_ctx():
    """A Context over small synthetic client data (3 clients of unequal sizes, 1x8x8 inputs, 4 classes)."""

    def make(**cfg_kwargs) -> Context:
        g = torch.Generator().manual_seed(0)
        clients = []
        for n in (40, 28, 17):
            x = torch.randn(n, 1, 8, 8, generator=g)
            y = torch.randint(0, 4, (n,), generator=g)
            clients.append(ClientData(x, y, x[:8], y[:8]))
        defaults = dict(clients=3, model="mlp", batch_size=8, local_epochs=2, rounds=3, lr=0.05)
        defaults.update(cfg_kwargs)
        cfg = Config(**defaults)
        return Context(cfg, clients, (1, 8, 8), 4, torch.device("cpu"), InProcessTransport())

    return make
