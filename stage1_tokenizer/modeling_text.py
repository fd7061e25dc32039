"""Byte-level text front end: UTF-8 bytes <-> tensors, and the 1-D conv encoder/decoder over byte embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .configuration import PAD_BYTE, VQConfig
from .modeling_image import Decoder, Encoder


def strings_to_bytes(texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """UTF-8 encode, truncate or pad with PAD_BYTE to `seq_len`: list of str -> (B, seq_len) long."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not a single str")
    out = torch.full((len(texts), seq_len), PAD_BYTE, dtype=torch.long)
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{row}] is {type(text).__name__}, expected str")
        data = text.encode("utf-8")[:seq_len]
        if data:
            out[row, : len(data)] = torch.tensor(list(data), dtype=torch.long)
    return out


def bytes_to_strings(byte_ids: torch.Tensor) -> list[str]:
    """(B, L) byte ids -> strings; stops at the first pad, invalid UTF-8 becomes U+FFFD (never raises)."""
    texts = []
    for row in byte_ids.tolist():
        if PAD_BYTE in row:
            row = row[: row.index(PAD_BYTE)]
        texts.append(bytes(v for v in row if 0 <= v < 256).decode("utf-8", errors="replace"))
    return texts


def codes_up_to_end(byte_ids: torch.Tensor, num_codes: int) -> torch.Tensor:
    """(B, L) byte ids -> (B,) the number of codes up to and including the one that holds the first pad (the
    text's end), or all `num_codes` when there is no pad: the later codes encode padding alone."""
    seq_len = byte_ids.shape[1]
    is_pad = byte_ids == PAD_BYTE
    first_pad = torch.where(is_pad.any(1), is_pad.long().argmax(1), torch.full_like(byte_ids[:, 0], seq_len))
    return torch.clamp(first_pad // (seq_len // num_codes) + 1, max=num_codes)


class TextEncoder(nn.Module):
    """Byte ids (B, L) -> latents (B, codebook_dim, L/f) through byte embeddings and 1-D convolutions."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.embed = nn.Embedding(config.byte_vocab_size, config.byte_embed_dim)
        self.net = Encoder(config, in_channels=config.byte_embed_dim, conv=nn.Conv1d)

    def forward(self, byte_ids: torch.Tensor) -> torch.Tensor:
        return self.net(self.embed(byte_ids).transpose(1, 2))  # (B, E, L) -> (B, D, n)


class TextDecoder(nn.Module):
    """Code vectors (B, codebook_dim, n) -> byte logits (B, byte_vocab_size, L)."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.net = Decoder(config, out_channels=config.byte_vocab_size, conv=nn.Conv1d)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the final convolution, for the adaptive GAN weight."""
        return self.net.last_layer
