"""Models: the zoo, and the registry through which configs name models (the zoo's and users' own)."""

from fedmutual.models.zoo import (
    MODELS,
    PARTS,
    ModelBuilder,
    adaptor_head,
    build_encoder,
    build_model,
    parse_model_spec,
    register_model,
    with_head,
)

__all__ = [
    "MODELS",
    "PARTS",
    "ModelBuilder",
    "adaptor_head",
    "build_encoder",
    "build_model",
    "parse_model_spec",
    "register_model",
    "with_head",
]
