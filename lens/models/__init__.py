from lens.models.decoder import Decoder, DecoderConfig
from lens.models.backends import load_model
from lens.models.registry import REGISTRY

__all__ = ["Decoder", "DecoderConfig", "REGISTRY", "load_model"]
