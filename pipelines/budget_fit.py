"""Fit a budget's step counts to a wall-clock target on the machine at hand.

The same step counts take 22 minutes on a CPU with native bf16 and about an hour on one without. A budget with
`train_minutes` therefore times a few training steps of each stage here, on random inputs of the real shapes
(the two tokenizers with their full objectives, the VQGAN's with its GAN term on; the prior), predicts the
training time of the budget, and when that exceeds the target scales the tokenizer's and the prior's steps by
one factor (and `disc_start` with the tokenizer's). Both variants keep the same steps, so the comparison stays
fair; a machine fast enough keeps the budget as it is. Step counts given explicitly are never changed.

The first timing sees a few seconds of a machine whose speed may drift, so once both tokenizers have trained,
`vqgen compare` times the prior's step again and `refit_prior_steps` fits both priors' steps to the minutes left.

`vqgen compare` trains the two variants side by side, each process on half the cores (`--jobs 2`, its default where
two or more are free): a batch-8 step leaves much of its time to serial work around the kernels, which a second
process overlaps. So the fit also times each stage's two jobs at once, in two processes started together
(`probe_together`), and prices the tokenizers' stage as both at once until the faster finishes, then the slower
alone at all threads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
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
# Side by side, the Fashion-MNIST tokenizers trained in 1.25x the probe's prediction (12.5 min against 10.0).
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
    # Each job's step while its stage's other job runs beside it, each on half the threads (probe_together); None:
    # the jobs run one after another.
    vqvae_together: float | None = None
    vqgan_together: float | None = None
    prior_together: float | None = None

    @property
    def together(self) -> bool:
        return self.prior_together is not None


def fastest(a: StepSeconds, b: StepSeconds) -> StepSeconds:
    """Each job's faster timing of two probes (another process only ever slows a step down)."""
    def faster(x, y):
        return x if y is None else y if x is None else min(x, y)

    return StepSeconds(**{f.name: faster(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)})


def side_by_side_seconds(steps: int, fast_together: float, slow_together: float, slow_alone: float) -> float:
    """Two jobs of `steps` steps started together: both run at their side-by-side speeds until the faster ends,
    then the slower finishes alone at `slow_alone` seconds per step."""
    fast_together, slow_together = sorted((fast_together, slow_together))
    return steps * (fast_together + (1 - fast_together / slow_together) * slow_alone)


def predicted_training_seconds(budget: Budget, seconds: StepSeconds, overhead: float = OVERHEAD) -> float:
    """Both tokenizers, then a prior on each (the VQGAN's steps all priced as GAN steps: an upper bound), plus the
    priors' compilation: one after another, or each stage's two jobs side by side when `seconds` was timed so."""
    if not seconds.together:
        steps = budget.tokenizer_steps * (seconds.vqvae + seconds.vqgan) + 2 * budget.prior_steps * seconds.prior
        return overhead * steps + 2 * seconds.prior_compile
    slower_alone = seconds.vqgan if seconds.vqgan_together >= seconds.vqvae_together else seconds.vqvae
    tokenizers = side_by_side_seconds(budget.tokenizer_steps, seconds.vqvae_together, seconds.vqgan_together,
                                      slower_alone)
    return overhead * (tokenizers + budget.prior_steps * seconds.prior_together) + seconds.prior_compile


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
    fixed = (1 if seconds.together else 2) * seconds.prior_compile  # does not shrink with the steps
    scale = max(target - fixed, 0.0) / (predicted - fixed)
    tokenizer_steps = _round_steps(budget.tokenizer_steps * scale)
    fitted = dataclasses.replace(
        budget, tokenizer_steps=tokenizer_steps, prior_steps=_round_steps(budget.prior_steps * scale),
        disc_start=round(budget.disc_start * tokenizer_steps / budget.tokenizer_steps))
    info.update(scale=scale, fitted_minutes=predicted_training_seconds(fitted, seconds, overhead) / 60)
    return fitted, info


