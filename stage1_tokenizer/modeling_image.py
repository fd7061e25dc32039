"""Convolutional ResNet encoder and decoder for images (the taming-transformers autoencoder shape)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import VQConfig


def group_norm(channels: int, num_groups: int) -> nn.GroupNorm:
    """GroupNorm with affine parameters, as in taming's `Normalize`."""
    return nn.GroupNorm(num_groups=num_groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Two GroupNorm-SiLU-conv layers with a residual connection (1x1 shortcut when widths differ)."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int, conv: type = nn.Conv2d):
        super().__init__()
        self.norm1 = group_norm(in_channels, num_groups)
        self.conv1 = conv(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, num_groups)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1)
        self.shortcut = conv(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all positions, via scaled_dot_product_attention."""

    def __init__(self, channels: int, num_groups: int):
        super().__init__()
        self.norm = group_norm(channels, num_groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (B, C, *spatial)
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, L, C)
        q, k, v = self.qkv(h).chunk(3, dim=-1)  # each (B, L, C)
        if x.device.type == "cpu":
            # Plain matmuls and a softmax: at these lengths (tens to hundreds of positions) CPU's flash kernel is
            # slower, its backward most (bf16, 32 x 64 positions x 64 channels: 2.9 against 1.0 ms per block).
            scores = torch.bmm(q, k.transpose(1, 2)) * q.shape[-1] ** -0.5  # (B, L, L)
            h = torch.bmm(scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype), v)  # (B, L, C)
        else:
            h = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        h = self.proj(h).transpose(1, 2).reshape(shape)
        return x + h


def level_widths(config: VQConfig) -> list[int]:
    """Channel width at each resolution level of the encoder (reversed in the decoder)."""
    return [config.base_channels * m for m in config.channel_mult]


class Encoder(nn.Module):
    """x (B, C, H, W) -> latents (B, codebook_dim, H/f, W/f); also serves 1-D text with conv=nn.Conv1d."""

    def __init__(self, config: VQConfig, in_channels: int, conv: type = nn.Conv2d):
        super().__init__()
        widths, groups = level_widths(config), config.num_groups
        self.conv_in = conv(in_channels, widths[0], 3, padding=1)
        blocks: list[nn.Module] = []
        current = widths[0]
        for level, width in enumerate(widths):
            for _ in range(config.num_res_blocks):
                blocks.append(ResnetBlock(current, width, groups, conv))
                current = width
            if level < len(widths) - 1:
                blocks.append(conv(current, current, 4, stride=2, padding=1))  # halve each spatial side
        self.down = nn.Sequential(*blocks)
        mid: list[nn.Module] = [ResnetBlock(current, current, groups, conv)]
        if config.attn_at_lowest:
            mid.append(AttentionBlock(current, groups))
        mid.append(ResnetBlock(current, current, groups, conv))
        self.mid = nn.Sequential(*mid)
        self.norm_out = group_norm(current, groups)
        self.conv_out = conv(current, config.codebook_dim, 1)  # 1x1 projection into the codebook space

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 convolution."""

    def __init__(self, channels: int, conv: type):
        super().__init__()
        self.conv = conv(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """Code vectors (B, codebook_dim, h, w) -> output (B, out_channels, h*f, w*f)."""

    def __init__(self, config: VQConfig, out_channels: int, conv: type = nn.Conv2d):
        super().__init__()
        widths, groups = level_widths(config), config.num_groups
        current = widths[-1]
        self.conv_in = conv(config.codebook_dim, current, 1)  # 1x1 projection out of the codebook space
        mid: list[nn.Module] = [ResnetBlock(current, current, groups, conv)]
        if config.attn_at_lowest:
            mid.append(AttentionBlock(current, groups))
        mid.append(ResnetBlock(current, current, groups, conv))
        self.mid = nn.Sequential(*mid)
        blocks: list[nn.Module] = []
        for level, width in reversed(list(enumerate(widths))):
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResnetBlock(current, width, groups, conv))
                current = width
            if level > 0:
                blocks.append(Upsample(current, conv))
        self.up = nn.Sequential(*blocks)
        self.norm_out = group_norm(current, groups)
        self.conv_out = conv(current, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # Code vectors arrive with channel-last strides (the quantizer's and lookup's movedim); kept, they would make
        # every convolution after them, and so the GroupNorms, run channels-last, where CPU GroupNorm's backward is
        # several times slower (README, Performance).
        h = self.up(self.mid(self.conv_in(z.contiguous())))
        return self.conv_out(F.silu(self.norm_out(h)))

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the final convolution: where VQGAN's adaptive weight compares gradient norms."""
        return self.conv_out.weight
