"""Vector quantizer: nearest-codebook lookup with straight-through or rotation-trick gradients.

Implements the VQ-VAE objective of van den Oord et al. (2017, arXiv 1711.00937):
    ||sg[z_e] - e||^2  (codebook term, weight 1; replaced by EMA updates when ema_decay is set)
  + beta * ||z_e - sg[e]||^2  (commitment term, weight beta on the *encoder* output)
plus the codebook-quality options of later work: l2-normalised low-dimensional codes
(Yu et al. 2022 / LlamaGen), dead-code restart, k-means init, and the rotation trick
(Fifty et al., 2024, arXiv 2410.06424).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass
class QuantizerOutput:
    """What one quantizer call returns."""

    quantized: torch.Tensor  # same shape as the input, gradients routed to the encoder
    indices: torch.Tensor  # (B, *spatial) long
    loss: torch.Tensor  # codebook + beta * commitment (commitment only with EMA)
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    batch_perplexity: torch.Tensor


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if _is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _broadcast(tensor: torch.Tensor) -> torch.Tensor:
    if _is_distributed():
        dist.broadcast(tensor, src=0)
    return tensor


def rotate_to(source: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Return `target`'s value with gradients flowing to `source` through a fixed rotation and scale.

    Rotation trick (Fifty et al., 2024): output = sg[(|q|/|e|) R] e, where R rotates e/|e| onto
    q/|q| as R = I - 2ww^T + 2 q u^T with u = e/|e|, q = q/|q|, w = (u + q)/|u + q|.
    """
    source_norm = source.norm(dim=-1, keepdim=True).clamp_min(eps)
    target_norm = target.norm(dim=-1, keepdim=True).clamp_min(eps)
    u = (source / source_norm).detach()
    q = (target / target_norm).detach()
    w = F.normalize(u + q, dim=-1, eps=eps).detach()
    rotated = (
        source
        - 2 * (source * w).sum(-1, keepdim=True) * w
        + 2 * (source * u).sum(-1, keepdim=True) * q
    )
    return rotated * (target_norm / source_norm).detach()