def refit_prior_steps(budget: Budget, most_steps: int, seconds_left: float, prior: float, prior_compile: float,
                      overhead: float = PRIOR_OVERHEAD, jobs: int = 1) -> tuple[Budget, dict]:
    """`budget` with its priors' steps fitted to the `seconds_left` of the time target after the tokenizers trained,
    at `prior` seconds per step timed then (with `jobs` 2, each prior's step beside the other's, as they will train):
    the whole run keeps to its target however fast the machine ran meanwhile. At most `most_steps` (the budget's
    own), at least half the first fit's (a prior needs some steps to be compared at all; the note then says the
    target is overrun)."""
    rounds = 2 // jobs  # the two priors train in two rounds, or in one side by side
    fitted_steps = max(0.0, seconds_left - rounds * prior_compile) / (rounds * overhead * prior)
    floor = _round_steps(budget.prior_steps / 2)
    steps = min(most_steps, max(floor, _round_steps(fitted_steps)))
    info = {"seconds_left": seconds_left, "prior_step_seconds": prior, "prior_compile_seconds": prior_compile,
            "jobs": jobs, "first_fit_prior_steps": budget.prior_steps, "prior_steps": steps,
            "predicted_minutes": rounds * (prior_compile + overhead * prior * steps) / 60, "at_floor": steps == floor}
    return dataclasses.replace(budget, prior_steps=steps), info


