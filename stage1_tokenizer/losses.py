"""Training objectives: reconstruction, perceptual (LPIPS / random-VGG), hinge GAN and VQGAN's adaptive weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import PAD_BYTE, VQConfig
from .discriminator import build_discriminator

# VGG16 `features` indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (the LPIPS taps).
VGG_TAPS = (3, 8, 15, 22, 29)
# ImageNet statistics mapped to inputs in [-1, 1] (LPIPS' ScalingLayer).
_SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
_SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)


def _unit_channels(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class _UnitChannelDistance(torch.autograd.Function):
    """sum_c (a / (|a| + eps) - b / (|b| + eps))^2, averaged over batch and positions, |.| the norm over channels;
    `b` is a constant. The same value as building it from `_unit_channels` under autograd, in fewer passes over
    the tap's feature map (no autograd intermediates; a hand-written backward of three passes): at 32x32 these
    element-wise passes cost the training step more than the GroupNorms did (README, Performance).
    Where a position's features are all 0 (a dead ReLU position) its gradient is 0: autograd's is NaN there
    (sqrt at 0), which would discard the whole step, and the exact one is the difference scaled by 1 / eps."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.dtype = a.dtype
        a, b = a.float(), b.float()  # mixed bf16 * fp32 ops instead: 2x slower alone, no faster in a training step
        norm_a = torch.linalg.vector_norm(a, dim=1, keepdim=True)
        inv_a = 1.0 / (norm_a + eps)
        inv_b = 1.0 / (torch.linalg.vector_norm(b, dim=1, keepdim=True) + eps)
        diff = (a * inv_a).sub_(b * inv_b)  # not addcmul: its fused multiply-add leaves ~1e-16 where a == b
        ctx.positions = diff.numel() // diff.shape[1]
        ctx.save_for_backward(a, diff, norm_a, inv_a)
        flat = diff.reshape(-1) if diff.is_contiguous() else diff.movedim(1, -1).reshape(-1)  # a view: NCHW, NHWC
        return torch.dot(flat, flat) / ctx.positions

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        a, diff, norm_a, inv_a = ctx.saved_tensors
        scale = grad_loss * (2.0 / ctx.positions)  # d loss / d diff = scale * diff
        # d(a * inv_a)/da applied to g: inv_a * g - a * inv_a^2 * (a . g) / |a|, per position; 0 where a = 0
        inv_a = torch.where(norm_a > 0, inv_a, 0.0)
        dot = (a * diff).sum(1, keepdim=True)
        coef = dot * inv_a.square() / norm_a.clamp_min(torch.finfo(torch.float32).tiny) * scale
        grad = torch.addcmul(diff * (inv_a * scale), a, coef, value=-1.0)
        return grad.to(ctx.dtype), None, None


def unit_channel_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """LPIPS' per-tap distance without its learned weights: channel-normalised features' squared difference,
    summed over channels and averaged over batch and positions (fp32 result)."""
    if b.requires_grad:
        return (_unit_channels(a.float(), eps) - _unit_channels(b.float(), eps)).pow(2).sum(1).mean()
    return _UnitChannelDistance.apply(a, b, eps)


