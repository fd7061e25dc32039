"""Fit a budget's step counts to a wall-clock target on the machine at hand.

The same step counts take 22 minutes on a CPU with native bf16 and about an hour on one without. A budget with
`train_minutes` therefore times a few training steps of each stage here, on random inputs of the real shapes
(the two tokenizers with their full objectives, the VQGAN's with its GAN term on; the prior), predicts the
training time of the budget, and when that exceeds the target scales the tokenizer's and the prior's steps by
one factor (and `disc_start` with the tokenizer's). Both variants keep the same steps, so the comparison stays
fair; a machine fast enough keeps the budget as it is. Step counts given explicitly are never changed.

The first timing sees a few seconds of a machine whose speed may drift, so once both tokenizers have trained,
`vqgen compare` times the prior's step again and `refit_prior_steps` fits both priors' steps to the minutes left.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch

from stage1_tokenizer.configuration import VQConfig
from stage1_tokenizer.losses import TokenizerObjective
from stage1_tokenizer.modeling import VQModel
from stage1_tokenizer.precision import fast_autocast
from stage2_prior.modeling import TokenLayout, build_prior, training_attention

from .budgets import Budget

# What a training run costs beyond the probe's steps (data loading, logging, checkpoints, previews and evaluations,
# the prior's code cache, each process's start). The standard compare on the bf16 machine trained in 1.11x the
# probe's prediction with batch-32 priors (30.7 min against 27.7; docs/studies.md, the Fashion-MNIST runs), and in
# 1.29x with batch-8 priors and tokenizers (38.0 min against 29.4: a batch-8 step leaves more to the loop around it,
# 56 ms in training against the probe's 48 for the prior, 72 against 56 for the VQ-VAE), so the fit prices that.
OVERHEAD = 1.3
# The priors alone, timed again just before they train (refit_prior_steps): two Fashion-MNIST runs' priors trained in
# 1.28x and 1.11x their first probe's prediction (compilation, validations, the code cache and the loop around the
# steps; docs/studies.md). Timed again at 1.2x, they took 21.8 of 22.1 predicted minutes (Fashion-MNIST) and 20.2 of
# 20.8 (MNIST).
PRIOR_OVERHEAD = 1.2
STEP_ROUNDING = 50  # fitted step counts are multiples of this


@dataclass(frozen=True)
class StepSeconds:
    """Seconds per training step of each job, measured by `probe_step_seconds`."""

    vqvae: float
    vqgan: float
    prior: float
    prior_compile: float = 0.0  # seconds of torch.compile, paid once by each prior (budget.prior_compile)


def fastest(a: StepSeconds, b: StepSeconds) -> StepSeconds:
    """Each job's faster timing of two probes (another process only ever slows a step down)."""
    return StepSeconds(**{f.name: min(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)})


def predicted_training_seconds(budget: Budget, seconds: StepSeconds, overhead: float = OVERHEAD) -> float:
    """Both tokenizers, then a prior on each (the VQGAN's steps all priced as GAN steps: an upper bound), plus each
    prior's compilation."""
    steps = budget.tokenizer_steps * (seconds.vqvae + seconds.vqgan) + 2 * budget.prior_steps * seconds.prior
    return overhead * steps + 2 * seconds.prior_compile


def _round_steps(steps: float) -> int:
    return max(STEP_ROUNDING, int(steps / STEP_ROUNDING + 1e-9) * STEP_ROUNDING)  # (600 stays 600 after rounding error)


def fit_budget(budget: Budget, seconds: StepSeconds, overhead: float = OVERHEAD) -> tuple[Budget, dict]:
    """`budget` with its steps scaled to fit `budget.train_minutes` (unchanged when it fits), and what was done."""
    predicted = predicted_training_seconds(budget, seconds, overhead)
    target = budget.train_minutes * 60
    info = {"target_minutes": budget.train_minutes, "predicted_minutes": predicted / 60,
            "step_seconds": dataclasses.asdict(seconds), "scale": 1.0}
    if predicted <= target:
        return budget, info
    fixed = 2 * seconds.prior_compile  # does not shrink with the steps
    scale = max(target - fixed, 0.0) / (predicted - fixed)
    tokenizer_steps = _round_steps(budget.tokenizer_steps * scale)
    fitted = dataclasses.replace(
        budget, tokenizer_steps=tokenizer_steps, prior_steps=_round_steps(budget.prior_steps * scale),
        disc_start=round(budget.disc_start * tokenizer_steps / budget.tokenizer_steps))
    info.update(scale=scale, fitted_minutes=predicted_training_seconds(fitted, seconds, overhead) / 60)
    return fitted, info


def refit_prior_steps(budget: Budget, most_steps: int, seconds_left: float, prior: float, prior_compile: float,
                      overhead: float = PRIOR_OVERHEAD) -> tuple[Budget, dict]:
    """`budget` with its priors' steps fitted to the `seconds_left` of the time target after the tokenizers trained,
    at `prior` seconds per step timed then: the whole run keeps to its target however fast the machine ran meanwhile.
    At most `most_steps` (the budget's own), at least half the first fit's (a prior needs some steps to be compared
    at all; the note then says the target is overrun)."""
    fitted_steps = max(0.0, seconds_left - 2 * prior_compile) / (2 * overhead * prior)
    floor = _round_steps(budget.prior_steps / 2)
    steps = min(most_steps, max(floor, _round_steps(fitted_steps)))
    info = {"seconds_left": seconds_left, "prior_step_seconds": prior, "prior_compile_seconds": prior_compile,
            "first_fit_prior_steps": budget.prior_steps, "prior_steps": steps,
            "predicted_minutes": (2 * prior_compile + 2 * overhead * prior * steps) / 60, "at_floor": steps == floor}
    return dataclasses.replace(budget, prior_steps=steps), info


