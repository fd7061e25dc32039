"""Stage 1: discrete tokenizers (VQ-VAE and VQGAN) for images and byte-level text."""

from .configuration import TOKENIZER_PRESETS, VQConfig
from .modeling import VQModel, VQModelOutput
from .quantizer import VectorQuantizer

__all__ = ["TOKENIZER_PRESETS", "VQConfig", "VQModel", "VQModelOutput", "VectorQuantizer"]
