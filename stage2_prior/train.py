"""Train the GPT-style prior over a tokenizer's codes: `accelerate launch -m stage2_prior.train --tokenizer DIR ...`."""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from stage1_tokenizer.data import BUILTIN_DATASETS, DataError, StepBatchSampler
from stage1_tokenizer.modeling import VQModel
from stage1_tokenizer.threads import rebalance_threads, set_torch_threads
from stage1_tokenizer.train_utils import (
    MetricsLogger, NonFiniteGuard, check_compile_available, check_run_identity, file_sha256, mixed_precision_mode,
    resume_checkpoint, run_cli, save_checkpoint, tune_allocator,
)

from .folder import SAMPLE_GRID, sample_preview, save_metadata, save_weights
from .modeling import PRIOR_PRESETS, TokenLayout, build_prior
from .tokenize_dataset import build_code_cache, codes_tensor


def sequence_batch(layout: TokenLayout, codes: torch.Tensor, labels: torch.Tensor, label_dropout: float,
                   step: int, seed: int, conditional: bool) -> torch.Tensor:
    """[condition token] + codes, with labels dropped to the null class with prob. `label_dropout`."""
    if conditional:
        drop = torch.rand(labels.shape, generator=torch.Generator().manual_seed(seed * 7907 + step)) < label_dropout
        labels = torch.where(drop.to(labels.device), torch.full_like(labels, -1), labels)
    first = layout.condition_tokens(labels if conditional else None, codes.shape[0]).to(codes.device)
    return torch.cat([first.unsqueeze(1), codes], dim=1)  # (B, 1 + num_codes)


def code_loss(prior, sequence: torch.Tensor) -> torch.Tensor:
    """Mean next-code cross-entropy (nats): the last input token is never fed."""
    logits = prior(input_ids=sequence[:, :-1]).logits  # (B, num_codes, V)
    return F.cross_entropy(logits.float().flatten(0, 1), sequence[:, 1:].flatten())


@torch.no_grad()
def validation_loss(accelerator, prior, layout, codes, labels, conditional, batch_size: int = 256) -> dict:
    """Per-code NLL (nats) and bits per code on the evaluation split, with the true labels."""
    prior.eval()
    total, count = 0.0, 0
    for start in range(0, len(codes), batch_size):
        batch = codes[start : start + batch_size].to(accelerator.device)
        first = layout.condition_tokens(labels[start : start + batch_size] if conditional else None, len(batch))
        sequence = torch.cat([first.to(batch.device).unsqueeze(1), batch], dim=1)
        with accelerator.autocast():
            total += float(code_loss(prior, sequence)) * len(batch)
        count += len(batch)
    prior.train()
    nll = total / max(count, 1)
    return {"val_nll": nll, "val_bits_per_code": nll / math.log(2)}