class RandomVGGPerceptualLoss(nn.Module):
    """LPIPS-shaped distance through a fixed, seeded, randomly initialised VGG16 (Liu et al., CVPR 2021)."""

    def __init__(self, depth: int = 5, seed: int = 0):
        super().__init__()
        from torchvision.models import vgg16

        self.taps = VGG_TAPS[:depth]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            features = vgg16(weights=None).features[: self.taps[-1] + 1]
        self.features = features.eval().requires_grad_(False)
        self.register_buffer("shift", _SHIFT.clone(), persistent=False)
        self.register_buffer("scale", _SCALE.clone(), persistent=False)

    def train(self, mode: bool = True) -> "RandomVGGPerceptualLoss":
        return super().train(False)  # fixed feature network: always in eval mode

    def tap_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The feature maps at each tap (as the network computed them) for images (B, 1 or 3, H, W) in [-1, 1]."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        h = (images - self.shift) / self.scale
        features = []
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index in self.taps:
                features.append(h)
        return features

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean perceptual distance between two image batches in [-1, 1]."""
        # A target that needs no gradient goes through without autograd: the backward then runs over
        # x's batch alone, not over a concatenated [x, y] batch (half the perceptual backward work).
        with torch.set_grad_enabled(torch.is_grad_enabled() and y.requires_grad):
            target_features = self.tap_features(y)
        total = x.new_zeros((), dtype=torch.float32)
        for fx, fy in zip(self.tap_features(x), target_features):
            total = total + unit_channel_distance(fx, fy)
        return total


class LPIPSLoss(nn.Module):
    """LPIPS (Zhang et al. 2018) over torchvision's ImageNet VGG16, via torchmetrics' implementation."""

    def __init__(self):
        super().__init__()
        from torchmetrics.functional.image.lpips import _LPIPS

        try:
            self.lpips = _LPIPS(pretrained=True, net="vgg").eval().requires_grad_(False)
        except Exception as error:  # torchvision raises URLError/HTTPError/RuntimeError when offline
            raise ValueError(
                "perceptual_backend='lpips' needs torchvision's ImageNet VGG16 weights, which could not be "
                f"loaded ({type(error).__name__}: {error}). Either run once with network access so torchvision "
                "caches them under $TORCH_HOME/hub/checkpoints, copy vgg16-397923af.pth there by hand, or train "
                "with --perceptual random-vgg (offline) or --perceptual none."
            ) from error

    def train(self, mode: bool = True) -> "LPIPSLoss":
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        return self.lpips(x, y).mean()


def build_perceptual(backend: str, depth: int = 5) -> nn.Module | None:
    """The perceptual loss module named by `backend` (random-vgg: `depth` VGG blocks), or None for 'none'."""
    if backend == "lpips":
        return LPIPSLoss()
    if backend == "random-vgg":
        return RandomVGGPerceptualLoss(depth)
    if backend == "none":
        return None
    raise ValueError(f"perceptual_backend={backend!r}; expected 'lpips', 'random-vgg' or 'none'")


def text_targets(byte_ids: torch.Tensor) -> torch.Tensor:
    """Byte targets with padding ignored (-100) after the first pad, which stays: it marks where the text ends,
    so the decoder learns to end a text; what follows it is padding and never enters the loss."""
    after_end = (byte_ids == PAD_BYTE).long().cumsum(1) > 1
    return byte_ids.masked_fill(after_end, -100)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss for the discriminator: mean(relu(1 - D(x))) + mean(relu(1 + D(G(z)))), halved."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Logistic (binary cross-entropy) loss for the discriminator, taming's "vanilla":
    mean(softplus(-D(x))) + mean(softplus(D(G(z)))), halved. Unlike the hinge it has no flat margin: a patch the
    discriminator cannot tell apart is pulled to logit 0, and a confident one keeps being pushed."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def lecam_penalty(logits_real: torch.Tensor, logits_fake: torch.Tensor, logit_ema: torch.Tensor,
                  decay: float = 0.999) -> torch.Tensor:
    """LeCam regulariser (Tseng et al., CVPR 2021): pulls D(real) towards the EMA of D(fake) and vice versa.

    `logit_ema` holds (EMA of mean real logit, EMA of mean fake logit) and is updated in place.
    """
    with torch.no_grad():
        logit_ema.mul_(decay).add_((1 - decay) * torch.stack([logits_real.mean(), logits_fake.mean()]))
    ema_real, ema_fake = logit_ema[0], logit_ema[1]
    return F.relu(logits_real - ema_fake).pow(2).mean() + F.relu(ema_real - logits_fake).pow(2).mean()


def centring_penalty(logits_real: torch.Tensor, logits_fake: torch.Tensor, statistic: str = "mean") -> torch.Tensor:
    """The squared offset of the discriminator's logits from 0, its decision threshold.

    While the logits lie inside the hinge's margin, the hinge loss depends only on the gap between real and fake
    logits, so their common offset drifts freely and 0 stops being a meaningful threshold. This term pins the
    offset; a shift of every logit changes it, the gap does not. The offset is:
      "mean":     (mean D(real) + mean D(fake)) / 2; a tail of confident logits on one side pulls the threshold
                  into the other side's bulk;
      "median":   (median D(real) + median D(fake)) / 2, midway between the typical real and fake patch;
      "balanced": the median of all real and fake logits together (the two batches have the same number of
                  patches; midway between the two middle values), the threshold at which the share of real
                  patches above it equals the share of fake patches below it: both accuracies then equal their
                  mean, the balanced accuracy.
    """
    if statistic == "balanced":
        return torch.quantile(torch.cat([logits_real.flatten(), logits_fake.flatten()]), 0.5).pow(2)
    if statistic == "median":
        return (0.5 * (logits_real.flatten().median() + logits_fake.flatten().median())).pow(2)
    return (0.5 * (logits_real.mean() + logits_fake.mean())).pow(2)


def separation_auc(logits_real: torch.Tensor, logits_fake: torch.Tensor, max_patches: int = 2048) -> torch.Tensor:
    """The probability that a real patch scores above a reconstructed one (ties count half): the discriminator's
    separation, whatever its threshold; 0.5 is chance. At most `max_patches` of each side (evenly strided)."""
    real, fake = logits_real.detach().flatten(), logits_fake.detach().flatten()
    real = real[:: max(1, real.numel() // max_patches)]
    fake = fake[:: max(1, fake.numel() // max_patches)].sort().values
    # For each real patch, the fakes below it and the fakes tied with it: O(n log n), not an n x n comparison.
    below = torch.searchsorted(fake, real, side="left")
    not_above = torch.searchsorted(fake, real, side="right")
    return (below + not_above).sum() / (2.0 * real.numel() * fake.numel())


def adaptive_gan_weight(
    rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float
) -> torch.Tensor:
    """VQGAN's lambda = ||grad L_rec|| / (||grad L_gan|| + 1e-4) at the decoder's last layer, clamped."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return _weight_from_gradients(rec_grad, gan_grad, max_weight)


