"""Model zoo."""

from fedmutual.models.zoo import PARTS, ZOO, adaptor_head, build_encoder, build_model, parse_model_spec, with_head

__all__ = ["PARTS", "ZOO", "adaptor_head", "build_encoder", "build_model", "parse_model_spec", "with_head"]
