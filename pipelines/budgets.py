"""`vqgen compare`'s settings: named budgets, a user's overrides, and the training arguments both stages get.

A budget is a `Budget` (what both variants share); `CompareArguments` names one and may override any of its
fields on the command line (`--tokenizer-steps 800`) or with a JSON file (`--budget-file my_budget.json`). The
training runs receive the same `TokenizerTrainingArguments` / `PriorTrainingArguments` objects the training
command lines build, written to JSON files, so no value goes through an argv round trip.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from stage1_tokenizer.arguments import (
    LR_SCHEDULES,
    TokenizerTrainingArguments,
    check_finite,
    check_positive,
    described,
)
from stage1_tokenizer.configuration import TOKENIZER_PRESETS
from stage2_prior.arguments import PriorTrainingArguments
from stage2_prior.modeling import PRIOR_PRESETS

VARIANTS = ("vqvae", "vqgan")
# At most this many validations per prior run in `vqgen compare` (prior_eval_every).
PRIOR_VALIDATIONS = 8
DEFAULT_DATASETS = {"image": "digits", "text": "python-docs"}


@dataclass(frozen=True)
class Budget:
    """Everything both variants share; only the tokenizer's objective differs between them."""

    tokenizer_preset: str
    tokenizer_steps: int
    tokenizer_batch: int
    disc_start: int
    prior_preset: str
    prior_steps: int
    prior_batch: int
    num_eval_samples: int
    guidance_scale: float
    # torch.compile the priors' training loss: about 16 s of compilation per prior, paid back after ~400 steps on
    # the bf16 machine (README, Performance), so only budgets with thousands of prior steps turn it on.
    prior_compile: bool = False
    # Unlabelled text: cut the training text at this many starting bytes for the prior (stage2_prior.train's
    # --window-offsets). (No --load-best-at-end here: the priors validate on the test split the report scores.)
    prior_window_offsets: int = 1
    # Both tokenizers save (and are evaluated with) an EMA of their weights with this decay (stage 1's
    # --weight-ema); None: their trained weights.
    tokenizer_weight_ema: float | None = None
    # The tokenizers' learning-rate schedule (stage 1's --lr-schedule): "constant", "cosine" or "cooldown" (each
    # decaying to 0 by the tokenizer's last step, also when the fit scales the steps).
    tokenizer_lr_schedule: str = "constant"
    # Wall-clock target for all training (both tokenizers and both priors): on a slower machine the steps are
    # scaled down to fit it (pipelines/budget_fit.py). None or 0: the steps run as they are.
    train_minutes: float | None = None

    def __post_init__(self):
        check_positive(self, ("tokenizer_steps", "tokenizer_batch", "prior_steps", "prior_batch", "num_eval_samples",
                              "prior_window_offsets"))
        check_finite(self, ("guidance_scale",))
        if self.disc_start < 0:
            raise ValueError(f"--disc-start must be >= 0, got {self.disc_start}")
        check_finite(self, ("train_minutes",), strict=False)
        if self.tokenizer_weight_ema is not None and not 0.0 < self.tokenizer_weight_ema < 1.0:
            raise ValueError(f"--tokenizer-weight-ema must be in (0, 1), got {self.tokenizer_weight_ema}")
        if self.tokenizer_lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"--tokenizer-lr-schedule {self.tokenizer_lr_schedule!r} is unknown; expected one of "
                             f"{list(LR_SCHEDULES)}")
        if self.tokenizer_preset not in TOKENIZER_PRESETS:
            raise ValueError(f"tokenizer preset {self.tokenizer_preset!r} is unknown; expected one of "
                             f"{sorted(TOKENIZER_PRESETS)}")
        if self.prior_preset not in PRIOR_PRESETS:
            raise ValueError(f"prior preset {self.prior_preset!r} is unknown; expected one of {sorted(PRIOR_PRESETS)}")


