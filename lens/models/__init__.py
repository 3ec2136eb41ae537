from lens.models.decoder import Decoder, DecoderConfig
from lens.models.registry import REGISTRY, load_model

__all__ = ["Decoder", "DecoderConfig", "REGISTRY", "load_model"]