def describe_refit(info: dict) -> str:
    """One line for the log and the report's settings."""
    line = (f"priors timed again after the tokenizers ({info['seconds_left'] / 60:.1f} min of the target left, "
            f"{1000 * info['prior_step_seconds']:.0f} ms per step): {info['first_fit_prior_steps']} -> "
            f"{info['prior_steps']} steps")
    if info["at_floor"]:
        line += (f" (half the first fit, the least a prior gets: their {info['predicted_minutes']:.0f} min predicted "
                 f"overrun the target)")
    return line


def describe_fit(budget: Budget, fitted: Budget, info: dict) -> str:
    """One line for the log and the report's settings."""
    if fitted == budget:
        return (f"fits: {info['predicted_minutes']:.0f} min predicted for a target of "
                f"{info['target_minutes']:.0f} min; steps as budgeted")
    return (f"scaled by {info['scale']:.2f} to fit {info['target_minutes']:.0f} min ({info['predicted_minutes']:.0f} "
            f"min predicted as budgeted): tokenizer {budget.tokenizer_steps} -> {fitted.tokenizer_steps} steps "
            f"(GAN from {fitted.disc_start}), prior {budget.prior_steps} -> {fitted.prior_steps} steps")


def _time_steps(step, warmup: int, steps: int) -> tuple[float, float]:
    """(median seconds of `steps` calls of step(i), seconds of the `warmup` calls before them)."""
    start = time.perf_counter()
    for i in range(warmup):
        step(i)
    warm = time.perf_counter() - start
    times = []
    for i in range(warmup, warmup + steps):
        start = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], warm


def _tokenizer_step_seconds(config: VQConfig, batch_size: int, warmup: int, steps: int) -> float:
    """Seconds per step of the tokenizer's update (and, for a VQGAN, its discriminator's), as training runs it."""
    model, objective = VQModel(config), TokenizerObjective(config)
    ae_opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.5, 0.9))
    disc = objective.discriminator
    disc_opt = torch.optim.Adam(disc.parameters(), lr=1e-4, betas=(0.5, 0.9)) if disc is not None else None
    generator = torch.Generator().manual_seed(0)
    if config.modality == "image":
        shape = (batch_size, config.in_channels, config.resolution, config.resolution)
        batch = torch.rand(shape, generator=generator) * 2 - 1
    else:
        batch = torch.randint(0, 256, (batch_size, config.seq_len), generator=generator)

    def step(i: int) -> None:
        with fast_autocast("cpu"):
            out = model(batch)
            if disc is not None:
                disc.requires_grad_(False)
            loss, _ = objective.generator_loss(out.reconstruction, batch, out.quantizer_loss, i, model.last_layer)
        ae_opt.zero_grad(set_to_none=True)
        loss.backward()
        ae_opt.step()
        if disc is not None:
            disc.requires_grad_(True)
            with fast_autocast("cpu"):
                d_loss, _ = objective.discriminator_loss(out.reconstruction.detach(), batch)
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_opt.step()

    return _time_steps(step, warmup, steps)[0]


def probe_prior_seconds(budget: Budget, modality: str, in_channels: int, num_classes: int, warmup: int = 3,
                        steps: int = 8) -> tuple[float, float]:
    """(seconds per step of `budget`'s prior on this machine, seconds of its compilation: the warm-up's excess over
    its steps' time)."""
    from stage2_prior.train import code_loss

    config = VQConfig.from_preset(budget.tokenizer_preset, variant="vqvae", modality=modality, in_channels=in_channels)
    num_codes = math.prod(config.latent_shape)
    layout = TokenLayout(config.codebook_size, num_classes, num_codes)
    prior = build_prior(budget.prior_preset, layout, attn_implementation=training_attention(torch.device("cpu")))
    optimizer = torch.optim.AdamW(prior.parameters(), lr=1e-4, betas=(0.9, 0.95))
    sequence = torch.randint(0, config.codebook_size, (budget.prior_batch, num_codes + 1),
                             generator=torch.Generator().manual_seed(0))
    compiled = budget.prior_compile
    loss_fn = torch.compile(code_loss) if compiled else code_loss

    def step(i: int) -> None:
        with fast_autocast("cpu"):
            loss = loss_fn(prior, sequence)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds, warm = _time_steps(step, warmup, steps)
    return seconds, max(warm - warmup * seconds, 0.0) if compiled else 0.0


def probe_step_seconds(budget: Budget, modality: str, in_channels: int, num_classes: int, perceptual: str,
                       warmup: int = 3, steps: int = 8) -> StepSeconds:
    """Time `steps` training steps of each job of `budget` on this machine (after `warmup` untimed ones)."""
    def config(variant: str) -> VQConfig:
        return VQConfig.from_preset(budget.tokenizer_preset, variant=variant, modality=modality,
                                    in_channels=in_channels, perceptual_backend=perceptual, disc_start=0)

    torch.manual_seed(0)
    prior, prior_compile = probe_prior_seconds(budget, modality, in_channels, num_classes, warmup, steps)
    return StepSeconds(vqvae=_tokenizer_step_seconds(config("vqvae"), budget.tokenizer_batch, warmup, steps),
                       vqgan=_tokenizer_step_seconds(config("vqgan"), budget.tokenizer_batch, warmup, steps),
                       prior=prior, prior_compile=prior_compile)
