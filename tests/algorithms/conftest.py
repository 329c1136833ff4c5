import pytest
import torch

from fedmutual.algorithms.base import ClientData, Context
from fedmutual.config import Config
from fedmutual.transport import InProcessTransport


@pytest.fixture
def make_ctx():
    """A Context over small synthetic client data (unequal sizes; 4 classes; 1x8x8 inputs unless ``shape`` is given).

    Transport messages are recorded in ``ctx.transport.log``.
    """

    def make(sizes=(40, 28, 17), shape=(1, 8, 8), **cfg_kwargs) -> Context:
        g = torch.Generator().manual_seed(0)
        clients = []
        for n in sizes:
            x = torch.randn(n, *shape, generator=g)
            y = torch.randint(0, 4, (n,), generator=g)
            clients.append(ClientData(x, y, x[:8], y[:8]))
        defaults = dict(clients=len(sizes), model="mlp", batch_size=8, local_epochs=2, rounds=3, lr=0.05)
        defaults.update(cfg_kwargs)
        cfg = Config(**defaults)
        return Context(cfg, clients, shape, 4, torch.device("cpu"), InProcessTransport(record=True))

    return make
