"""Train a VQ-VAE or VQGAN tokenizer: `accelerate launch -q -m stage1_tokenizer.train --dataset digits ...`."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from .arguments import TokenizerTrainingArguments, parse_arguments, read_config_fields, save_arguments
from .configuration import GAN_RECIPES, VQConfig
from .data import (
    DataError,
    ImageDataset,
    StepBatchSampler,
    evaluation_subset,
    load_split,
    text_dataset,
)
from .evaluation import reconstruction_metrics
from .losses import TokenizerObjective
from .modeling import VQModel
from .threads import rebalance_threads, set_torch_threads
from .train_utils import (
    LogWindow,
    MetricsLogger,
    NonFiniteGuard,
    catch_interrupts,
    check_compile_available,
    check_run_identity,
    checkpoint_module,
    claim_output_dir,
    fused_optimizer,
    mixed_precision_mode,
    reduce_logs,
    release_freed_memory,
    resume_checkpoint,
    run_cli,
    save_checkpoint,
    save_pretrained_atomic,
    tune_allocator,
    weight_ema,
)


def build_config(args, in_channels: int | None, class_names: list[str] | None) -> VQConfig:
    """VQConfig of --preset, then --gan-recipe's fields, --config's fields and the command line's overrides."""
    overrides = {"variant": args.variant, "modality": args.modality, "class_names": class_names}
    if in_channels is not None:
        overrides["in_channels"] = in_channels
    for field in ("perceptual_backend", "disc_start", "ema_decay", "codebook_size", "resolution"):
        if getattr(args, field) is not None:
            overrides[field] = getattr(args, field)
    recipe = GAN_RECIPES[args.gan_recipe] if args.gan_recipe else {}
    fields = read_config_fields(args.config) if args.config else {}
    return VQConfig.from_preset(args.preset, **{**recipe, **fields, **overrides})


def build_datasets(args, config: VQConfig, train_split):
    """Training and evaluation datasets for the modality (the train split is already loaded)."""
    eval_split = load_split(args.dataset, "eval", args.modality)
    if args.modality == "image":
        make = lambda split: ImageDataset(split, config.resolution, config.in_channels, args.skip_corrupt)
    else:
        make = lambda split: text_dataset(split, config.seq_len)
    return make(train_split), make(eval_split)


def infer_channels(split, skip_corrupt: bool = False) -> int:
    """1 for grey data sets, 3 for colour ones (from the first decodable record when skipping corrupt ones)."""
    from .data import decode_image

    for index in range(len(split)):
        try:
            image = decode_image(split.records[index][split.column], index)
        except DataError:
            if skip_corrupt:
                continue
            raise
        return 1 if image.mode in ("L", "1", "I", "I;16", "F") else 3
    raise DataError(f"every record of data set {split.name!r} is corrupt")


@torch.no_grad()
def save_reconstructions(model: VQModel, batch: torch.Tensor, path: Path) -> None:
    """Originals (top rows) over reconstructions (bottom rows) as one PNG grid, or a text file for text."""
    model.eval()
    out = model(batch).reconstruction.float()
    model.train()
    path.parent.mkdir(parents=True, exist_ok=True)
    if model.config.modality == "image":
        grid = make_grid(torch.cat([batch.cpu(), out.clamp(-1, 1).cpu()]), nrow=batch.shape[0], value_range=(-1, 1), normalize=True)
        save_image(grid, path)
    else:
        from .modeling_text import bytes_to_strings

        pairs = zip(bytes_to_strings(batch.cpu()), bytes_to_strings(out.argmax(1).cpu()))
        path.with_suffix(".txt").write_text("".join(f"REAL: {a!r}\nRECON: {b!r}\n\n" for a, b in pairs))


def hflip(images: torch.Tensor, step: int, seed: int) -> torch.Tensor:
    """Flip half the batch left-right, chosen by (seed, step) so a resumed run flips the same images."""
    flip = torch.rand(images.shape[0], generator=torch.Generator().manual_seed(seed * 7919 + step)) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1).to(images.device), images.flip(-1), images)


