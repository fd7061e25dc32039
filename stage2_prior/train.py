"""Train the GPT-style prior over a tokenizer's codes: `accelerate launch -q -m stage2_prior.train --tokenizer DIR ...`."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from stage1_tokenizer.arguments import parse_arguments, save_arguments
from stage1_tokenizer.data import DataError, StepBatchSampler, evaluation_subset
from stage1_tokenizer.loading import load_strict
from stage1_tokenizer.modeling import VQModel
from stage1_tokenizer.threads import rebalance_threads, set_torch_threads
from stage1_tokenizer.train_utils import (
    LogWindow,
    MetricsLogger,
    NonFiniteGuard,
    catch_interrupts,
    check_compile_available,
    check_run_identity,
    checkpoint_module,
    claim_output_dir,
    file_sha256,
    fused_optimizer,
    mixed_precision_mode,
    resume_checkpoint,
    run_cli,
    save_checkpoint,
    tune_allocator,
    weight_ema,
)

from .arguments import PriorTrainingArguments
from .folder import SAMPLE_GRID, sample_preview, save_metadata, save_weights
from .modeling import TokenLayout, build_prior, training_attention
from .tokenize_dataset import build_code_cache, codes_tensor


def sequence_batch(layout: TokenLayout, codes: torch.Tensor, labels: torch.Tensor, label_dropout: float,
                   step: int, seed: int, conditional: bool) -> torch.Tensor:
    """[condition token] + codes, with labels dropped to the null class with prob. `label_dropout`."""
    if conditional:
        drop = torch.rand(labels.shape, generator=torch.Generator().manual_seed(seed * 7907 + step)) < label_dropout
        labels = torch.where(drop.to(labels.device), torch.full_like(labels, -1), labels)
    first = layout.condition_tokens(labels if conditional else None, codes.shape[0]).to(codes.device)
    return torch.cat([first.unsqueeze(1), codes], dim=1)  # (B, 1 + num_codes)


def code_loss(prior, sequence: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-code cross-entropy (nats): the last input token is never fed. With `lengths` (text), only each
    row's first `lengths` codes count: the rest encode padding after the text's end."""
    logits = prior(input_ids=sequence[:, :-1]).logits  # (B, num_codes, V)
    targets = sequence[:, 1:]
    if lengths is not None:
        positions = torch.arange(targets.shape[1], device=targets.device)
        targets = targets.masked_fill(positions >= lengths.to(targets.device)[:, None], -100)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


@torch.no_grad()
def validation_loss(accelerator, prior, layout, codes, labels, conditional, lengths=None,
                    batch_size: int = 256) -> dict:
    """Per-code NLL (nats) and bits per code on the evaluation split, with the true labels (text: the codes up to
    each text's end)."""
    prior.eval()
    total, count = 0.0, 0
    for start in range(0, len(codes), batch_size):
        batch = codes[start : start + batch_size].to(accelerator.device)
        first = layout.condition_tokens(labels[start : start + batch_size] if conditional else None, len(batch))
        sequence = torch.cat([first.to(batch.device).unsqueeze(1), batch], dim=1)
        kept = lengths[start : start + batch_size] if lengths is not None else None
        counted = int(kept.sum()) if kept is not None else batch.numel()
        with accelerator.autocast():
            total += float(code_loss(prior, sequence, kept)) * counted
        count += counted
    prior.train()
    nll = total / max(count, 1)
    return {"val_nll": nll, "val_bits_per_code": nll / math.log(2)}


class BestWeights:
    """--load-best-at-end: the weights with the lowest validation NLL so far, as safetensors in `folder` (with the
    step and its validation row beside them), so that a resumed run still knows them. Main process only."""

    def __init__(self, folder: Path, enabled: bool, resumed_step: int | None = None):
        self.folder, self.enabled, self.record = folder, enabled, None
        if not enabled:
            return
        if resumed_step is not None and (folder / "best.json").is_file():
            saved = json.loads((folder / "best.json").read_text())
            # Best weights from beyond the resumed checkpoint belong to steps the run is about to redo.
            self.record = saved if saved["step"] <= resumed_step else None
        elif resumed_step is None:
            shutil.rmtree(folder, ignore_errors=True)

    def offer(self, model: torch.nn.Module, step: int, validation: dict) -> None:
        """Keep `model`'s weights when `validation` (a `validation_loss` row) beats the best so far."""
        if not self.enabled or (self.record is not None and validation["val_nll"] >= self.record["val_nll"]):
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        staging = self.folder / ".tmp-model.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(staging))
        os.replace(staging, self.folder / "model.safetensors")
        self.record = {"step": step, **validation}
        (self.folder / ".tmp-best.json").write_text(json.dumps(self.record))
        os.replace(self.folder / ".tmp-best.json", self.folder / "best.json")

    def restore(self, model: torch.nn.Module, final_nll: float) -> dict | None:
        """Load the best weights into `model` when they beat the final ones; their record, else None."""
        if not self.enabled or self.record is None or self.record["val_nll"] >= final_nll:
            return None
        device = str(next(model.parameters()).device)
        model.load_state_dict(load_file(str(self.folder / "model.safetensors"), device=device))
        return self.record


