"""Stage-2 training arguments: a dataclass parsed by HfArgumentParser, as stage 1's (see stage1_tokenizer.arguments)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from stage1_tokenizer.arguments import check_finite, check_positive, described, read_config_fields, with_defaults
from stage1_tokenizer.data import BUILTIN_DATASETS

from .modeling import PRIOR_PRESETS, PRIOR_SHAPE_FIELDS, check_prior_shape


@dataclass
class PriorTrainingArguments:
    """Stage 2: train the GPT-style prior over a trained tokenizer's codes; the output folder is a full pipeline."""

    tokenizer: str = field(metadata=described("folder of a trained stage-1 tokenizer"))
    max_steps: int = field(metadata=described("optimizer steps to train for"))
    output_dir: str = field(metadata=described("becomes a complete pipeline folder"))
    dataset: str = field(default="digits",
                         metadata=described(f"Hub name, local folder, or a built-in: {BUILTIN_DATASETS}"))
    preset: str = field(default="tiny", metadata=described("size preset", choices=sorted(PRIOR_PRESETS)))
    config: str | None = field(default=None, metadata=described(
        "the prior's shape over the preset's, a JSON object or file of " + ", ".join(PRIOR_SHAPE_FIELDS)
        + " (e.g. '{\"num_hidden_layers\": 2}')"))
    class_conditional: bool = field(default=False, metadata=described("condition on the data set's labels"))
    resume: bool = field(default=False, metadata=described("continue from the newest intact checkpoint"))
    seed: int = 0
    batch_size: int | None = field(default=None, metadata=described("default: the preset's"))
    learning_rate: float | None = field(default=None, metadata=described("peak learning rate (default: the preset's)"))
    warmup_steps: int | None = field(default=None, metadata=described("default: the preset's"))
    decay_steps: int | None = field(default=None, metadata=described(
        "length of the cosine learning-rate decay (default: --max-steps); set it when a run will be extended with "
        "--resume so the schedule does not depend on --max-steps"))
    weight_decay: float = 0.05
    label_dropout: float = field(default=0.1, metadata=described("probability of the null class (for guidance)"))
    grad_clip: float = 1.0
    weight_ema: float | None = field(default=None, metadata=described(
        "also keep an exponential moving average of the weights with this decay (e.g. 0.999; warmed up over the "
        "first steps); validation, sample grids and the saved pipeline then use the average"))
    window_offsets: int = field(default=1, metadata=described(
        "unlabelled text: cut the training text into windows at this many evenly spaced starting bytes (that many "
        "times as many distinct sequences from the same text; validation keeps one cut)"))
    load_best_at_end: bool = field(default=False, metadata=described(
        "keep the weights (the EMA's, with --weight-ema) that scored the lowest validation NLL at an --eval-every "
        "step, and save those in the pipeline when they beat the last step's (validation is the data set's test "
        "split if it has one: do not report scores on the split that chose the weights)"))
    cache_dir: str | None = field(default=None,
                                 metadata=described("where code caches live (default ~/.cache/vqgen/codes)"))
    max_eval_items: int = field(default=2000, metadata=described("cap on validation sequences"))
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    cpu: bool = False
    threads: int | None = field(default=None, metadata=described(
        "CPU threads for torch (default: OMP_NUM_THREADS, else the cores other processes leave free; README, Threads)"))
    attention: Literal["auto", "eager", "sdpa"] = field(default="auto", metadata=described(
        "attention kernel for training (auto: eager on a CPU, where it measured faster, sdpa on a GPU)"))
    compile: bool = field(default=False, metadata=described("torch.compile the training loss"))
    log_every: int | None = None
    eval_every: int | None = None
    sample_every: int | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    max_nonfinite: int = 20

    def __post_init__(self):
        if self.preset not in PRIOR_PRESETS:
            raise ValueError(f"--preset {self.preset!r} is unknown; expected one of {sorted(PRIOR_PRESETS)}")
        check_positive(self, ("max_steps", "threads", "decay_steps", "batch_size", "log_every", "eval_every",
                              "sample_every", "checkpoint_every", "keep_checkpoints", "max_nonfinite",
                              "max_eval_items", "window_offsets"))
        check_finite(self, ("learning_rate", "grad_clip"))
        check_finite(self, ("weight_decay",), strict=False)
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.weight_ema is not None and not 0.0 < self.weight_ema < 1.0:
            raise ValueError(f"--weight-ema must be in (0, 1), got {self.weight_ema}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"--label-dropout must be in [0, 1), got {self.label_dropout}")
        self.shape()  # a bad --config fails here, before any data is read

    def shape(self) -> dict:
        """The model fields --config changes (empty without one)."""
        return check_prior_shape(read_config_fields(self.config, "prior shape")) if self.config else {}

    def resolved(self) -> "PriorTrainingArguments":
        """A copy with the preset's training defaults in place of None."""
        return with_defaults(self, PRIOR_PRESETS[self.preset]["train"])