def main(args: argparse.Namespace) -> None:
    tune_allocator()
    set_torch_threads(args.threads)
    accelerator = Accelerator(mixed_precision=mixed_precision_mode(args.mixed_precision), cpu=args.cpu)
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    tokenizer = VQModel.from_pretrained(args.tokenizer).to(accelerator.device).eval()
    with accelerator.main_process_first():
        train_codes, class_names, _ = build_code_cache(tokenizer, args.dataset, "train", args.cache_dir)
        eval_codes, _, _ = build_code_cache(tokenizer, args.dataset, "eval", args.cache_dir)
    if args.class_conditional and not class_names:
        raise DataError(f"--class-conditional needs a labelled data set; {args.dataset!r} has no 'label' column")
    conditional = bool(args.class_conditional)
    train_x, train_y = codes_tensor(train_codes)
    eval_x, eval_y = codes_tensor(eval_codes)
    if len(eval_x) > args.max_eval_items:
        eval_x, eval_y = eval_x[: args.max_eval_items], eval_y[: args.max_eval_items]
    layout = TokenLayout(tokenizer.config.codebook_size, len(class_names) if conditional else 0, train_x.shape[1])

    defaults = PRIOR_PRESETS[args.preset]["train"]
    batch_size = args.batch_size or defaults["batch_size"]
    prior = build_prior(args.preset, layout)
    optimizer = torch.optim.AdamW(prior.parameters(), lr=args.learning_rate or defaults["learning_rate"],
                                  betas=(0.9, 0.95), weight_decay=args.weight_decay)
    # The cosine spans --decay-steps (default --max-steps); fix it to extend a run later bit-identically.
    decay_steps = args.decay_steps or args.max_steps
    warmup = min(args.warmup_steps if args.warmup_steps is not None else defaults["warmup_steps"], decay_steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, decay_steps)
    prior, optimizer, scheduler = accelerator.prepare(prior, optimizer, scheduler)
    train_loss = code_loss
    if args.compile:  # the training loss only: sampling and validation vary their shapes, and stay eager
        check_compile_available()
        train_loss = torch.compile(code_loss)

    step = 0
    identity = {"dataset": args.dataset, "preset": args.preset, "class_conditional": conditional,
                "tokenizer_sha256": file_sha256(Path(args.tokenizer) / "model.safetensors"), "layout": dataclasses.asdict(layout)}
    check_run_identity(output_dir, identity, args.resume, accelerator.is_main_process)
    logger = MetricsLogger(output_dir, accelerator.is_main_process)
    checkpoint_dir = output_dir / "checkpoints"
    if args.resume:
        step, _ = resume_checkpoint(accelerator, checkpoint_dir)
        logger.truncate_after(step)
        accelerator.print(f"resumed from step {step}")
    elif accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        logger.path.unlink(missing_ok=True)

    sampler = iter(StepBatchSampler(len(train_x), batch_size, args.seed, step,
                                    accelerator.process_index, accelerator.num_processes))
    guard = NonFiniteGuard(args.max_nonfinite, accelerator)
    every = {k: getattr(args, k) or defaults[k] for k in ("log_every", "eval_every", "sample_every", "checkpoint_every")}
    unwrapped = accelerator.unwrap_model(prior)
    class_names = class_names if conditional else None
    metadata = {"dataset": args.dataset, "prior_preset": args.preset, "train_steps": args.max_steps, "seed": args.seed}
    progress = tqdm(total=args.max_steps, initial=step, disable=not accelerator.is_local_main_process,
                    desc="prior", dynamic_ncols=True)
    prior.train()
    tick = time.time()
    while step < args.max_steps:
        index = torch.tensor(next(sampler))
        sequence = sequence_batch(layout, train_x[index], train_y[index], args.label_dropout, step, args.seed,
                                  conditional).to(accelerator.device)
        with accelerator.autocast():
            loss = train_loss(prior, sequence)
        if guard.check(loss):
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(prior.parameters(), args.grad_clip)
            optimizer.step()
        scheduler.step()
        step += 1
        rebalance_threads()
        progress.update(1)
        if guard.exhausted:
            save_checkpoint(accelerator, checkpoint_dir, step, args.keep_checkpoints)
            raise guard.stop(step, "lower the learning rate")
        row = {}
        if step % every["eval_every"] == 0 or step == args.max_steps:
            row.update(validation_loss(accelerator, prior, layout, eval_x, eval_y, conditional))
        if step % every["log_every"] == 0 or row:
            loss_value = accelerator.reduce(loss.detach(), reduction="mean")
            row = logger.log(step, {"loss": loss_value, "bits_per_code": loss_value / math.log(2),
                                    "lr": scheduler.get_last_lr()[0], "nonfinite_skipped": guard.total,
                                    "step_time": (time.time() - tick) / every["log_every"], **row})
            progress.set_postfix(loss=f"{row['loss']:.3f}")
            tick = time.time()
        if step % every["sample_every"] == 0 and accelerator.is_main_process:
            sample_preview(tokenizer, unwrapped, layout, output_dir / "samples" / f"step_{step:07d}.png", args.seed)
        if step % every["checkpoint_every"] == 0 and step < args.max_steps:
            save_checkpoint(accelerator, checkpoint_dir, step, args.keep_checkpoints)
    progress.close()
    save_checkpoint(accelerator, checkpoint_dir, step, args.keep_checkpoints)
    if accelerator.is_main_process:
        final = validation_loss(accelerator, prior, layout, eval_x, eval_y, conditional)
        metadata["prior_metrics"] = final
        save_weights(output_dir, tokenizer, unwrapped)
        preview = sample_preview(tokenizer, unwrapped, layout, output_dir / "samples" / f"step_{step:07d}.png", args.seed)
        if preview.suffix == ".png":
            shutil.copyfile(preview, output_dir / SAMPLE_GRID)
        save_metadata(output_dir, tokenizer, layout, class_names, metadata)
        accelerator.print(f"validation: {final['val_nll']:.4f} nats/code, {final['val_bits_per_code']:.4f} bits/code")
    logger.close()
    accelerator.end_training()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokenizer", required=True, help="folder of a trained stage-1 tokenizer")
    parser.add_argument("--dataset", default="digits", help=f"Hub name, local folder, or a built-in: {BUILTIN_DATASETS}")
    parser.add_argument("--preset", choices=sorted(PRIOR_PRESETS), default="tiny")
    parser.add_argument("--max-steps", type=int, required=True)
    parser.add_argument("--output-dir", required=True, help="becomes a complete pipeline folder")
    parser.add_argument("--class-conditional", action="store_true", help="condition on the data set's labels")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--warmup-steps", type=int)
    parser.add_argument("--decay-steps", type=int,
                        help="length of the cosine learning-rate decay (default: --max-steps); set it when a run "
                             "will be extended with --resume so the schedule does not depend on --max-steps")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--label-dropout", type=float, default=0.1, help="probability of the null class (for CFG)")
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--cache-dir", type=Path, help="where code caches live (default ~/.cache/vqgen/codes)")
    parser.add_argument("--max-eval-items", type=int, default=2000, help="cap on validation sequences")
    parser.add_argument("--mixed-precision", choices=("auto", "no", "bf16", "fp16"), default="auto")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: OMP_NUM_THREADS, else one per "
                                                    "usable core; see README, Threads)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the training loss (faster steps after a minute of compilation)")
    parser.add_argument("--log-every", type=int)
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--sample-every", type=int)
    parser.add_argument("--checkpoint-every", type=int)
    parser.add_argument("--keep-checkpoints", type=int, default=2)
    parser.add_argument("--max-nonfinite", type=int, default=20)
    args = parser.parse_args(argv)
    for name in ("max_steps", "threads", "decay_steps", "batch_size", "log_every", "eval_every", "sample_every", "checkpoint_every",
                 "keep_checkpoints", "max_nonfinite", "max_eval_items"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not 0.0 <= args.label_dropout < 1.0:
        parser.error(f"--label-dropout must be in [0, 1), got {args.label_dropout}")
    return args


def cli(argv: list[str] | None = None) -> None:
    """Entry point: bad input ends in a one-line message and exit status 2."""
    args = parse_args(argv)
    if not Path(args.tokenizer).is_dir():
        print(f"error: --tokenizer {args.tokenizer!r} is not a folder", file=sys.stderr)
        sys.exit(2)
    run_cli(main, args)


if __name__ == "__main__":
    cli()
