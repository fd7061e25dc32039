"""VQConfig: the one configuration object of a VQ-VAE / VQGAN tokenizer, plus named size presets."""

from __future__ import annotations

import math
from typing import Any

from transformers import PretrainedConfig

MODALITIES = ("image", "text")
VARIANTS = ("vqvae", "vqgan")
PERCEPTUAL_BACKENDS = ("lpips", "random-vgg", "none")
DISC_NORMS = ("batch", "group", "none")
DISC_INITS = ("dcgan", "default")
GAN_WEIGHTINGS = ("adaptive", "fixed")
DISC_CENTRINGS = ("mean", "median", "balanced")
DISC_OBJECTIVES = ("hinge", "vanilla")
BYTE_VOCAB_SIZE = 257  # 256 UTF-8 byte values + one pad symbol
PAD_BYTE = 256

# Named size presets. Model fields go to VQConfig ("text" entries override them for
# modality="text"); the "train" entry holds the training defaults the stage-1 script
# reads, with "image_train" changes to them per variant for images. Each preset is one registry
# entry and also feeds the command line's `choices`.
TOKENIZER_PRESETS: dict[str, dict[str, Any]] = {
    # A few steps in seconds: for tests and smoke runs.
    "tiny": dict(
        model=dict(
            base_channels=16, channel_mult=(1, 2), num_res_blocks=1, resolution=16, seq_len=32,
            codebook_size=64, codebook_dim=8, disc_channels=16, disc_layers=2, disc_start=0,
            perceptual_depth=2, dead_code_threshold=1.0, usage_window=20,
        ),
        text=dict(seq_len=32),
        train=dict(batch_size=16, learning_rate=2e-4, disc_learning_rate=2e-4, log_every=5,
                   sample_every=50, checkpoint_every=50, adam_beta1=0.5, adam_beta2=0.9),
    ),
    # Fashion-MNIST sized: 32x32 -> 8x8 codes; a few thousand steps in well under an hour on 2 CPU cores.
    "small": dict(
        model=dict(
            base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, resolution=32, seq_len=64,
            codebook_size=512, codebook_dim=8, disc_channels=32, disc_layers=2, disc_start=1000,
            kmeans_init=True, dead_code_threshold=1.0,
            perceptual_depth=3,  # relu1_2..relu3_3: deeper VGG taps see 4x4 and 2x2 maps at 32x32
        ),
        # 2 bytes per code with 1024 codes (10 bits for 16 bits of UTF-8; README, Text: 1024 codes against 512),
        # 128-byte sequences (64 codes): the convolutions are local, so the longer window reconstructs as well.
        text=dict(channel_mult=(1, 2), base_channels=64, seq_len=128, codebook_size=1024),
        train=dict(batch_size=64, learning_rate=4e-4, disc_learning_rate=4e-4, log_every=25,
                   sample_every=500, checkpoint_every=500, adam_beta1=0.5, adam_beta2=0.9),
        # Image VQ-VAEs: the autoencoder's Adam at LlamaGen's betas, not taming's (0.5, 0.9). On held-out Fashion-MNIST
        # at the fitted standard budget (1,200 steps) its reconstructions' FD-classifier fell from 6.95 and 6.70 to 4.20
        # and 4.65 (seeds 0, 1; docs/studies.md, the tokenizer's optimizer): with beta1 0.5 the last weights jitter (the
        # background sits 0.023 above black, against 0.015). The VQGAN, whose GAN recipe was tuned with taming's betas,
        # showed no clear change (2.11 -> 2.62, within its run-to-run spread), and text was not measured.
        image_train=dict(vqvae=dict(adam_beta1=0.9, adam_beta2=0.95)),
    ),
    # A GPU-sized model for 64x64+ images (taming's f=8 configuration, narrower).
    "base": dict(
        model=dict(
            base_channels=128, channel_mult=(1, 1, 2, 2), num_res_blocks=2, resolution=64, seq_len=256,
            codebook_size=1024, codebook_dim=8, disc_channels=64, disc_layers=3, disc_start=10000,
            kmeans_init=True, dead_code_threshold=1.0,
        ),
        text=dict(seq_len=256),
        train=dict(batch_size=32, learning_rate=2e-4, disc_learning_rate=2e-4, log_every=50,
                   sample_every=2000, checkpoint_every=2000, adam_beta1=0.5, adam_beta2=0.9),
    ),
}