def describe_refit(info: dict) -> str:
    """One line for the log and the report's settings."""
    beside = " beside each other" if info.get("jobs", 1) == 2 else ""
    line = (f"priors timed again after the tokenizers ({info['seconds_left'] / 60:.1f} min of the target left, "
            f"{1000 * info['prior_step_seconds']:.0f} ms per step{beside}): {info['first_fit_prior_steps']} -> "
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


def _tokenizer_step(config: VQConfig, batch_size: int):
    """One training step of the tokenizer's update (and, for a VQGAN, its discriminator's), as training runs it, on
    a fixed random batch."""
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

    return step


def _prior_step(budget: Budget, modality: str, in_channels: int, num_classes: int):
    """One training step of `budget`'s prior (its loss compiled when the budget compiles it), on a fixed batch."""
    from stage2_prior.train import code_loss

    config = VQConfig.from_preset(budget.tokenizer_preset, variant="vqvae", modality=modality, in_channels=in_channels)
    num_codes = math.prod(config.latent_shape)
    layout = TokenLayout(config.codebook_size, num_classes, num_codes)
    prior = build_prior(budget.prior_preset, layout, attn_implementation=training_attention(torch.device("cpu")))
    optimizer = torch.optim.AdamW(prior.parameters(), lr=1e-4, betas=(0.9, 0.95))
    sequence = torch.randint(0, config.codebook_size, (budget.prior_batch, num_codes + 1),
                             generator=torch.Generator().manual_seed(0))
    loss_fn = torch.compile(code_loss) if budget.prior_compile else code_loss

    def step(i: int) -> None:
        with fast_autocast("cpu"):
            loss = loss_fn(prior, sequence)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _tokenizer_config(budget: Budget, variant: str, modality: str, in_channels: int, perceptual: str) -> VQConfig:
    """The config a probe times: the budget's preset with the GAN term on from the first step."""
    return VQConfig.from_preset(budget.tokenizer_preset, variant=variant, modality=modality, in_channels=in_channels,
                                perceptual_backend=perceptual, disc_start=0)


def probe_prior_seconds(budget: Budget, modality: str, in_channels: int, num_classes: int, warmup: int = 3,
                        steps: int = 8) -> tuple[float, float]:
    """(seconds per step of `budget`'s prior on this machine, seconds of its compilation: the warm-up's excess over
    its steps' time)."""
    seconds, warm = _time_steps(_prior_step(budget, modality, in_channels, num_classes), warmup, steps)
    return seconds, max(warm - warmup * seconds, 0.0) if budget.prior_compile else 0.0


def _probe_worker(spec: dict) -> None:
    """A side-by-side timing's process (`python -m pipelines.budget_fit SPEC`): warm up one job's step, say "ready",
    wait for "go" on stdin (sent once every job is ready), time steps over the spec's windows of its seconds each,
    print the fastest window's median (this VM has moments of a few seconds at 1.5x its usual step time)."""
    budget = Budget(**spec["budget"])
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    if spec["job"] == "prior":
        step = _prior_step(budget, spec["modality"], spec["in_channels"], spec["num_classes"])
    else:
        config = _tokenizer_config(budget, spec["job"], spec["modality"], spec["in_channels"], spec["perceptual"])
        step = _tokenizer_step(config, budget.tokenizer_batch)
    for i in range(spec["warmup"]):
        step(i)
    print("ready", flush=True)
    sys.stdin.readline()
    medians, i = [], spec["warmup"]
    for _ in range(spec["windows"]):
        times, end = [], time.perf_counter() + spec["seconds"]
        while time.perf_counter() < end or len(times) < 3:
            start = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - start)
            i += 1
        medians.append(sorted(times)[len(times) // 2])
    print(json.dumps({"seconds": min(medians)}), flush=True)


def probe_together(jobs: tuple[str, str], budget: Budget, modality: str, in_channels: int, num_classes: int,
                   perceptual: str, threads: int, warmup: int = 3, seconds: float = 2.0,
                   windows: int = 3) -> list[float]:
    """Seconds per step of each of `jobs` ("vqvae", "vqgan" or "prior") while both run at once, each in a fresh
    process on `threads` threads, timed over the same `windows` x `seconds` after their warm-ups (each job's
    fastest window counts): the cores are shared as the training processes will share them (memory bandwidth,
    caches, SMT siblings)."""
    spec = dict(budget=dataclasses.asdict(budget), modality=modality, in_channels=in_channels,
                num_classes=num_classes, perceptual=perceptual, threads=threads, warmup=warmup, seconds=seconds,
                windows=windows)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    processes = [subprocess.Popen([sys.executable, "-m", "pipelines.budget_fit", json.dumps({**spec, "job": job})],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env) for job in jobs]
    try:
        for process in processes:
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError(f"timing the training steps side by side failed:\n{process.communicate()[1]}")
        for process in processes:
            process.stdin.write("go\n")
            process.stdin.flush()
        answers = []
        for process in processes:
            out, err = process.communicate()
            if process.returncode != 0:
                raise RuntimeError(f"timing the training steps side by side failed:\n{err}")
            answers.append(json.loads(out)["seconds"])
        return answers
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def probe_step_seconds(budget: Budget, modality: str, in_channels: int, num_classes: int, perceptual: str,
                       warmup: int = 3, steps: int = 8, together_threads: int | None = None) -> StepSeconds:
    """Time `steps` training steps of each job of `budget` on this machine (after `warmup` untimed ones); with
    `together_threads`, also each stage's two jobs side by side, each on that many threads (`probe_together`)."""
    torch.manual_seed(0)
    prior, prior_compile = probe_prior_seconds(budget, modality, in_channels, num_classes, warmup, steps)
    alone = {variant: _time_steps(_tokenizer_step(_tokenizer_config(budget, variant, modality, in_channels,
                                                                    perceptual), budget.tokenizer_batch),
                                  warmup, steps)[0] for variant in ("vqvae", "vqgan")}
    together = {}
    if together_threads is not None:
        shared = (budget, modality, in_channels, num_classes, perceptual, together_threads, warmup)
        together["vqvae_together"], together["vqgan_together"] = probe_together(("vqvae", "vqgan"), *shared)
        together["prior_together"] = max(probe_together(("prior", "prior"), *shared))
    return StepSeconds(**alone, prior=prior, prior_compile=prior_compile, **together)


if __name__ == "__main__":
    _probe_worker(json.loads(sys.argv[1]))