def compile_autoencoder(model: VQModel) -> None:
    """torch.compile the encoder and the decoder's trunk, in place (--compile)."""
    # The quantizer (data-dependent k-means init and code restarts) stays eager, and so does the decoder's
    # output conv: the adaptive GAN weight differentiates w.r.t. its weight, and a compiled backward cannot
    # stop there (it would rerun the whole decoder's backward for it).
    check_compile_available()
    decoder = getattr(model.decoder, "net", model.decoder)  # the text decoder wraps the conv decoder
    for module in (model.encoder, decoder.mid, decoder.up):
        module.compile()


def build_models(accelerator, config: VQConfig, learning_rate: float, disc_learning_rate: float,
                 compile_model: bool = False, betas: tuple[float, float] = (0.5, 0.9)):
    """Autoencoder, objective and Adam optimizers, prepared: (model, objective, wrapped_disc, (ae_opt, disc_opt)).
    `betas` are the autoencoder's Adam betas; the discriminator keeps taming's (0.5, 0.9)."""
    model = VQModel(config)
    if compile_model:
        compile_autoencoder(model)
    objective = TokenizerObjective(config).to(accelerator.device)
    release_freed_memory()
    ae_opt = torch.optim.Adam(model.parameters(), lr=learning_rate, betas=betas, **fused_optimizer(accelerator.device))
    disc = objective.discriminator
    if disc is None:
        model, ae_opt = accelerator.prepare(model, ae_opt)
        return model, objective, None, (ae_opt, None)
    disc_opt = torch.optim.Adam(disc.parameters(), lr=disc_learning_rate, betas=(0.5, 0.9),
                                **fused_optimizer(accelerator.device))
    model, ae_opt, wrapped_disc, disc_opt = accelerator.prepare(model, ae_opt, disc, disc_opt)
    return model, objective, wrapped_disc, (ae_opt, disc_opt)


def autoencoder_ema(model: VQModel, decay: float):
    """A weight EMA of `model` (--weight-ema), built from an uncompiled copy (--compile compiles submodules in
    place) without drawing from the global RNG, so a run trains the same with and without it."""
    with torch.random.fork_rng(devices=[]):
        copy = VQModel(model.config).to(model.device)
    copy.load_state_dict(model.state_dict())
    return weight_ema(copy, decay)


@torch.no_grad()
def averaged_autoencoder(ema, model: VQModel) -> VQModel:
    """The EMA's autoencoder, given `model`'s buffers (codebook statistics, usage counters: the average holds
    parameters only), ready to preview, evaluate or save."""
    live = dict(model.named_buffers())
    for name, buffer in ema.module.named_buffers():
        buffer.copy_(live[name])
    return ema.module