# Named adversarial recipes: VQConfig fields set together by `--gan-recipe`. "taming" reproduces
# taming-transformers (BatchNorm PatchGAN scored on real and fake batches in separate calls, trained only from
# disc_start, adaptive weight clamped at 1e4); "vqgen" is the default, chosen by the ablation in docs/studies.md
# ("The VQGAN's discriminator"). Its hinge loss at fixed weight 0.01 was the default before the logistic
# loss at 0.0075, and is again: on held-out Fashion-MNIST over four seeds (1,200 steps) the logistic loss's
# discriminator separated better (AUC 0.77-0.79 against 0.71) but its reconstructions' FD-classifier was worse on
# three (median 3.41 against 1.76; docs/studies.md, "A fourth run").
GAN_RECIPES: dict[str, dict[str, Any]] = {
    "taming": dict(disc_norm="batch", disc_init="dcgan", disc_spectral_norm=False, disc_blur=False,
                   disc_train_start=None, gan_weighting="adaptive", disc_weight=0.8, adaptive_weight_max=1e4,
                   lecam_weight=0.0, disc_centring_weight=0.0, disc_centring="mean", disc_objective="hinge"),
    "vqgen": dict(disc_norm="group", disc_init="default", disc_spectral_norm=False, disc_blur=False,
                  disc_train_start=0, gan_weighting="fixed", disc_weight=0.01, adaptive_weight_max=1e4,
                  lecam_weight=0.0, disc_centring_weight=1.0, disc_centring="mean", disc_objective="hinge"),
}


# Sizes beyond these are typos, not models: refused up front instead of dying in the allocator.
MAX_CODEBOOK_SIZE = 2**20
MAX_RESOLUTION = 1024
MAX_SEQ_LEN = 2**16
NUMBER_FIELDS = ("commitment_beta", "dead_code_threshold", "l1_weight", "l2_weight", "perceptual_weight",
                 "disc_weight", "adaptive_weight_max", "feature_matching_weight", "lecam_weight",
                 "disc_centring_weight")


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number")


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {list(allowed)}")


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


def _base_config_keys() -> set[str]:
    """Keys transformers itself writes into or accepts for every config.json."""
    keys = set(PretrainedConfig().to_dict())
    return keys | {"name_or_path", "torch_dtype", "use_return_dict", "tie_word_embeddings"}


