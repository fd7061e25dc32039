"""Training arguments as dataclasses: one source of defaults for the command line, JSON files and `vqgen compare`.

Parsed with transformers' `HfArgumentParser`, so `--max-steps 100` and `--max_steps 100` both work, and a single
`.json` argument is read as a file of fields. A field left as None means "the preset's training default";
`resolved()` fills those in, and the run folder saves the resolved object (`training_args.json`), i.e. what actually
ran. A value given explicitly is never replaced: a 0 stays a 0, and is refused where it makes no sense.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .configuration import GAN_RECIPES, TOKENIZER_PRESETS
from .data import BUILTIN_DATASETS

TRAINING_ARGS = "training_args.json"


def described(text: str, **metadata) -> dict:
    """A dataclass field's metadata for HfArgumentParser: its help text and any other add_argument options."""
    return {"help": text, **metadata}


def check_positive(arguments, names: tuple[str, ...]) -> None:
    """Integer fields that must be >= 1 when set."""
    for name in names:
        value = getattr(arguments, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def check_finite(arguments, names: tuple[str, ...], minimum: float = 0.0, strict: bool = True) -> None:
    """Float fields that must be finite and > minimum (or >= minimum when not strict) when set."""
    for name in names:
        value = getattr(arguments, name)
        if value is None:
            continue
        if not math.isfinite(value) or (value <= minimum if strict else value < minimum):
            relation = ">" if strict else ">="
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number {relation} {minimum}, got {value}")


def with_defaults(arguments, defaults: dict):
    """A copy of `arguments` whose None fields named in `defaults` take the preset's values."""
    names = {f.name for f in dataclasses.fields(arguments)}
    return dataclasses.replace(arguments, **{name: value for name, value in defaults.items()
                                             if name in names and getattr(arguments, name) is None})


# The autoencoder's learning-rate schedules (`--lr-schedule`; stage1_tokenizer.train.learning_rate_factor).
LR_SCHEDULES = ("constant", "cosine", "cooldown")


def read_config_fields(config: str, fields_of: str = "VQConfig") -> dict:
    """--config: a JSON object inline (`'{"codebook_size": 1024}'`) or the path of a JSON file (a config.json)."""
    inline = config.lstrip().startswith("{")
    if not inline and not Path(config).is_file():
        raise ValueError(f"--config {config!r} is neither a JSON object nor an existing file")
    try:
        fields = json.loads(config if inline else Path(config).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"--config {'value' if inline else repr(config)} is not valid JSON: {error}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"--config must hold a JSON object of {fields_of} fields, got {type(fields).__name__}")
    return fields


@dataclass
class TokenizerTrainingArguments:
    """Stage 1: train a VQ-VAE or VQGAN tokenizer."""

    max_steps: int = field(metadata=described("optimizer steps to train for"))
    output_dir: str = field(metadata=described("run folder: checkpoints, metrics.jsonl, samples and the final model"))
    dataset: str = field(default="digits",
                         metadata=described(f"Hub name, local folder, or a built-in: {BUILTIN_DATASETS}"))
    modality: Literal["image", "text"] = "image"
    variant: Literal["vqvae", "vqgan"] = "vqgan"
    preset: str = field(default="tiny", metadata=described("size preset", choices=sorted(TOKENIZER_PRESETS)))
    config: str | None = field(default=None, metadata=described(
        "VQConfig fields over the preset's: a JSON object or a JSON file (e.g. a trained tokenizer's config.json)"))
    resume: bool = field(default=False, metadata=described("continue from the newest intact checkpoint"))
    seed: int = 0
    batch_size: int | None = field(default=None, metadata=described("global batch size (default: the preset's)"))
    learning_rate: float | None = field(default=None, metadata=described("default: the preset's"))
    disc_learning_rate: float | None = field(default=None, metadata=described("default: the preset's"))
    adam_beta1: float | None = field(default=None, metadata=described(
        "the autoencoder's Adam beta1 (default: the preset's: taming's 0.5, except 0.9 for the small image VQ-VAE)"))
    adam_beta2: float | None = field(default=None, metadata=described(
        "the autoencoder's Adam beta2 (default: the preset's: taming's 0.9, except 0.95 for the small image VQ-VAE)"))
    lr_schedule: Literal["constant", "cosine", "cooldown"] = field(default="constant", metadata=described(
        "the autoencoder's learning rate: constant (taming's), a cosine decay to 0 over --decay-steps, or "
        "cooldown: constant, then a linear decay to 0 over the last --cooldown-steps of --decay-steps; either "
        "after --warmup-steps of linear warm-up. The discriminator's stays constant"))
    warmup_steps: int = field(default=0, metadata=described("linear warm-up of the autoencoder's learning rate"))
    decay_steps: int | None = field(default=None, metadata=described(
        "where the decay ends (default: --max-steps); set it when a run will be extended with --resume"))
    cooldown_steps: int | None = field(default=None, metadata=described(
        "length of the cooldown schedule's linear decay (default: a fifth of --decay-steps)"))
    grad_clip: float = field(default=1.0, metadata=described("the autoencoder's gradient-norm clip"))
    disc_grad_clip: float = field(default=0.0, metadata=described(
        "the discriminator's gradient-norm clip (0: none; see README, the VQGAN's discriminator)"))
    perceptual_backend: Literal["lpips", "random-vgg", "none"] | None = field(
        default=None, metadata=described("perceptual loss network (default: the config's)", aliases=["--perceptual"]))
    disc_start: int | None = field(default=None, metadata=described("step at which the GAN loss reaches the decoder"))
    gan_recipe: str | None = field(default=None, metadata=described(
        "a named set of discriminator fields (default: the config's own, i.e. 'vqgen'; 'taming' reproduces "
        "taming-transformers)", choices=sorted(GAN_RECIPES)))
    ema_decay: float | None = field(default=None, metadata=described("use an EMA codebook with this decay (e.g. 0.99)"))
    weight_ema: float | None = field(default=None, metadata=described(
        "also keep an exponential moving average of the autoencoder's weights with this decay (e.g. 0.999; warmed "
        "up over the first steps); previews, the evaluation and the saved model then use the average"))
    codebook_size: int | None = None
    resolution: int | None = None
    hflip: bool = field(default=False, metadata=described("random horizontal flips"))
    skip_corrupt: bool = field(default=False, metadata=described("skip and count undecodable records"))
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    cpu: bool = field(default=False, metadata=described("train on the CPU even when a GPU is present"))
    num_workers: int = 0
    threads: int | None = field(default=None, metadata=described(
        "CPU threads for torch (default: OMP_NUM_THREADS, else the cores other processes leave free; README, Threads)"))
    compile: bool = field(default=False, metadata=described("torch.compile the encoder and decoder (see benchmarks/)"))
    log_every: int | None = None
    sample_every: int | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    max_nonfinite: int = field(default=20, metadata=described("stop after this many non-finite losses in a row"))
    max_eval_items: int | None = field(default=None, metadata=described("evaluate on at most this many test records"))

    def __post_init__(self):
        if self.preset not in TOKENIZER_PRESETS:
            raise ValueError(f"--preset {self.preset!r} is unknown; expected one of {sorted(TOKENIZER_PRESETS)}")
        if self.gan_recipe is not None and self.gan_recipe not in GAN_RECIPES:
            raise ValueError(f"--gan-recipe {self.gan_recipe!r} is unknown; expected one of {sorted(GAN_RECIPES)}")
        check_positive(self, ("max_steps", "threads", "batch_size", "log_every", "sample_every", "checkpoint_every",
                              "keep_checkpoints", "max_nonfinite", "max_eval_items", "codebook_size", "resolution"))
        check_finite(self, ("learning_rate", "disc_learning_rate", "grad_clip"))
        check_finite(self, ("disc_grad_clip",), strict=False)
        if self.disc_start is not None and self.disc_start < 0:
            raise ValueError(f"--disc-start must be >= 0, got {self.disc_start}")
        if self.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        check_positive(self, ("decay_steps", "cooldown_steps"))
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"--lr-schedule {self.lr_schedule!r} is unknown; expected one of {list(LR_SCHEDULES)}")
        if self.weight_ema is not None and not 0.0 < self.weight_ema < 1.0:
            raise ValueError(f"--weight-ema must be in (0, 1), got {self.weight_ema}")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:  # (also false for nan)
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1), got {value}")

    def resolved(self) -> "TokenizerTrainingArguments":
        """A copy with the preset's training defaults in place of None (batch size, learning rates, intervals)."""
        preset = TOKENIZER_PRESETS[self.preset]
        image_changes = preset.get("image_train", {}).get(self.variant, {}) if self.modality == "image" else {}
        return with_defaults(self, {**preset["train"], **image_changes})


def parse_arguments(cls, argv: list[str] | None = None, description: str | None = None, prog: str | None = None):
    """Parse `argv` (or a single `.json` file of fields) into a `cls` instance; bad values exit 2 with one line."""
    from transformers import HfArgumentParser

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser(cls, description=description or cls.__doc__, prog=prog)
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            (arguments,) = parser.parse_json_file(argv[0])
        else:
            (arguments,) = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    except (ValueError, TypeError, json.JSONDecodeError) as error:
        parser.error(str(error))
    return arguments


def save_arguments(arguments, output_dir: Path) -> Path:
    """Write the arguments a run used (after defaults were filled) to `output_dir/training_args.json`."""
    path = Path(output_dir) / TRAINING_ARGS
    staging = path.with_name(f".tmp-{TRAINING_ARGS}")
    staging.write_text(json.dumps(dataclasses.asdict(arguments), indent=2))
    staging.replace(path)
    return path
