"""Model zoo."""

from fedmutual.models.zoo import ZOO, build_model

__all__ = ["ZOO", "build_model"]