BUDGETS: dict[str, Budget] = {
    # Offline, digits (16x16 -> 8x8 codes) in a few minutes on 2 idle CPU cores (README: quick budget).
    "quick": Budget(tokenizer_preset="tiny", tokenizer_steps=500, tokenizer_batch=32, disc_start=150,
                    prior_preset="tiny", prior_steps=1500, prior_batch=32, num_eval_samples=360, guidance_scale=2.0),
    # Fashion-MNIST (32x32 -> 8x8 codes) within 45 minutes on 2 CPU cores: the budget study's best measured point
    # (held-out data: 6,000 prior steps beat 3,000), its steps scaled down to 34 training minutes on machines too
    # slow for it (README: Results): the evaluation takes 4-9 more minutes (AMX / AVX512-BF16 machines), and
    # the whole compare must end within 45. Guidance 1.5: the best held-out FD-classifier after 3,000 prior steps
    # (three runs) and after 6,000 (scales 1.25, 1.5, 2.0). The tokenizers cool down over their last fifth: on held-out
    # images the last weights at a constant rate jitter (the background's level most), and a linear decay to 0 over the
    # last 200 of 1,200 steps improved FD-classifier in 5 of 6 paired runs, PSNR in all 6 (docs/studies.md, "A cooldown
    # for the tokenizer"). The tokenizers train at batch 8, four times the steps of batch 32 over the same images: on
    # held-out images 2,400 steps at 16 against 1,200 at 32 cut reconstruction FD-classifier from 1.68 / 1.66 / 2.18 to
    # 1.14 / 0.95 / 1.46 (VQGAN seeds 2, 3, 1) and from 4.66 to 2.92 (VQ-VAE), and 4,800 at 8 against 2,400 at 16 from
    # 1.11 / 0.94 / 1.47 to 0.84 / 0.79 / 1.24 (VQGAN seeds 2, 3, 1) and from 2.89 to 2.66 (VQ-VAE); a VQGAN step at 8
    # costs 0.58 of one at 16, so the fit gives the tokenizers a little more of the minutes (docs/studies.md, "The
    # tokenizer's batch size"). The priors train at batch 8 for 22,000 steps, the minutes of 6,000 at batch 32 (a
    # compiled step costs 48 against 175 ms): on held-out images, two seeds each, 10,900 steps at 8 against 3,000 at 32
    # cut sample FD-classifier from 1.42 / 1.42 to 1.30 / 1.30 and KID from 0.067 / 0.064 to 0.040 / 0.035
    # (docs/studies.md, "The prior's batch size").
    "standard": Budget(tokenizer_preset="small", tokenizer_steps=9600, tokenizer_batch=8, disc_start=3200,
                       prior_preset="small", prior_steps=22000, prior_batch=8, num_eval_samples=2000,
                       guidance_scale=1.5, prior_compile=True, tokenizer_lr_schedule="cooldown", train_minutes=34),
    # Sized for one GPU: the `base` presets and tens of thousands of steps (not run on CPU).
    "full": Budget(tokenizer_preset="base", tokenizer_steps=40000, tokenizer_batch=64, disc_start=10000,
                   prior_preset="base", prior_steps=40000, prior_batch=64, num_eval_samples=10000,
                   guidance_scale=2.0, prior_compile=True),
}
# Per-modality changes to a budget (text models are 1-D and far cheaper per step than image models).
MODALITY_CHANGES: dict[str, dict[str, dict]] = {"text": {
    # python-docs: the `small` text tokenizer (the `tiny` one has 64 codes for 2 bytes: too few to read back).
    "quick": dict(tokenizer_preset="small", tokenizer_steps=600, disc_start=200),
    # Text: 5,000 prior steps over 16 cuts of the training text (unlabelled text; held-out study on
    # tiny-shakespeare's validation split: 4.89 bits per code and samples at 1.14x the real 5-gram perplexity,
    # against 5.76 bits and 2.07x after 1,000 steps over one cut). Guidance 3: on SST-2's validation split it
    # raised sentiment agreement from 72.8% (guidance 2) to 79.4% for 2% more 5-gram perplexity (docs/studies.md, Text).
    # Fitted to the image budget's training minutes: on 2-core CPUs with AVX512-BF16 but no AMX these steps would
    # train for 51-52 minutes (README, Text).
    # Text tokenizers and priors keep batch 32, and the tokenizers the constant rate: the batch and cooldown studies
    # were on images only.
    "standard": dict(tokenizer_steps=3000, tokenizer_batch=32, disc_start=1000, prior_steps=5000, prior_batch=32,
                     prior_window_offsets=16, guidance_scale=3.0, tokenizer_lr_schedule="constant"),
}}
OVERRIDABLE = tuple(f.name for f in dataclasses.fields(Budget))


