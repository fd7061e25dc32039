"""Stage-2 training speed: one optimizer step of a prior preset (default `small`, the standard budget's) on
Fashion-MNIST's token layout (512 codes, 10 classes, 8x8 codes), through the real `stage2_prior.train.code_loss`
under accelerate's autocast, AdamW and gradient clipping as training runs them. Modes: plain fp32 eager, the default
path (`--mixed-precision auto`; on a CPU, "eager" attention), the same with SDPA attention (transformers' default),
the default path with `--compile` (the training loss under torch.compile, as
`stage2_prior.train --compile` does), and the default path at larger batches (what a bigger batch buys per token).
One process, interleaved repeats; the warm-up (compilation included) is timed separately, and the compiled mode's
break-even step count is the extra warm-up over the time it saves per step.

    python benchmarks/bench_prior.py [--batches 32 64 128] [--repeats 3] [--steps 20] [--output PATH]
"""

from __future__ import annotations

import argparse

from _common import (
    RESULTS_DIR, Timer, environment, matmul_peak_flops, median, pick_device, print_table, write_json,
)

import torch  # noqa: E402  (after _common put the repository on sys.path)
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from stage1_tokenizer.train_utils import fused_optimizer, mixed_precision_mode, tune_allocator  # noqa: E402
from stage2_prior.modeling import PRIOR_PRESETS, TokenLayout, build_prior, training_attention  # noqa: E402
from stage2_prior.train import code_loss  # noqa: E402

LAYOUT = TokenLayout(codebook_size=512, num_classes=10, num_codes=64)