def kmeans(samples: torch.Tensor, num_clusters: int, num_iters: int = 10, l2: bool = False) -> torch.Tensor:
    """Plain Lloyd k-means on (N, D) samples; returns (num_clusters, D) centroids."""
    num_samples = samples.shape[0]
    if num_samples >= num_clusters:
        centroids = samples[torch.randperm(num_samples, device=samples.device)[:num_clusters]].clone()
    else:
        centroids = samples[torch.randint(0, num_samples, (num_clusters,), device=samples.device)].clone()
    for _ in range(num_iters):
        assign = torch.cdist(samples, centroids).argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, samples)
        counts = torch.bincount(assign, minlength=num_clusters).unsqueeze(1).to(samples.dtype)
        updated = sums / counts.clamp_min(1)
        centroids = torch.where(counts > 0, updated, centroids)
        if l2:
            centroids = F.normalize(centroids, dim=-1)
    return centroids


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantizer over a learned codebook of `codebook_size` x `codebook_dim`."""

    def __init__(
        self,
        codebook_size: int,
        codebook_dim: int,
        commitment_beta: float = 0.25,
        ema_decay: float | None = None,
        l2_normalize: bool = False,
        kmeans_init: bool = False,
        dead_code_threshold: float = 0.0,
        rotation_trick: bool = False,
        usage_window: int = 100,
        ema_epsilon: float = 1e-5,
    ):
        super().__init__()
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.commitment_beta = commitment_beta
        self.ema_decay = ema_decay
        self.l2_normalize = l2_normalize
        self.kmeans_init = kmeans_init
        self.dead_code_threshold = dead_code_threshold
        self.rotation_trick = rotation_trick
        self.ema_epsilon = ema_epsilon

        self.embedding = nn.Embedding(codebook_size, codebook_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        if ema_decay is not None:
            # EMA codebook (van den Oord et al. 2017, appendix A.1): no gradient to the codebook.
            self.embedding.weight.requires_grad_(False)
            # Start consistent (embed_sum = cluster_size * code) so the first updates neither blow up
            # unused codes (0 / eps) nor drag used ones far from their assigned outputs.
            self.register_buffer("ema_cluster_size", torch.ones(codebook_size))
            self.register_buffer("ema_embed_sum", self.embedding.weight.detach().clone())
        # Per-batch code counts over the last `usage_window` training batches (a ring buffer).
        self.register_buffer("usage_counts", torch.zeros(usage_window, codebook_size))
        self.register_buffer("usage_cursor", torch.zeros((), dtype=torch.long))
        # Batch counter at each code's last restart: a restarted code gets a full window before judgement.
        self.register_buffer("restarted_at", torch.zeros(codebook_size, dtype=torch.long))
        self.register_buffer("initialized", torch.tensor(not kmeans_init))

    @property
    def codebook(self) -> torch.Tensor:
        """The (possibly l2-normalised) code vectors, (K, D)."""
        weight = self.embedding.weight
        return F.normalize(weight, dim=-1) if self.l2_normalize else weight

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors for integer indices: (...,) -> (..., D)."""
        return F.embedding(indices, self.codebook)

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Indices of the nearest code for each row of (N, D) fp32 vectors."""
        codebook = self.codebook.float()
        # ||z||^2 - 2 z.e + ||e||^2, computed in fp32 (small codes lose their ordering in bf16).
        distances = (
            flat.pow(2).sum(1, keepdim=True)
            - 2 * flat @ codebook.t()
            + codebook.pow(2).sum(1).unsqueeze(0)
        )
        return distances.argmin(dim=1)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize channel-first latents (B, D, *spatial)."""
        assert z.shape[1] == self.codebook_dim, f"expected {self.codebook_dim} channels, got {z.shape[1]}"
        input_dtype = z.dtype
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            moved = z.movedim(1, -1)  # (B, *spatial, D)
            flat = moved.reshape(-1, self.codebook_dim)  # (N, D)
            if self.l2_normalize:
                flat = F.normalize(flat, dim=-1)
            if self.training and not bool(self.initialized):
                self._kmeans_init(flat.detach())
            indices = self.nearest(flat.detach())  # (N,)
            codes = self.lookup(indices).float()  # (N, D)

            commitment_loss = F.mse_loss(flat, codes.detach())
            if self.ema_decay is None:
                codebook_loss = F.mse_loss(codes, flat.detach())
            else:
                codebook_loss = torch.zeros((), device=z.device)
            loss = codebook_loss + self.commitment_beta * commitment_loss

            if self.rotation_trick:
                routed = rotate_to(flat, codes)
            else:
                routed = flat + (codes - flat).detach()  # straight-through estimator

            counts = torch.bincount(indices, minlength=self.codebook_size).float()
            probs = counts / counts.sum()
            batch_perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
            if self.training:
                self._track_and_update(flat.detach(), indices, counts)

        quantized = routed.reshape(moved.shape).movedim(-1, 1).to(input_dtype)
        return QuantizerOutput(
            quantized=quantized,
            indices=indices.reshape(moved.shape[:-1]),
            loss=loss,
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
            batch_perplexity=batch_perplexity,
        )

    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor) -> None:
        centroids = kmeans(flat, self.codebook_size, l2=self.l2_normalize)
        centroids = _broadcast(centroids.contiguous())
        self.embedding.weight.data.copy_(centroids)
        if self.ema_decay is not None:
            self.ema_embed_sum.copy_(centroids)
            self.ema_cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _track_and_update(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        counts = _all_reduce_sum(counts.clone())
        window = self.usage_counts.shape[0]
        self.usage_counts[self.usage_cursor % window] = counts
        self.usage_cursor += 1

        if self.ema_decay is not None:
            one_hot_sum = torch.zeros_like(self.ema_embed_sum).index_add_(0, indices, flat)
            one_hot_sum = _all_reduce_sum(one_hot_sum)
            self.ema_cluster_size.mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
            self.ema_embed_sum.mul_(self.ema_decay).add_(one_hot_sum, alpha=1 - self.ema_decay)
            # Laplace smoothing keeps unused codes from dividing by zero.
            total = self.ema_cluster_size.sum()
            smoothed = (self.ema_cluster_size + self.ema_epsilon) / (
                total + self.codebook_size * self.ema_epsilon
            ) * total
            self.embedding.weight.data.copy_(self.ema_embed_sum / smoothed.unsqueeze(1))

        if self.dead_code_threshold > 0 and int(self.usage_cursor) >= window:
            self._restart_dead_codes(flat)

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor) -> None:
        """Move codes used fewer than `dead_code_threshold` times in the window onto recent encoder outputs."""
        window = self.usage_counts.shape[0]
        settled = (self.usage_cursor - self.restarted_at) >= window
        dead = (self.usage_counts.sum(0) < self.dead_code_threshold) & settled
        num_dead = int(dead.sum())
        if num_dead == 0:
            return
        choice = torch.randint(0, flat.shape[0], (num_dead,), device=flat.device)
        replacement = _broadcast(flat[choice].contiguous())
        self.embedding.weight.data[dead] = replacement
        if self.ema_decay is not None:
            self.ema_embed_sum[dead] = replacement
            self.ema_cluster_size[dead] = 1.0
        self.restarted_at[dead] = self.usage_cursor

    def usage_stats(self) -> dict[str, float]:
        """Codebook usage (% of codes hit) and perplexity over the tracked window of training batches."""
        filled = min(int(self.usage_cursor), self.usage_counts.shape[0])
        if filled == 0:
            return {"codebook_usage": 0.0, "perplexity": 0.0}
        return usage_from_counts(self.usage_counts[:filled].sum(0))


def usage_from_counts(counts: torch.Tensor) -> dict[str, float]:
    """Usage % and perplexity from a (K,) vector of code counts."""
    counts = counts.float()
    total = counts.sum().clamp_min(1)
    probs = counts / total
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
    return {
        "codebook_usage": float((counts > 0).float().mean() * 100),
        "perplexity": float(torch.exp(entropy)),
    }