@dataclass
class CompareArguments:
    """`vqgen compare`: train VQ-VAE and VQGAN under one budget, a prior on each, and judge their samples."""

    dataset: str | None = field(default=None, metadata=described(
        "Hub name, local folder, or a built-in (default: digits for images, python-docs for text)"))
    modality: Literal["image", "text"] = "image"
    budget: Literal["quick", "standard", "full"] = "quick"
    budget_file: str | None = field(default=None, metadata=described(
        "a JSON object of budget fields over the named budget's (e.g. {\"prior_steps\": 2000})"))
    output_dir: str = "runs/compare"
    seed: int = field(default=0, metadata=described("the first seed; --seeds N uses seed, seed + 1, ..."))
    seeds: int = field(default=1, metadata=described(
        "train each variant this many times (seed-to-seed spread in the report; 1: not measured)"))
    class_conditional: bool | None = field(default=None, metadata=described(
        "class-conditional priors (default: when the data set has labels; --class-conditional false for none)",
        nargs="?", const=True))
    perceptual: Literal["lpips", "random-vgg", "none"] = field(default="random-vgg", metadata=described(
        "VQGAN perceptual loss network (lpips needs downloadable VGG16 weights)"))
    force: bool = field(default=False, metadata=described("retrain runs already present in --output-dir"))
    threads: int | None = field(default=None, metadata=described(
        "CPU threads for torch, here and in the training processes, shared by the runs that train at once "
        "(default: OMP_NUM_THREADS, else the cores other processes leave free)"))
    jobs: int | None = field(default=None, metadata=described(
        "training processes at once: 2 trains the two variants' tokenizers, then their priors, side by side, each on "
        "half the threads; 1 one after another (default: 2 where there are 2 or more threads)", choices=[1, 2]))
    # Budget overrides: None keeps the named budget's value.
    tokenizer_preset: str | None = field(default=None, metadata=described("", choices=sorted(TOKENIZER_PRESETS)))
    tokenizer_steps: int | None = None
    tokenizer_batch: int | None = None
    disc_start: int | None = None
    prior_preset: str | None = field(default=None, metadata=described("", choices=sorted(PRIOR_PRESETS)))
    prior_steps: int | None = None
    prior_batch: int | None = None
    num_eval_samples: int | None = None
    guidance_scale: float | None = None
    prior_compile: bool | None = field(default=None, metadata=described(
        "torch.compile the priors' training loss (default: the budget's; standard and full do)", nargs="?",
        const=True))
    prior_window_offsets: int | None = field(default=None, metadata=described(
        "unlabelled text: cuts of the training text for the priors (stage 2's --window-offsets)"))
    tokenizer_weight_ema: float | None = field(default=None, metadata=described(
        "the tokenizers keep an EMA of their weights with this decay and use it (stage 1's --weight-ema)"))
    tokenizer_lr_schedule: Literal["constant", "cosine", "cooldown"] | None = field(default=None, metadata=described(
        "the tokenizers' learning-rate schedule (stage 1's --lr-schedule; default: the budget's)"))
    train_minutes: float | None = field(default=None, metadata=described(
        "wall-clock target for all training; slower machines get proportionally fewer steps of both stages "
        "(0: run the budget's steps whatever they take)"))

    def __post_init__(self):
        check_positive(self, ("seeds", "threads"))
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if self.jobs not in (None, 1, 2):
            raise ValueError(f"--jobs must be 1 or 2 (the two variants' runs), got {self.jobs}")
        self.resolved_budget()  # a bad override (e.g. --tokenizer-steps 0) is refused before anything runs

    def thread_total(self) -> int:
        """The threads the training runs share: --threads, OMP_NUM_THREADS or the usable cores."""
        from stage1_tokenizer.threads import usable_cores, user_threads

        return self.threads or user_threads() or usable_cores()

    def resolved_jobs(self) -> int:
        """--jobs, or 2 where the threads (`thread_total`) can be halved."""
        return self.jobs or (2 if self.thread_total() >= 2 else 1)

    def overrides(self) -> dict:
        """Budget fields set by the user: the budget file's, then the command line's."""
        fields = {}
        if self.budget_file:
            fields.update(read_budget_file(self.budget_file))
        fields.update({name: getattr(self, name) for name in OVERRIDABLE if getattr(self, name) is not None})
        return fields

    def resolved_budget(self) -> Budget:
        """The named budget for this modality, with the user's overrides (each checked, e.g. steps >= 1)."""
        return budget_for(self.budget, self.modality, self.overrides())

    @property
    def seed_list(self) -> list[int]:
        return [self.seed + i for i in range(self.seeds)]