def learning_rate_factor(step: int, schedule: str, warmup_steps: int, decay_steps: int,
                         cooldown_steps: int | None = None) -> float:
    """The autoencoder's learning rate for the update at `step` (0-based), as a fraction of the peak.

    "constant": 1. "cosine": a linear warm-up over the first `warmup_steps` updates (the first one already at
    1 / warmup_steps), then a half cosine from 1 down to 0 at `decay_steps`, and 0 after it. "cooldown": the same
    warm-up, then 1 until the last `cooldown_steps` (default: a fifth) of `decay_steps`, over which it falls
    linearly to 0 (warm-up, stable, decay). A function of the step alone, so a resumed run continues the same
    schedule with nothing to checkpoint.
    """
    if schedule == "constant":
        return 1.0
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cooldown":
        cooldown = cooldown_steps or max(1, decay_steps // 5)
        return min(1.0, max(0.0, (decay_steps - step) / cooldown))
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def train_step(args, accelerator, model, objective, wrapped_disc, optimizers, batch, step, guard) -> dict | None:
    """One autoencoder update and, once the GAN is on, one discriminator update. None when skipped."""
    ae_opt, disc_opt = optimizers
    unwrapped = accelerator.unwrap_model(model)
    with accelerator.autocast():
        out = model(batch)
        # The generator pass uses the unwrapped, frozen discriminator: no DDP hooks, no wasted D grads.
        if objective.discriminator is not None:
            objective.discriminator.requires_grad_(False)
        loss, logs = objective.generator_loss(out.reconstruction, batch, out.quantizer_loss, step, unwrapped.last_layer)
    if not guard.check(loss):
        return None
    ae_opt.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(model.parameters(), args.grad_clip)
    ae_opt.step()
    logs.update(loss=loss.detach(), batch_perplexity=out.batch_perplexity.detach(), **out.usage)
    if objective.disc_active(step):
        objective.discriminator.requires_grad_(True)
        with accelerator.autocast():
            d_loss, d_logs = objective.discriminator_loss(out.reconstruction.detach(), batch, wrapped_disc)
        if guard.check(d_loss):
            disc_opt.zero_grad(set_to_none=True)
            accelerator.backward(d_loss)
            if args.disc_grad_clip:
                accelerator.clip_grad_norm_(objective.discriminator.parameters(), args.disc_grad_clip)
            disc_opt.step()
            logs.update(d_logs)
    return logs


def main(args: TokenizerTrainingArguments) -> None:
    args = args.resolved()
    tune_allocator()
    set_torch_threads(args.threads)
    accelerator = Accelerator(mixed_precision=mixed_precision_mode(args.mixed_precision), cpu=args.cpu)
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    claim_output_dir(output_dir, accelerator)  # a writable folder no other run uses
    train_split = load_split(args.dataset, "train", args.modality)
    in_channels = infer_channels(train_split, args.skip_corrupt) if args.modality == "image" else None
    config = build_config(args, in_channels, train_split.class_names)
    train_set, eval_set = build_datasets(args, config, train_split)
    skipped = {"train": getattr(train_set, "num_skipped", 0), "eval": getattr(eval_set, "num_skipped", 0)}
    if any(skipped.values()):
        accelerator.print(f"warning: --skip-corrupt skipped undecodable records: {skipped}")
    model, objective, wrapped_disc, (ae_opt, disc_opt) = build_models(
        accelerator, config, args.learning_rate, args.disc_learning_rate, args.compile,
        (args.adam_beta1, args.adam_beta2))
    unwrapped = accelerator.unwrap_model(model)
    ema = autoencoder_ema(unwrapped, args.weight_ema) if args.weight_ema else None
    if ema is not None:
        checkpoint_module(accelerator, ema, "weight_ema")
    # What previews, the evaluation and the saved model use: the EMA's weights with --weight-ema.
    evaluated = (lambda: averaged_autoencoder(ema, unwrapped)) if ema is not None else (lambda: unwrapped)

    step = 0
    checkpoint_dir = output_dir / "checkpoints"
    identity = {"dataset": args.dataset, **{k: v for k, v in config.to_dict().items()
                                            if k not in ("transformers_version", "_name_or_path")}}
    check_run_identity(output_dir, identity, args.resume, accelerator.is_main_process)
    logger = MetricsLogger(output_dir, accelerator.is_main_process)
    if args.resume:
        step, _ = resume_checkpoint(accelerator, checkpoint_dir)
        for group in ae_opt.param_groups:  # the loaded state brings its own betas; this run's apply, as its rates do
            group["betas"] = (args.adam_beta1, args.adam_beta2)
        logger.truncate_after(step)
        accelerator.print(f"resumed from step {step}")
    elif accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        logger.path.unlink(missing_ok=True)
    if accelerator.is_main_process:
        save_arguments(args, output_dir)

    sampler = StepBatchSampler(len(train_set), args.batch_size, args.seed, step,
                               accelerator.process_index, accelerator.num_processes)
    # Its own generator: iter(loader) draws a worker seed, which must not shift the global RNG that a
    # resumed run restores (dead-code restarts draw from it).
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=args.num_workers,
                                         pin_memory=torch.cuda.is_available(), persistent_workers=args.num_workers > 0,
                                         generator=torch.Generator().manual_seed(args.seed))
    fixed = torch.stack([eval_set[i][0] for i in evaluation_subset(len(eval_set), 8)]).to(accelerator.device)
    guard = NonFiniteGuard(args.max_nonfinite, accelerator)
    log_every, checkpoint_every, sample_every = args.log_every, args.checkpoint_every, args.sample_every
    model.train()
    progress = tqdm(total=args.max_steps, initial=step, disable=not accelerator.is_local_main_process,
                    desc=f"{config.variant} tokenizer", dynamic_ncols=True)
    tick, data_iter, window = time.time(), iter(loader), LogWindow()
    interrupts = catch_interrupts(accelerator, checkpoint_dir, args.keep_checkpoints, args.max_steps)
    while step < args.max_steps:
        images = next(data_iter)[0].to(accelerator.device, non_blocking=True)
        if args.hflip and config.modality == "image":
            images = hflip(images, step, args.seed)
        learning_rate = args.learning_rate * learning_rate_factor(step, args.lr_schedule, args.warmup_steps,
                                                                  args.decay_steps or args.max_steps,
                                                                  args.cooldown_steps)
        for group in ae_opt.param_groups:
            group["lr"] = learning_rate
        logs = train_step(args, accelerator, model, objective, wrapped_disc, (ae_opt, disc_opt), images, step, guard)
        if logs is not None:
            window.add(logs)
            if ema is not None:
                ema.update_parameters(unwrapped)
        step += 1
        rebalance_threads()
        progress.update(1)
        if guard.exhausted:
            save_checkpoint(accelerator, checkpoint_dir, step, args.keep_checkpoints)
            raise guard.stop(step, "lower the learning rate or check the data")
        if window and (step % log_every == 0 or step == args.max_steps):
            logs = reduce_logs(accelerator, window.mean())
            row = logger.log(step, {**logs, "lr": learning_rate, "step_time": (time.time() - tick) / log_every,
                                    "nonfinite_skipped": guard.total, "threads": torch.get_num_threads()})
            progress.set_postfix(loss=f"{row['loss']:.4f}", usage=f"{row['codebook_usage']:.0f}%")
            tick = time.time()
        if step % sample_every == 0 and accelerator.is_main_process:
            save_reconstructions(evaluated(), fixed, output_dir / "samples" / f"step_{step:07d}.png")
        if step % checkpoint_every == 0 and step < args.max_steps:
            save_checkpoint(accelerator, checkpoint_dir, step, args.keep_checkpoints)
        interrupts.check(step)  # Ctrl-C / SIGTERM: checkpoint and stop
    progress.close()
    save_checkpoint(accelerator, checkpoint_dir, step, args.keep_checkpoints)
    if accelerator.is_main_process:
        final = evaluated()
        save_pretrained_atomic(final, output_dir)
        save_reconstructions(final, fixed, output_dir / "samples" / f"step_{step:07d}.png")
        metrics = reconstruction_metrics(final, eval_set, max_items=args.max_eval_items)
        summary = {"num_examples": metrics.pop("num_items"), **{f"test_{k}": v for k, v in metrics.items()}}
        if ema is not None:  # the trained weights themselves, for comparison
            raw = reconstruction_metrics(unwrapped, eval_set, max_items=args.max_eval_items)
            summary.update(weight_ema=args.weight_ema, without_weight_ema={
                f"test_{k}": v for k, v in raw.items() if k != "num_items"})
        if args.skip_corrupt:
            summary["skipped_corrupt_records"] = skipped
        (output_dir / "eval_results.json").write_text(json.dumps(summary, indent=2))
        accelerator.print(json.dumps(summary))
    logger.close()
    accelerator.end_training()


def parse_args(argv: list[str] | None = None) -> TokenizerTrainingArguments:
    """Command-line flags, or one JSON file of fields, as TokenizerTrainingArguments."""
    return parse_arguments(TokenizerTrainingArguments, argv, description=__doc__)


def cli(argv: list[str] | None = None) -> None:
    """Entry point: argument errors and bad input end in a one-line message and exit status 2."""
    run_cli(main, parse_args(argv))


if __name__ == "__main__":
    cli()