class VQConfig(PretrainedConfig):
    """Configuration of a VQ-VAE or VQGAN tokenizer for images or byte-level text."""

    model_type = "vqgen_tokenizer"

    def __init__(
        self,
        modality: str = "image",
        variant: str = "vqvae",
        # architecture
        in_channels: int = 1,
        resolution: int = 32,
        seq_len: int = 64,
        byte_vocab_size: int = BYTE_VOCAB_SIZE,
        byte_embed_dim: int = 64,
        base_channels: int = 32,
        channel_mult: tuple[int, ...] | list[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        attn_at_lowest: bool = True,
        num_groups: int = 8,
        # codebook
        codebook_size: int = 512,
        codebook_dim: int = 8,
        commitment_beta: float = 0.25,
        ema_decay: float | None = None,
        l2_normalize: bool = True,
        kmeans_init: bool = False,
        dead_code_threshold: float = 0.0,
        rotation_trick: bool = False,
        usage_window: int = 100,
        # objective
        l1_weight: float = 1.0,
        l2_weight: float = 0.0,
        perceptual_weight: float = 1.0,
        perceptual_backend: str = "random-vgg",
        perceptual_depth: int = 5,
        disc_weight: float = GAN_RECIPES["vqgen"]["disc_weight"],
        disc_start: int = 1000,
        disc_train_start: int | None = GAN_RECIPES["vqgen"]["disc_train_start"],
        disc_channels: int = 32,
        disc_layers: int = 2,
        disc_norm: str = GAN_RECIPES["vqgen"]["disc_norm"],
        disc_init: str = GAN_RECIPES["vqgen"]["disc_init"],
        disc_spectral_norm: bool = GAN_RECIPES["vqgen"]["disc_spectral_norm"],
        disc_blur: bool = GAN_RECIPES["vqgen"]["disc_blur"],
        gan_weighting: str = GAN_RECIPES["vqgen"]["gan_weighting"],
        adaptive_weight_max: float = GAN_RECIPES["vqgen"]["adaptive_weight_max"],
        lecam_weight: float = GAN_RECIPES["vqgen"]["lecam_weight"],
        disc_centring_weight: float = GAN_RECIPES["vqgen"]["disc_centring_weight"],
        disc_centring: str = GAN_RECIPES["vqgen"]["disc_centring"],
        disc_objective: str = GAN_RECIPES["vqgen"]["disc_objective"],
        feature_matching_weight: float = 0.0,
        class_names: list[str] | None = None,
        **kwargs,
    ):
        self.modality = modality
        self.variant = variant
        self.in_channels = in_channels
        self.resolution = resolution
        self.seq_len = seq_len
        self.byte_vocab_size = byte_vocab_size
        self.byte_embed_dim = byte_embed_dim
        self.base_channels = base_channels
        self.channel_mult = list(channel_mult)
        self.num_res_blocks = num_res_blocks
        self.attn_at_lowest = attn_at_lowest
        self.num_groups = num_groups
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.commitment_beta = commitment_beta
        self.ema_decay = ema_decay
        self.l2_normalize = l2_normalize
        self.kmeans_init = kmeans_init
        self.dead_code_threshold = dead_code_threshold
        self.rotation_trick = rotation_trick
        self.usage_window = usage_window
        self.l1_weight = l1_weight
        self.l2_weight = l2_weight
        self.perceptual_weight = perceptual_weight
        self.perceptual_backend = perceptual_backend
        self.perceptual_depth = perceptual_depth
        self.disc_weight = disc_weight
        self.disc_start = disc_start
        self.disc_train_start = disc_train_start
        self.disc_channels = disc_channels
        self.disc_layers = disc_layers
        self.disc_norm = disc_norm
        self.disc_init = disc_init
        self.disc_spectral_norm = disc_spectral_norm
        self.disc_blur = disc_blur
        self.gan_weighting = gan_weighting
        self.adaptive_weight_max = adaptive_weight_max
        self.lecam_weight = lecam_weight
        self.disc_centring_weight = disc_centring_weight
        self.disc_centring = disc_centring
        self.disc_objective = disc_objective
        self.feature_matching_weight = feature_matching_weight
        self.class_names = class_names
        unknown = sorted(set(kwargs) - _base_config_keys())
        if unknown:
            raise ValueError(f"VQConfig got unknown field(s) {unknown}; see VQConfig.__init__ for the allowed fields")
        super().__init__(**kwargs)
        self.validate()

    @property
    def downsample_factor(self) -> int:
        """Spatial (or sequence) reduction from input to code grid."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample's code grid: (h, w) for images, (n,) for text."""
        if self.modality == "image":
            side = self.resolution // self.downsample_factor
            return (side, side)
        return (self.seq_len // self.downsample_factor,)

    def validate(self) -> None:
        """Raise ValueError naming the first unknown or inconsistent field."""
        _check_choice("modality", self.modality, MODALITIES)
        _check_choice("variant", self.variant, VARIANTS)
        _check_choice("perceptual_backend", self.perceptual_backend, PERCEPTUAL_BACKENDS)
        _check_choice("disc_norm", self.disc_norm, DISC_NORMS)
        _check_choice("disc_init", self.disc_init, DISC_INITS)
        _check_choice("gan_weighting", self.gan_weighting, GAN_WEIGHTINGS)
        _check_choice("disc_centring", self.disc_centring, DISC_CENTRINGS)
        _check_choice("disc_objective", self.disc_objective, DISC_OBJECTIVES)
        for name in ("disc_spectral_norm", "disc_blur", "l2_normalize", "kmeans_init", "rotation_trick",
                     "attn_at_lowest"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false (a JSON boolean)")
        if not self.channel_mult or any(not isinstance(m, int) or m < 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult={self.channel_mult!r} must be a non-empty list of positive integers")
        for name in ("base_channels", "num_res_blocks", "codebook_dim", "num_groups", "usage_window",
                     "disc_channels", "disc_layers", "in_channels", "resolution", "seq_len", "byte_embed_dim"):
            _check_positive_int(name, getattr(self, name), minimum=0 if name == "num_res_blocks" else 1)
        _check_positive_int("codebook_size", self.codebook_size, minimum=2)
        for name, limit in (("codebook_size", MAX_CODEBOOK_SIZE), ("resolution", MAX_RESOLUTION),
                            ("seq_len", MAX_SEQ_LEN)):
            if getattr(self, name) > limit:
                raise ValueError(f"{name}={getattr(self, name)!r} is beyond the supported maximum {limit:,}")
        for name in NUMBER_FIELDS:
            _check_number(name, getattr(self, name))
        if self.ema_decay is not None:
            _check_number("ema_decay", self.ema_decay)
        if self.disc_train_start is not None:
            _check_positive_int("disc_train_start", self.disc_train_start, minimum=0)
        _check_positive_int("disc_start", self.disc_start, minimum=0)
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels={self.in_channels!r} must be 1 (grey) or 3 (RGB)")
        factor = self.downsample_factor
        if self.modality == "image" and self.resolution % factor:
            raise ValueError(
                f"resolution={self.resolution} is not divisible by the downsampling factor {factor} "
                f"(2 ** (len(channel_mult) - 1) with channel_mult={self.channel_mult})"
            )
        if self.modality == "text" and self.seq_len % factor:
            raise ValueError(
                f"seq_len={self.seq_len} is not divisible by the downsampling factor {factor} "
                f"(2 ** (len(channel_mult) - 1) with channel_mult={self.channel_mult})"
            )
        for mult in self.channel_mult:
            if (self.base_channels * mult) % self.num_groups:
                raise ValueError(
                    f"num_groups={self.num_groups} must divide every width base_channels * channel_mult "
                    f"(got {self.base_channels} * {mult})"
                )
        if self.byte_vocab_size != BYTE_VOCAB_SIZE:
            raise ValueError(f"byte_vocab_size={self.byte_vocab_size} must be {BYTE_VOCAB_SIZE} (256 bytes + pad)")
        if not 0.0 <= self.commitment_beta:
            raise ValueError(f"commitment_beta={self.commitment_beta!r} must be >= 0")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay!r} must be None or in (0, 1)")
        if self.dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold={self.dead_code_threshold!r} must be >= 0")
        for name in ("l1_weight", "l2_weight", "perceptual_weight", "disc_weight", "feature_matching_weight",
                     "lecam_weight", "disc_centring_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0")
        if self.perceptual_depth not in range(1, 6):
            raise ValueError(f"perceptual_depth={self.perceptual_depth!r} must be 1..5 (VGG16 blocks before a tap)")
        if self.disc_train_start is not None and not 0 <= self.disc_train_start <= self.disc_start:
            raise ValueError(f"disc_train_start={self.disc_train_start!r} must be None (train the discriminator "
                             f"from disc_start, as taming) or between 0 and disc_start={self.disc_start}")
        if self.variant == "vqgan":
            # Each of the PatchGAN's disc_layers halves the side, then two 4x4 stride-1 convs take 2 more.
            side_name = "resolution" if self.modality == "image" else "seq_len"
            side = getattr(self, side_name)
            if side // 2**self.disc_layers < 3:
                raise ValueError(
                    f"disc_layers={self.disc_layers} is too deep for {side_name}={side}: the discriminator "
                    f"needs {side_name} >= 3 * 2 ** disc_layers = {3 * 2**self.disc_layers}"
                )
        if self.adaptive_weight_max <= 0:
            raise ValueError(f"adaptive_weight_max={self.adaptive_weight_max!r} must be > 0")

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> "VQConfig":
        """Build the config of a named preset (see TOKENIZER_PRESETS), with field overrides."""
        if preset not in TOKENIZER_PRESETS:
            raise ValueError(f"preset={preset!r} is unknown; expected one of {list(TOKENIZER_PRESETS)}")
        fields = dict(TOKENIZER_PRESETS[preset]["model"])
        if overrides.get("modality") == "text":
            fields.update(TOKENIZER_PRESETS[preset].get("text", {}))
        fields.update(overrides)
        return cls(**fields)
