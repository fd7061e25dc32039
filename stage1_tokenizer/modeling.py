"""VQModel: encoder -> vector quantizer -> decoder, as a transformers PreTrainedModel."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModel, PreTrainedModel

from .configuration import VQConfig
from .modeling_image import Decoder, Encoder
from .modeling_text import TextDecoder, TextEncoder, bytes_to_strings, strings_to_bytes
from .quantizer import VectorQuantizer


@dataclass
class VQModelOutput:
    """Result of VQModel.forward."""

    reconstruction: torch.Tensor  # images (B, C, H, W) in about [-1, 1], or byte logits (B, 257, L)
    indices: torch.Tensor  # (B, h, w) or (B, n)
    quantizer_loss: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    batch_perplexity: torch.Tensor
    usage: dict[str, float]


class VQModel(PreTrainedModel):
    """A VQ-VAE / VQGAN tokenizer for images or byte-level text (the objective lives in the trainer)."""

    config_class = VQConfig
    base_model_prefix = "vq"
    main_input_name = "inputs"
    _supports_sdpa = True

    def __init__(self, config: VQConfig):
        super().__init__(config)
        if config.modality == "image":
            self.encoder = Encoder(config, in_channels=config.in_channels)
            self.decoder = Decoder(config, out_channels=config.in_channels)
        else:
            self.encoder = TextEncoder(config)
            self.decoder = TextDecoder(config)
        self.quantizer = VectorQuantizer(
            codebook_size=config.codebook_size,
            codebook_dim=config.codebook_dim,
            commitment_beta=config.commitment_beta,
            ema_decay=config.ema_decay,
            l2_normalize=config.l2_normalize,
            kmeans_init=config.kmeans_init,
            dead_code_threshold=config.dead_code_threshold,
            rotation_trick=config.rotation_trick,
            usage_window=config.usage_window,
        )
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """PreTrainedModel.from_pretrained from safetensors only (never a pickle), keeping an EMA codebook frozen."""
        kwargs.setdefault("use_safetensors", True)
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, info) with output_loading_info
        if model.config.ema_decay is not None:
            model.quantizer.embedding.weight.requires_grad_(False)
        return loaded

    def _init_weights(self, module: torch.nn.Module) -> None:
        # Modules keep PyTorch's default initialisation; nothing to add.
        return

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the decoder's final layer (VQGAN's adaptive-weight anchor)."""
        return self.decoder.last_layer

    def _as_input(self, inputs: torch.Tensor | Sequence[str]) -> torch.Tensor:
        if self.config.modality == "text" and not isinstance(inputs, torch.Tensor):
            inputs = strings_to_bytes(inputs, self.config.seq_len)
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
        device = self.quantizer.embedding.weight.device
        if self.config.modality == "image":
            expected = (self.config.in_channels, self.config.resolution, self.config.resolution)
            if inputs.dim() != 4 or tuple(inputs.shape[1:]) != expected:
                raise ValueError(f"images must have shape (B, {', '.join(map(str, expected))}), got {tuple(inputs.shape)}")
            return inputs.to(device=device, dtype=torch.float32)
        if inputs.dim() != 2 or inputs.shape[1] != self.config.seq_len:
            raise ValueError(f"byte ids must have shape (B, {self.config.seq_len}), got {tuple(inputs.shape)}")
        return inputs.to(device=device, dtype=torch.long)

    def forward(self, inputs: torch.Tensor) -> VQModelOutput:
        """Encode, quantize and decode a batch of images (B, C, H, W) in [-1, 1] or byte ids (B, L)."""
        inputs = self._as_input(inputs)
        quant = self.quantizer(self.encoder(inputs))
        reconstruction = self.decoder(quant.quantized)
        return VQModelOutput(
            reconstruction=reconstruction,
            indices=quant.indices,
            quantizer_loss=quant.loss,
            codebook_loss=quant.codebook_loss,
            commitment_loss=quant.commitment_loss,
            batch_perplexity=quant.batch_perplexity,
            usage=self.quantizer.usage_stats(),
        )

    @torch.no_grad()
    def encode(self, inputs: torch.Tensor | Sequence[str]) -> torch.Tensor:
        """Images (B, C, H, W) -> codes (B, h, w); text (list of str or (B, L) bytes) -> codes (B, n)."""
        latents = self.encoder(self._as_input(inputs))
        with torch.autocast(device_type=latents.device.type, enabled=False):
            flat = latents.float().movedim(1, -1)  # (B, *grid, D)
            shape = flat.shape[:-1]
            flat = flat.reshape(-1, self.config.codebook_dim)
            if self.config.l2_normalize:
                flat = torch.nn.functional.normalize(flat, dim=-1)
            return self.quantizer.nearest(flat).reshape(shape)

    def decode_logits_or_pixels(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes -> decoder output (pixels or byte logits), with gradients."""
        expected = tuple(self.config.latent_shape)
        if indices.dtype != torch.long or tuple(indices.shape[1:]) != expected:
            raise ValueError(f"indices must be a LongTensor of shape (B, {', '.join(map(str, expected))}), "
                             f"got {indices.dtype} {tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.config.codebook_size):
            raise ValueError(f"indices must lie in [0, {self.config.codebook_size - 1}]")
        device = self.quantizer.embedding.weight.device
        codes = self.quantizer.lookup(indices.to(device)).movedim(-1, 1)  # (B, D, *grid)
        return self.decoder(codes)

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes -> images (B, C, H, W) clamped to [-1, 1], or byte logits (B, 257, L) for text."""
        out = self.decode_logits_or_pixels(indices)
        return out.clamp(-1, 1) if self.config.modality == "image" else out

    @torch.no_grad()
    def decode_text(self, indices: torch.Tensor) -> list[str]:
        """Codes (B, n) -> strings (argmax bytes, invalid UTF-8 replaced)."""
        if self.config.modality != "text":
            raise ValueError("decode_text needs a text tokenizer (modality='text')")
        return bytes_to_strings(self.decode(indices).argmax(dim=1))


AutoConfig.register(VQConfig.model_type, VQConfig)
AutoModel.register(VQConfig, VQModel)
