"""PatchGAN discriminators (Isola et al. 2017) for images and for soft byte embeddings of text."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import VQConfig


class PatchDiscriminator(nn.Module):
    """Strided conv stack that scores overlapping patches: (B, C, *spatial) -> (B, 1, *patches)."""

    def __init__(self, in_channels: int, channels: int, num_layers: int, conv: type = nn.Conv2d):
        super().__init__()
        norm = nn.BatchNorm2d if conv is nn.Conv2d else nn.BatchNorm1d
        layers: list[nn.Module] = [conv(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, num_layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < num_layers else 1
            layers += [conv(width, out, 4, stride=stride, padding=1, bias=False), norm(out), nn.LeakyReLU(0.2)]
            width = out
        layers.append(conv(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        # DCGAN initialisation, as taming uses for its discriminator.
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            nn.init.normal_(module.weight, 0.0, 0.02)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        features = []
        for layer in self.net:
            x = layer(x)
            if isinstance(layer, nn.LeakyReLU):
                features.append(x)
        return (x, features) if return_features else x


class TextDiscriminator(nn.Module):
    """1-D PatchGAN over soft byte embeddings: softmax(logits) @ E for fakes, one_hot(bytes) @ E for reals."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.byte_embedding = nn.Parameter(torch.randn(config.byte_vocab_size, config.byte_embed_dim) * 0.02)
        self.net = PatchDiscriminator(config.byte_embed_dim, config.disc_channels, config.disc_layers, nn.Conv1d)

    def embed(self, byte_ids_or_logits: torch.Tensor) -> torch.Tensor:
        """(B, L) real byte ids or (B, V, L) logits -> soft embeddings (B, E, L)."""
        if byte_ids_or_logits.dtype == torch.long:
            weights = F.one_hot(byte_ids_or_logits, self.byte_embedding.shape[0]).to(self.byte_embedding.dtype)
        else:
            weights = byte_ids_or_logits.softmax(dim=1).transpose(1, 2)  # (B, L, V)
        return (weights @ self.byte_embedding).transpose(1, 2)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        return self.net(self.embed(x), return_features=return_features)


def build_discriminator(config: VQConfig) -> nn.Module:
    """The discriminator matching the tokenizer's modality."""
    if config.modality == "image":
        return PatchDiscriminator(config.in_channels, config.disc_channels, config.disc_layers)
    return TextDiscriminator(config)