class Mode:
    """One training setup (its own Accelerator, prior and optimizer) and its measurements."""

    def __init__(self, name: str, precision: str, compiled: bool, batch_size: int, attention: str | None,
                 preset: str, device: torch.device):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState

        # accelerate's state is process-wide: reset it so each mode gets its own precision (fp32 modes first).
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        self.name, self.batch_size, self.compiled = name, batch_size, compiled
        self.precision = mixed_precision_mode(precision)
        self.accelerator = Accelerator(mixed_precision=self.precision, cpu=device.type == "cpu")
        torch.manual_seed(0)
        train = PRIOR_PRESETS[preset]["train"]
        prior = build_prior(preset, LAYOUT, attn_implementation=attention or training_attention(device))
        optimizer = torch.optim.AdamW(prior.parameters(), lr=train["learning_rate"], betas=(0.9, 0.95),
                                      weight_decay=0.05, **fused_optimizer(self.accelerator.device))
        self.prior, self.optimizer = self.accelerator.prepare(prior, optimizer)
        self.loss = torch.compile(code_loss) if compiled else code_loss
        self.wall, self.cpu, self.warmup_s, self.flops = [], [], 0.0, None

    def batches(self, count: int, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        codes = torch.randint(0, LAYOUT.codebook_size, (count, self.batch_size, LAYOUT.num_codes), generator=generator)
        labels = torch.randint(0, LAYOUT.num_classes, (count, self.batch_size), generator=generator)
        return [torch.cat([LAYOUT.condition_tokens(y, self.batch_size)[:, None], x], 1).to(device)
                for x, y in zip(codes, labels)]

    def train_step(self, sequence: torch.Tensor) -> None:
        with self.accelerator.autocast():
            loss = self.loss(self.prior, sequence)
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        self.accelerator.clip_grad_norm_(self.prior.parameters(), 1.0)
        self.optimizer.step()

    def run(self, batches: list[torch.Tensor], device: torch.device) -> tuple[float, float]:
        with Timer(device) as timer:
            for sequence in batches:
                self.train_step(sequence)
        return timer.wall / len(batches), timer.cpu / len(batches)

    def count_flops(self, sequence: torch.Tensor) -> float:
        """FLOPs of one training step (matmuls and attention, forward and backward), counted on eager ops."""
        counter = FlopCounterMode(display=False)
        with counter:
            with self.accelerator.autocast():
                loss = code_loss(self.prior, sequence)
            self.accelerator.backward(loss)
        self.optimizer.zero_grad(set_to_none=True)
        return float(counter.get_total_flops())


def main(args: argparse.Namespace) -> None:
    tune_allocator()
    device = pick_device(args.device)
    env = environment(device)
    first = args.batches[0]
    specs = [("fp32 eager", "no", False, first, None), ("default", "auto", False, first, None),
             ("default, SDPA attention", "auto", False, first, "sdpa")]
    if not args.no_compile:
        specs.append(("default + --compile", "auto", True, first, None))
    specs += [(f"default, batch {batch}", "auto", False, batch, None) for batch in args.batches[1:]]
    print(f"stage-2 training benchmark: `{args.preset}` prior, {LAYOUT.num_codes} codes + 1 condition token, "
          f"{args.steps} step(s) x {args.repeats} interleaved repeat(s) per mode, {env['torch_threads']} thread(s), "
          f"{env['cpu']}; load average {env['load_average_at_start']}", flush=True)
    modes = [Mode(*spec, args.preset, device) for spec in specs]
    data = {}
    for mode in modes:
        data[mode.name] = mode.batches(args.warmup + args.steps, device)
        with Timer(device) as warm:
            mode.run(data[mode.name][: args.warmup], device)  # allocator growth, autotuning, compilation
        mode.warmup_s = warm.wall
        print(f"  {mode.name}: precision {mode.precision}, warm-up {warm.wall:.1f} s ({args.warmup} steps)", flush=True)
    for repeat in range(args.repeats):
        order = modes[repeat % len(modes):] + modes[: repeat % len(modes)]
        for mode in order:
            wall, cpu = mode.run(data[mode.name][args.warmup:], device)
            mode.wall.append(wall)
            mode.cpu.append(cpu)
        print(f"  repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{m.name} {m.wall[-1]:.3f} s" for m in modes),
              flush=True)
    for mode in modes:  # compiled graphs hide their ops: the compiled mode reuses the default path's count
        if not mode.compiled:
            mode.flops = mode.count_flops(data[mode.name][-1])
    for mode in modes:
        mode.flops = mode.flops or next(m.flops for m in modes if m.name == "default")
    peaks = {"no": matmul_peak_flops(device, torch.float32), "bf16": matmul_peak_flops(device, torch.bfloat16)}
    by_name = {mode.name: mode for mode in modes}
    base, default = by_name["fp32 eager"], by_name["default"]
    rows = []
    for mode in modes:
        wall = median(mode.wall)
        peak = peaks.get(mode.precision, peaks["bf16"])
        row = {"mode": mode.name, "precision": mode.precision, "batch": mode.batch_size, "s_per_step": wall,
               "tokens_per_s": mode.batch_size * (LAYOUT.num_codes + 1) / wall,
               "speedup": median(base.wall) / wall * mode.batch_size / base.batch_size,
               "gflop_per_step": mode.flops / 1e9, "achieved_gflops": mode.flops / wall / 1e9,
               "pct_peak": 100 * mode.flops / wall / peak, "warmup_s": mode.warmup_s,
               "wall_runs": mode.wall, "cpu_runs": mode.cpu}
        if mode.compiled:
            saved = median(default.wall) - wall
            extra = mode.warmup_s - default.warmup_s
            row["break_even_steps"] = extra / saved if saved > 0 else None
        rows.append(row)
    table = print_table(
        f"Stage-2 training step, `{args.preset}` prior (medians of {args.repeats} x {args.steps} steps; speed-up in "
        f"tokens/s against fp32 eager; % peak: of the measured matmul peak of the mode's precision, "
        f"fp32 {peaks['no'] / 1e9:.0f} / bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s)",
        [("mode", "mode"), ("precision", "precision"), ("batch", "batch"), ("s_per_step", "s/step"),
         ("tokens_per_s", "tokens/s"), ("speedup", "speed-up"), ("gflop_per_step", "GFLOP/step"),
         ("achieved_gflops", "GFLOP/s"), ("pct_peak", "% peak"), ("warmup_s", f"warm-up s ({args.warmup} steps)"),
         ("break_even_steps", "compile pays back after (steps)")],
        rows, digits={"s_per_step": 3, "tokens_per_s": 0, "gflop_per_step": 1, "achieved_gflops": 1, "pct_peak": 1,
                      "warmup_s": 1, "break_even_steps": 0})
    write_json(args.output or RESULTS_DIR / "bench_prior.json",
               {"environment": env, "args": vars(args) | {"output": str(args.output)}, "peaks_gflops":
                {k: v / 1e9 for k, v in peaks.items()}, "rows": rows, "table": table})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=sorted(PRIOR_PRESETS))
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128],
                        help="the first is every mode's; the others add default-path rows")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile row")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", default=None)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