def _weight_from_gradients(rec_grad: torch.Tensor, gan_grad: torch.Tensor, max_weight: float) -> torch.Tensor:
    weight = rec_grad.float().norm() / (gan_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


class TokenizerObjective(nn.Module):
    """The stage-1 loss for either variant: VQ-VAE (recon + quantizer) or VQGAN (+ perceptual + GAN)."""

    # False: taming's formulation (three passes through the perceptual net and the discriminator per GAN step).
    # Same loss and gradient either way; the switch exists for tests and benchmarks/bench_tokenizer.py.
    split_backward: bool = True

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.is_gan = config.variant == "vqgan"
        self.perceptual = (
            build_perceptual(config.perceptual_backend, config.perceptual_depth)
            if self.is_gan and config.modality == "image" and config.perceptual_weight > 0
            else None
        )
        self.discriminator = build_discriminator(config) if self.is_gan else None
        if config.modality == "image":
            # NHWC: oneDNN's bf16 convolutions are up to 2x faster in it on CPU (tensor cores prefer it too).
            # The autoencoder stays NCHW: its GroupNorms run 2-4x slower in NHWC (benchmarks/bench_tokenizer.py).
            self.to(memory_format=torch.channels_last)

    def reconstruction_loss(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """VQ-VAE: MSE (images) or byte cross-entropy (text); VQGAN: L1 (+ L2) (images) or cross-entropy (text).
        Text: the mean over the bytes up to and including the first pad (`text_targets`)."""
        if self.config.modality == "text":
            return F.cross_entropy(reconstruction.float(), text_targets(target), ignore_index=-100)
        reconstruction = reconstruction.float()
        if not self.is_gan:
            return F.mse_loss(reconstruction, target)
        loss = self.config.l1_weight * (reconstruction - target).abs().mean()
        if self.config.l2_weight > 0:
            loss = loss + self.config.l2_weight * F.mse_loss(reconstruction, target)
        return loss

    def gan_active(self, step: int) -> bool:
        """Whether the adversarial term reaches the autoencoder at this step (`disc_start`)."""
        return self.is_gan and step >= self.config.disc_start

    def disc_active(self, step: int) -> bool:
        """Whether the discriminator trains at this step (`disc_train_start`; None: from `disc_start`, as taming)."""
        start = self.config.disc_train_start
        return self.is_gan and step >= (self.config.disc_start if start is None else start)

    @property
    def adaptive(self) -> bool:
        return self.config.gan_weighting == "adaptive"

    def generator_loss(
        self, reconstruction: torch.Tensor, target: torch.Tensor, quantizer_loss: torch.Tensor,
        step: int, last_layer: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total autoencoder loss and its parts (tensors; the caller decides when to sync them).

        Backpropagating the total gives the gradient of rec + quantizer + disc_weight * lambda * gan
        (+ feature matching), with the adaptive weight lambda held constant, as in taming.
        """
        gan_on = self.gan_active(step)
        # With the GAN on, cut the graph at the decoder output (see _split_total); fp16 keeps the plain
        # formulation, whose single backward goes through the caller's loss scaling.
        split = (self.split_backward and gan_on and reconstruction.requires_grad
                 and reconstruction.dtype != torch.float16)
        source = reconstruction.detach().requires_grad_(True) if split else reconstruction
        rec = self.reconstruction_loss(source, target)
        logs = {"rec_loss": rec.detach(), "quantizer_loss": quantizer_loss.detach()}
        if self.perceptual is not None:
            perceptual = self.perceptual(source, target)
            logs["perceptual_loss"] = perceptual.detach()
            rec = rec + self.config.perceptual_weight * perceptual
        if not gan_on:
            return rec + quantizer_loss, logs
        logits_fake, fake_features = self.discriminator(source, return_features=True)
        gan = -logits_fake.float().mean()
        matching = None
        if self.config.feature_matching_weight > 0:
            with torch.no_grad():
                _, real_features = self.discriminator(target, return_features=True)
            matching = sum(F.l1_loss(f.float(), r.float()) for f, r in zip(fake_features, real_features))
            logs["feature_matching_loss"] = matching.detach()
        if split:
            total, adaptive = self._split_total(reconstruction, source, rec, gan, matching, quantizer_loss, last_layer)
        else:
            adaptive = (adaptive_gan_weight(rec, gan, last_layer, self.config.adaptive_weight_max) if self.adaptive
                        else torch.ones((), device=gan.device))
            total = rec + quantizer_loss + self.config.disc_weight * adaptive * gan
            if matching is not None:
                total = total + self.config.feature_matching_weight * matching
        logs.update(gan_loss=gan.detach(), gan_weight=self.config.disc_weight * adaptive)
        if self.adaptive:
            logs["adaptive_weight"] = adaptive
        return total, logs

    def _split_total(self, reconstruction, source, rec, gan, matching, quantizer_loss, last_layer):
        """The GAN-phase total, built so the perceptual net and the discriminator are backpropagated once.

        Taming computes lambda with two autograd.grad calls through them to the last layer, then backpropagates
        the total through them again. Here the losses were taken on `source`, a detached copy of the
        reconstruction: their gradients w.r.t. it (one pass each) give the last-layer gradients by a cheap
        vector-Jacobian product through the final conv, and the total's gradient w.r.t. the reconstruction is
        their lambda-weighted sum, fed back through the autoencoder once by a surrogate term whose value is 0.
        Same value and same gradient as the plain formulation (tests/test_fast_paths.py checks both).
        """
        (rec_grad,) = torch.autograd.grad(rec, source)
        (gan_grad,) = torch.autograd.grad(gan, source, retain_graph=matching is not None)
        if self.adaptive:
            rec_last, gan_last = (
                torch.autograd.grad(reconstruction, last_layer, grad.to(reconstruction.dtype), retain_graph=True)[0]
                for grad in (rec_grad, gan_grad)
            )
            adaptive = _weight_from_gradients(rec_last, gan_last, self.config.adaptive_weight_max)
        else:
            adaptive = torch.ones((), device=gan.device)
        value = rec.detach() + self.config.disc_weight * adaptive * gan.detach()
        grad = rec_grad.float() + (self.config.disc_weight * adaptive) * gan_grad.float()  # (B, *output shape)
        if matching is not None:
            (matching_grad,) = torch.autograd.grad(matching, source)
            value = value + self.config.feature_matching_weight * matching.detach()
            grad = grad + self.config.feature_matching_weight * matching_grad.float()
        surrogate = (reconstruction.float() * grad).sum()
        return value + quantizer_loss + (surrogate - surrogate.detach()), adaptive

    def discriminator_loss(
        self, reconstruction: torch.Tensor, target: torch.Tensor, discriminator: nn.Module | None = None
    ) -> tuple[torch.Tensor, dict]:
        """The discriminator's loss (`disc_objective`: hinge or vanilla; + centring, + LeCam) on detached
        reconstructions vs real inputs (through `discriminator`, e.g. DDP-wrapped).

        The logs are the GAN's health: the hinge loss (whichever objective trains it, so runs compare), the mean
        logits, the share of real and of fake patches on the right side of 0 and the threshold-free separation
        AUC (a discriminator that separates nothing sits at hinge loss 1.0, accuracy ~50% and AUC 0.5).
        """
        discriminator = discriminator or self.discriminator
        logits_real = discriminator(target).float()
        logits_fake = discriminator(reconstruction.detach()).float()
        hinge = hinge_discriminator_loss(logits_real, logits_fake)
        logs = {
            "disc_loss": hinge.detach(),
            "logits_real": logits_real.mean().detach(),
            "logits_fake": logits_fake.mean().detach(),
            "disc_acc_real": (logits_real > 0).float().mean(),
            "disc_acc_fake": (logits_fake < 0).float().mean(),
            "disc_auc": separation_auc(logits_real, logits_fake),
        }
        loss = hinge
        if self.config.disc_objective == "vanilla":
            loss = vanilla_discriminator_loss(logits_real, logits_fake)
            logs["disc_vanilla_loss"] = loss.detach()
        if self.config.disc_centring_weight > 0:
            loss = loss + self.config.disc_centring_weight * centring_penalty(
                logits_real, logits_fake, self.config.disc_centring)
        if self.config.lecam_weight > 0:
            lecam = lecam_penalty(logits_real, logits_fake, self.discriminator.logit_ema)
            logs["lecam_loss"] = lecam.detach()
            loss = loss + self.config.lecam_weight * lecam
        return loss, logs

