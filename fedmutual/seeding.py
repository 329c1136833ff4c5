"""Independent, named seed streams derived from the run seed.

The partition, model initialization, client sampling and each client's
shuffling draw from separate streams, so changing one (say, the number of
rounds) never changes another (the partition).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed that depends only on ``seed`` and the stream ``keys``."""
    text = "/".join([str(int(seed))] + [str(k) for k in keys])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def torch_generator(seed: int, *keys: object) -> torch.Generator:
    """A CPU ``torch.Generator`` for the stream ``keys``."""
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, *keys))
    return g


def numpy_rng(seed: int, *keys: object) -> np.random.Generator:
    """A NumPy generator for the stream ``keys``."""
    return np.random.default_rng(derive_seed(seed, *keys))