def read_budget_file(path: str) -> dict:
    try:
        fields = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--budget-file {path!r} does not exist") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"--budget-file {path!r} is not valid JSON: {error}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"--budget-file {path!r} must hold a JSON object of budget fields")
    unknown = sorted(set(fields) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(f"--budget-file {path!r} has unknown fields {unknown}; budget fields are {list(OVERRIDABLE)}")
    return fields


def budget_for(name: str, modality: str, overrides: dict | None = None) -> Budget:
    """BUDGETS[name] with the modality's changes, then `overrides` (validated by Budget)."""
    if name not in BUDGETS:
        raise ValueError(f"budget {name!r} is unknown; expected one of {list(BUDGETS)}")
    base = dataclasses.replace(BUDGETS[name], **MODALITY_CHANGES.get(modality, {}).get(name, {}))
    return dataclasses.replace(base, **(overrides or {}))


def tokenizer_arguments(budget: Budget, variant: str, dataset: str, modality: str, seed: int, perceptual: str,
                        output_dir: Path, threads: int | None) -> TokenizerTrainingArguments:
    """Stage-1 arguments of one variant under `budget`."""
    return TokenizerTrainingArguments(
        max_steps=budget.tokenizer_steps, output_dir=str(output_dir), dataset=dataset, modality=modality,
        variant=variant, preset=budget.tokenizer_preset, batch_size=budget.tokenizer_batch,
        disc_start=budget.disc_start, perceptual_backend=perceptual, seed=seed, threads=threads,
        weight_ema=budget.tokenizer_weight_ema, lr_schedule=budget.tokenizer_lr_schedule)


def prior_arguments(budget: Budget, tokenizer_dir: Path, dataset: str, seed: int, class_conditional: bool,
                    output_dir: Path, threads: int | None) -> PriorTrainingArguments:
    """Stage-2 arguments of one variant's prior under `budget`."""
    return PriorTrainingArguments(
        tokenizer=str(tokenizer_dir), max_steps=budget.prior_steps, output_dir=str(output_dir), dataset=dataset,
        preset=budget.prior_preset, batch_size=budget.prior_batch, class_conditional=class_conditional, seed=seed,
        compile=budget.prior_compile, window_offsets=budget.prior_window_offsets, threads=threads,
        eval_every=prior_eval_every(budget))


def prior_eval_every(budget: Budget) -> int:
    """How often the priors validate: the preset's interval, or rarer, so that no run validates more than
    PRIOR_VALIDATIONS times. Each validation scores the whole evaluation split (Fashion-MNIST's 10,000 test images:
    about 5 s on 2 cores), so a small-batch prior at the preset's every 500 steps would spend minutes on them."""
    preset_every = PRIOR_PRESETS[budget.prior_preset]["train"]["eval_every"]
    return max(preset_every, math.ceil(budget.prior_steps / PRIOR_VALIDATIONS))
