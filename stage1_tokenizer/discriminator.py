"""PatchGAN discriminators (Isola et al. 2017) for images and for soft byte embeddings of text."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import DISC_INITS, DISC_NORMS, VQConfig


class Blur(nn.Module):
    """Fixed [1, 2, 1] binomial low-pass per channel, before a strided conv (anti-aliasing, as in MaskBit)."""

    def __init__(self, channels: int, dims: int):
        super().__init__()
        kernel = torch.tensor([1.0, 2.0, 1.0])
        if dims == 2:
            kernel = kernel[:, None] * kernel[None, :]
        kernel = (kernel / kernel.sum()).expand(channels, 1, *kernel.shape).contiguous()
        self.register_buffer("kernel", kernel, persistent=False)
        self.conv = F.conv2d if dims == 2 else F.conv1d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x, self.kernel.to(x.dtype), padding=1, groups=x.shape[1])


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that normalises a channels-last input (the image discriminator runs channels-last) in
    channels-first layout on CPU and hands it back channels-last: CPU's channels-last GroupNorm, forward and
    backward, is slower than the two copies (bf16, 32 x 128 x 7 x 7: 1.78 against 0.59 ms). Same parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
                memory_format=torch.channels_last):
            return super().forward(x.contiguous()).contiguous(memory_format=torch.channels_last)
        return super().forward(x)


def _norm(kind: str, channels: int, dims: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm1d(channels)
    if kind == "group":
        return GroupNorm(min(32, channels // 4), channels)
    return nn.Identity()


class PatchDiscriminator(nn.Module):
    """Strided conv stack that scores overlapping patches: (B, C, *spatial) -> (B, 1, *patches).

    `norm="batch"` with real and fake batches in separate calls is taming-transformers' discriminator; "group" or
    "none" score each sample on its own, and `spectral_norm` / `blur` are the stabilisers of later tokenizers.
    """

    def __init__(self, in_channels: int, channels: int, num_layers: int, conv: type = nn.Conv2d,
                 norm: str = "batch", spectral_norm: bool = False, blur: bool = False, init: str = "dcgan"):
        super().__init__()
        if norm not in DISC_NORMS:
            raise ValueError(f"disc_norm={norm!r} is not supported; expected one of {list(DISC_NORMS)}")
        if init not in DISC_INITS:
            raise ValueError(f"disc_init={init!r} is not supported; expected one of {list(DISC_INITS)}")
        dims = 2 if conv is nn.Conv2d else 1
        wrap = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda module: module)

        def block(width: int, out: int, stride: int, bias: bool) -> list[nn.Module]:
            pre = [Blur(width, dims)] if blur and stride == 2 else []
            return pre + [wrap(conv(width, out, 4, stride=stride, padding=1, bias=bias))]

        layers: list[nn.Module] = [*block(in_channels, channels, 2, True), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, num_layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < num_layers else 1
            layers += [*block(width, out, stride, norm == "none"), _norm(norm, out, dims), nn.LeakyReLU(0.2)]
            width = out
        layers += block(width, 1, 1, True)
        self.net = nn.Sequential(*layers)
        # EMAs of the mean logit on real and on fake inputs (LeCam's anchors); saved with the discriminator.
        self.register_buffer("logit_ema", torch.zeros(2))
        if init == "dcgan":
            # N(0, 0.02) weights, as taming. At our budgets it starves the discriminator: on Fashion-MNIST it
            # stayed near chance against a training autoencoder where PyTorch's default init learned in ~40 steps.
            self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        # DCGAN initialisation, as taming uses for its discriminator.
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            weight = getattr(module, "parametrizations", None)
            weight = weight.weight.original if weight is not None else module.weight
            nn.init.normal_(weight, 0.0, 0.02)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)):
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
        self.net = PatchDiscriminator(config.byte_embed_dim, config.disc_channels, config.disc_layers, nn.Conv1d,
                                      config.disc_norm, config.disc_spectral_norm, config.disc_blur, config.disc_init)

    def embed(self, byte_ids_or_logits: torch.Tensor) -> torch.Tensor:
        """(B, L) real byte ids or (B, V, L) logits -> soft embeddings (B, E, L)."""
        if byte_ids_or_logits.dtype == torch.long:
            weights = F.one_hot(byte_ids_or_logits, self.byte_embedding.shape[0]).to(self.byte_embedding.dtype)
        else:
            weights = byte_ids_or_logits.softmax(dim=1).transpose(1, 2)  # (B, L, V)
        return (weights @ self.byte_embedding).transpose(1, 2)

    @property
    def logit_ema(self) -> torch.Tensor:
        return self.net.logit_ema

    def forward(self, x: torch.Tensor, return_features: bool = False):
        return self.net(self.embed(x), return_features=return_features)


def build_discriminator(config: VQConfig) -> nn.Module:
    """The discriminator matching the tokenizer's modality."""
    if config.modality == "image":
        return PatchDiscriminator(config.in_channels, config.disc_channels, config.disc_layers, nn.Conv2d,
                                  config.disc_norm, config.disc_spectral_norm, config.disc_blur, config.disc_init)
    return TextDiscriminator(config)