def main(args: PriorTrainingArguments) -> None:
    args = args.resolved()
    tune_allocator()
    set_torch_threads(args.threads)
    accelerator = Accelerator(mixed_precision=mixed_precision_mode(args.mixed_precision), cpu=args.cpu)
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    claim_output_dir(output_dir, accelerator)  # a writable folder no other run uses
    tokenizer = load_strict(VQModel, Path(args.tokenizer), "tokenizer").to(accelerator.device).eval()
    with accelerator.main_process_first():
        train_codes, class_names, _ = build_code_cache(tokenizer, args.dataset, "train", args.cache_dir,
                                                   window_offsets=args.window_offsets)
        eval_codes, _, _ = build_code_cache(tokenizer, args.dataset, "eval", args.cache_dir)
    if args.class_conditional and not class_names:
        raise DataError(f"--class-conditional needs a labelled data set; {args.dataset!r} has no 'label' column")
    conditional = bool(args.class_conditional)
    train_x, train_y, train_lengths = codes_tensor(train_codes)
    eval_x, eval_y, eval_lengths = codes_tensor(eval_codes)
    if len(eval_x) > args.max_eval_items:  # drawn across the split, not its first (maybe one-class) records
        chosen = torch.tensor(evaluation_subset(len(eval_x), args.max_eval_items))
        eval_x, eval_y = eval_x[chosen], eval_y[chosen]
        eval_lengths = eval_lengths[chosen] if eval_lengths is not None else None
    layout = TokenLayout(tokenizer.config.codebook_size, len(class_names) if conditional else 0, train_x.shape[1])

    batch_size = args.batch_size
    attention = training_attention(accelerator.device) if args.attention == "auto" else args.attention
    shape = args.shape()
    prior = build_prior(args.preset, layout, attn_implementation=attention, **shape)
    optimizer = torch.optim.AdamW(prior.parameters(), lr=args.learning_rate, betas=(0.9, 0.95),
                                  weight_decay=args.weight_decay, **fused_optimizer(accelerator.device))
    # The cosine spans --decay-steps (default --max-steps); fix it to extend a run later bit-identically.
    decay_steps = args.decay_steps or args.max_steps
    warmup = min(args.warmup_steps, decay_steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, decay_steps)
    prior, optimizer, scheduler = accelerator.prepare(prior, optimizer, scheduler)
    train_loss = code_loss
    if args.compile:  # the training loss only: sampling and validation vary their shapes, and stay eager
        check_compile_available()
        train_loss = torch.compile(code_loss)

    unwrapped = accelerator.unwrap_model(prior)
    ema = weight_ema(unwrapped, args.weight_ema) if args.weight_ema else None
    if ema is not None:
        checkpoint_module(accelerator, ema, "weight_ema")
    evaluated = ema.module if ema is not None else unwrapped  # what validation, previews and the pipeline use

    step = 0
    identity = {"dataset": args.dataset, "preset": args.preset, "class_conditional": conditional,
                "tokenizer_sha256": file_sha256(Path(args.tokenizer) / "model.safetensors"),
                "layout": dataclasses.asdict(layout)}
    if shape:  # runs without --config keep the identity they were started with
        identity["shape"] = shape
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
    if accelerator.is_main_process:
        save_arguments(args, output_dir)
    best = BestWeights(output_dir / "best_prior", args.load_best_at_end and accelerator.is_main_process,
                       step if args.resume else None)

    sampler = iter(StepBatchSampler(len(train_x), batch_size, args.seed, step,
                                    accelerator.process_index, accelerator.num_processes))
    guard = NonFiniteGuard(args.max_nonfinite, accelerator)
    every = {k: getattr(args, k) for k in ("log_every", "eval_every", "sample_every", "checkpoint_every")}
    class_names = class_names if conditional else None
    metadata = {"dataset": args.dataset, "prior_preset": args.preset, "prior_shape": shape,
                "train_steps": args.max_steps, "seed": args.seed}
    progress = tqdm(total=args.max_steps, initial=step, disable=not accelerator.is_local_main_process,
                    desc="prior", dynamic_ncols=True)
    prior.train()
    tick, window = time.time(), LogWindow()
    interrupts = catch_interrupts(accelerator, checkpoint_dir, args.keep_checkpoints, args.max_steps)
    while step < args.max_steps:
        index = torch.tensor(next(sampler))
        sequence = sequence_batch(layout, train_x[index], train_y[index], args.label_dropout, step, args.seed,
                                  conditional).to(accelerator.device)
        with accelerator.autocast():
            loss = train_loss(prior, sequence, train_lengths[index] if train_lengths is not None else None)
        if guard.check(loss):
            window.add({"loss": loss})
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(prior.parameters(), args.grad_clip)
            optimizer.step()
            if ema is not None:
                ema.update_parameters(unwrapped)
        scheduler.step()
        step += 1
        rebalance_threads()
        progress.update(1)
        if guard.exhausted:
            save_checkpoint(accelerator, checkpoint_dir, step, args.keep_checkpoints)
            raise guard.stop(step, "lower the learning rate")
        row = {}
        if step % every["eval_every"] == 0 or step == args.max_steps:
            row.update(validation_loss(accelerator, evaluated, layout, eval_x, eval_y, conditional, eval_lengths))
            best.offer(evaluated, step, dict(row))
        if step % every["log_every"] == 0 or row:
            loss_value = accelerator.reduce(window.mean().get("loss", loss.detach().float()), reduction="mean")
            row = logger.log(step, {"loss": loss_value, "bits_per_code": loss_value / math.log(2),
                                    "lr": scheduler.get_last_lr()[0], "nonfinite_skipped": guard.total,
                                    "step_time": (time.time() - tick) / every["log_every"], **row})
            progress.set_postfix(loss=f"{row['loss']:.3f}")
            tick = time.time()
        if step % every["sample_every"] == 0 and accelerator.is_main_process:
            sample_preview(tokenizer, evaluated, layout, output_dir / "samples" / f"step_{step:07d}.png", args.seed)
        if step % every["checkpoint_every"] == 0 and step < args.max_steps:
            save_checkpoint(accelerator, checkpoint_dir, step, args.keep_checkpoints)
        interrupts.check(step)  # Ctrl-C / SIGTERM: checkpoint and stop
    progress.close()
    save_checkpoint(accelerator, checkpoint_dir, step, args.keep_checkpoints)
    if accelerator.is_main_process:
        final = validation_loss(accelerator, evaluated, layout, eval_x, eval_y, conditional, eval_lengths)
        chosen = best.restore(evaluated, final["val_nll"])
        if chosen is not None:  # an earlier step validated better: the pipeline gets its weights, and their scores
            metadata.update(best_step=chosen["step"], prior_metrics_last_step=final)
            final = {key: value for key, value in chosen.items() if key != "step"}
            accelerator.print(f"--load-best-at-end: the weights of step {chosen['step']} validated best")
        metadata["prior_metrics"] = final
        if ema is not None:  # the same validation on the trained weights themselves, for comparison
            raw = validation_loss(accelerator, unwrapped, layout, eval_x, eval_y, conditional, eval_lengths)
            metadata.update(weight_ema=args.weight_ema, prior_metrics_without_ema=raw)
        save_weights(output_dir, tokenizer, evaluated)
        preview = sample_preview(tokenizer, evaluated, layout, output_dir / "samples" / f"step_{step:07d}.png", args.seed)
        if preview.suffix == ".png":
            shutil.copyfile(preview, output_dir / SAMPLE_GRID)
        save_metadata(output_dir, tokenizer, layout, class_names, metadata)
        accelerator.print(f"validation: {final['val_nll']:.4f} nats/code, {final['val_bits_per_code']:.4f} bits/code")
    logger.close()
    accelerator.end_training()


def parse_args(argv: list[str] | None = None) -> PriorTrainingArguments:
    """Command-line flags, or one JSON file of fields, as PriorTrainingArguments."""
    return parse_arguments(PriorTrainingArguments, argv, description=__doc__)


def cli(argv: list[str] | None = None) -> None:
    """Entry point: bad input ends in a one-line message and exit status 2."""
    args = parse_args(argv)
    if not Path(args.tokenizer).is_dir():
        print(f"error: --tokenizer {args.tokenizer!r} is not a folder", file=sys.stderr)
        sys.exit(2)
    run_cli(main, args)


if __name__ == "__main__":
    cli()
