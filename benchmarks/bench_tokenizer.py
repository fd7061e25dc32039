"""Stage-1 training speed: the `small` VQGAN preset with its full objective (GAN on from step 0, random-VGG
perceptual loss), through the real `stage1_tokenizer.train.train_step`, in the default training path (`--mixed-precision auto`:
bf16 autocast where it is faster, fp32 elsewhere) against plain fp32 eager: one process, the same batches, interleaved repeats.

    python benchmarks/bench_tokenizer.py [--quick] [--compile] [--ablations] [--output PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from pathlib import Path

from _common import (
    RESULTS_DIR, Timer, apply_run_options, environment, matmul_peak_flops, median, peak_rss_mb, pick_device,
    print_table, write_json,
)

import torch  # noqa: E402  (after _common put the repository on sys.path)
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from stage1_tokenizer.arguments import TokenizerTrainingArguments, read_config_fields  # noqa: E402
from stage1_tokenizer.configuration import TOKENIZER_PRESETS, VQConfig  # noqa: E402
from stage1_tokenizer.data import ImageDataset, load_split  # noqa: E402
from stage1_tokenizer.losses import unit_channel_distance  # noqa: E402
from stage1_tokenizer.train import build_models, train_step  # noqa: E402
from stage1_tokenizer.train_utils import NonFiniteGuard, mixed_precision_mode, tune_allocator  # noqa: E402

PRESET = "small"
# Each mode: accelerate precision and what differs from the default training path.
MODES = {
    "fp32 eager": dict(precision="no"),
    "default": dict(precision="auto"),
    # Shown whenever the default resolved to fp32 (a CPU without fast bf16): what bf16 would have cost.
    "bf16 autocast (forced)": dict(precision="bf16"),
    "default + --compile": dict(precision="auto", compile=True),
    # Ablations (--ablations): the default path with one fast path turned off, and the objective as it was
    # before the fast paths (taming's three-pass adaptive weight, concatenated perceptual pass, NCHW loss nets).
    "default, taming 3-pass objective": dict(precision="auto", split_backward=False),
    "default, NCHW loss nets": dict(precision="auto", nchw_loss_nets=True),
    "default, pre-change objective": dict(precision="auto", pre_change=True),
    "fp32 eager, pre-change objective": dict(precision="no", pre_change=True),
}


def concatenated_perceptual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The random-VGG loss as it was before the fast paths: [x, y] in one batch, y inside the autograd graph."""
    if x.shape[1] == 1:
        x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
    h = (torch.cat([x, y]) - self.shift) / self.scale
    total = h.new_zeros((), dtype=torch.float32)
    for index, layer in enumerate(self.features):
        h = layer(h)
        if index in self.taps:
            fx, fy = h.chunk(2)
            total = total + unit_channel_distance(fx, fy)  # fy is in the graph here: the autograd formulation
    return total


class Mode:
    """One training setup (its own Accelerator, model, objective and optimizers) and its measurements."""

    def __init__(self, name: str, spec: dict, config: VQConfig, device: torch.device):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState

        self.name, self.spec = name, spec
        # accelerate keeps process-wide state: reset it so each mode gets its own precision. An fp32
        # Accelerator never autocasts; bf16 ones read the shared state, so the bf16 modes are built last.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        self.precision = mixed_precision_mode(spec["precision"])
        self.accelerator = Accelerator(mixed_precision=self.precision, cpu=device.type == "cpu")
        train = TOKENIZER_PRESETS[PRESET]["train"]
        torch.manual_seed(0)
        if spec.get("config"):
            config = bench_config(**spec["config"])
        self.model, self.objective, self.wrapped_disc, self.optimizers = build_models(
            self.accelerator, config, train["learning_rate"], train["disc_learning_rate"], spec.get("compile", False))
        if spec.get("split_backward") is False or spec.get("pre_change"):
            self.objective.split_backward = False
        if spec.get("nchw_loss_nets") or spec.get("pre_change"):
            self.objective.to(memory_format=torch.contiguous_format)
        if spec.get("pre_change"):
            self.objective.perceptual.forward = types.MethodType(concatenated_perceptual, self.objective.perceptual)
        self.guard = NonFiniteGuard(20, self.accelerator)
        defaults = TokenizerTrainingArguments(max_steps=1, output_dir="unused")  # train_step's defaults
        self.args = types.SimpleNamespace(grad_clip=defaults.grad_clip, disc_grad_clip=defaults.disc_grad_clip)
        self.step = 0
        self.wall, self.cpu, self.flops = [], [], None

    def train_step(self, batch: torch.Tensor) -> dict | None:
        logs = train_step(self.args, self.accelerator, self.model, self.objective, self.wrapped_disc,
                          self.optimizers, batch, self.step, self.guard)
        self.step += 1
        return logs

    def run(self, batches: list[torch.Tensor], device: torch.device) -> tuple[float, float]:
        """Train on `batches`; returns (wall, CPU) seconds per step. fp32 modes run with TF32 off on GPUs."""
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        if self.precision == "no":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            with Timer(device) as timer:
                for batch in batches:
                    self.train_step(batch)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        return timer.wall / len(batches), timer.cpu / len(batches)

    def check_precision(self, batch: torch.Tensor) -> str:
        """The dtype the autoencoder's output has in this mode's autocast (guards the shared-state trick)."""
        self.model.eval()  # eval: no k-means init or usage tracking from this probe batch
        with torch.no_grad(), self.accelerator.autocast():
            dtype = self.model(batch[:2]).reconstruction.dtype
        self.model.train()
        expected = torch.float32 if self.precision == "no" else {"bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        if dtype != expected:
            raise RuntimeError(f"mode {self.name!r}: reconstruction is {dtype}, expected {expected}")
        return str(dtype).replace("torch.", "")

    def count_flops(self, batch: torch.Tensor) -> float:
        """FLOPs of one full training step (matmuls and convolutions, forward and backward)."""
        counter = FlopCounterMode(display=False)
        counter.mod_tracker = _GlobalTotalOnly()
        with counter:
            self.train_step(batch)
        return float(counter.get_total_flops())


class _GlobalTotalOnly:
    """Stands in for FlopCounterMode's per-module tracker, whose backward hooks break autograd.grad on a leaf
    (the VQGAN objective takes gradients w.r.t. a detached reconstruction); only the global total is needed."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def load_batches(batch_size: int, count: int, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """`count` batches of digits at the preset's resolution (the built-in offline data set)."""
    config = VQConfig.from_preset(PRESET)
    dataset = ImageDataset(load_split("digits", "train", "image"), config.resolution, config.in_channels)
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        index = torch.randint(0, len(dataset), (batch_size,), generator=generator).tolist()
        batches.append(torch.stack([dataset[i][0] for i in index]).to(device))
    return batches


def bench_config(**changes) -> VQConfig:
    return VQConfig.from_preset(PRESET, **{"variant": "vqgan", "disc_start": 0, "perceptual_backend": "random-vgg",
                                           **changes})


def config_mode(changes: str | None) -> str | None:
    """Register the --config row (the default path with those VQConfig changes) in MODES; its name, or None."""
    if not changes:
        return None
    try:
        parsed = read_config_fields(changes)
        bench_config(**parsed)  # an unknown field or a bad value stops here, before any mode is built
    except ValueError as error:
        raise SystemExit(f"bench_tokenizer.py: {error}") from None
    name = f"default, config {json.dumps(parsed, sort_keys=True)}"
    MODES[name] = dict(precision="auto", config=parsed)
    return name


def memory_probe(name: str, batch_size: int, steps: int, device_name: str) -> dict:
    """Run in a child process: peak RSS (CPU) or peak allocated memory (CUDA) of one mode's training steps."""
    device = pick_device(device_name)
    batches = load_batches(batch_size, steps, device)
    mode = Mode(name, MODES[name], bench_config(), device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    setup_rss = peak_rss_mb()
    mode.run(batches, device)
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20, "kind": "cuda max_memory_allocated"}
    return {"peak_memory_mb": peak_rss_mb(), "setup_rss_mb": setup_rss, "kind": "peak RSS (VmHWM)"}


def measure_memory(names: list[str], args) -> dict[str, dict]:
    """One fresh process per mode, so each peak belongs to that mode alone."""
    results = {}
    for name in names:
        command = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", name, "--batch-size",
                   str(args.batch_size), "--device", args.device, "--threads", str(torch.get_num_threads())]
        if args.config:
            command += ["--config", args.config]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            print(f"warning: memory probe for {name!r} failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        results[name] = json.loads(lines[-1])
    return results


def main(args: argparse.Namespace) -> None:
    tune_allocator()  # as both training scripts do
    device = pick_device(args.device)
    extra = config_mode(args.config)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.batch_size, 2, args.device)))
        return
    names = ["fp32 eager", "default"] + (["default + --compile"] if args.compile else [])
    if mixed_precision_mode("auto") == "no" or args.ablations:
        names.append("bf16 autocast (forced)")
    if args.ablations:
        names += ["default, taming 3-pass objective", "default, NCHW loss nets", "default, pre-change objective",
                  "fp32 eager, pre-change objective"]
    if extra:
        names.append(extra)
    # fp32 Accelerators first: see Mode.__init__.
    names.sort(key=lambda name: MODES[name]["precision"] != "no")
    env = environment(device)
    print(f"stage-1 training benchmark: preset {PRESET!r} VQGAN, batch {args.batch_size}, {args.steps} step(s) x "
          f"{args.repeats} interleaved repeat(s) per mode, {env['torch_threads']} thread(s), {env['cpu']}"
          f"{', ' + env.get('gpu', '') if device.type == 'cuda' else ''}; load average {env['load_average_at_start']}")

    config = bench_config()
    batches = load_batches(args.batch_size, args.steps + args.warmup, device)
    modes = [Mode(name, MODES[name], config, device) for name in names]
    for mode in modes:
        mode.dtype = mode.check_precision(batches[0])
        with Timer(device) as warm:
            mode.run(batches[: args.warmup], device)  # k-means init, allocator growth, compilation
        mode.warmup_s = warm.wall
        print(f"  {mode.name}: output dtype {mode.dtype}, warm-up {warm.wall:.1f}s", flush=True)
    timed = batches[args.warmup:]
    for repeat in range(args.repeats):
        order = modes[repeat % len(modes):] + modes[: repeat % len(modes)]  # rotate: no mode always runs first
        for mode in order:
            wall, cpu = mode.run(timed, device)
            mode.wall.append(wall)
            mode.cpu.append(cpu)
        print(f"  repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{m.name} {m.wall[-1]:.2f}s" for m in modes),
              flush=True)
    for mode in modes:
        # FLOPs depend only on the algorithm; compiled graphs hide their ops, so they reuse the eager count.
        if not mode.spec.get("compile"):
            mode.flops = mode.count_flops(timed[0])
    by_name = {m.name: m for m in modes}
    for mode in modes:
        if mode.flops is None:
            mode.flops = by_name["default"].flops

    peak_bf16 = matmul_peak_flops(device, torch.bfloat16)
    peak_fp32 = matmul_peak_flops(device, torch.float32)
    memory = measure_memory(names, args) if not args.no_memory else {}
    base = by_name["fp32 eager"]
    rows = []
    for mode in modes:
        wall, cpu = median(mode.wall), median(mode.cpu)
        achieved = mode.flops / wall
        rows.append({
            "mode": mode.name, "dtype": mode.dtype, "s_per_step": wall, "steps_per_s": 1 / wall,
            "images_per_s": args.batch_size / wall, "cpu_s_per_step": cpu,
            "speedup_wall": median(base.wall) / wall, "speedup_cpu": median(base.cpu) / cpu,
            "gflop_per_step": mode.flops / 1e9, "achieved_gflops": achieved / 1e9,
            "pct_bf16_peak": 100 * achieved / peak_bf16, "pct_fp32_peak": 100 * achieved / peak_fp32,
            "peak_memory_mb": memory.get(mode.name, {}).get("peak_memory_mb"),
            "wall_s_per_step_runs": mode.wall, "cpu_s_per_step_runs": mode.cpu, "warmup_s": mode.warmup_s,
        })
    columns = [("mode", "mode"), ("dtype", "compute dtype"), ("s_per_step", "s/step"), ("steps_per_s", "steps/s"),
               ("images_per_s", "images/s"), ("speedup_wall", "speed-up (wall)"),
               ("speedup_cpu", "speed-up (CPU time)"), ("gflop_per_step", "GFLOP/step"),
               ("achieved_gflops", "GFLOP/s"), ("pct_bf16_peak", "% bf16 matmul peak"),
               ("pct_fp32_peak", "% fp32 matmul peak"),
               ("peak_memory_mb", "peak memory MB")]
    table = print_table(f"Stage-1 training, `{PRESET}` VQGAN, batch {args.batch_size} (medians of {args.repeats})",
                        columns, rows, digits={"s_per_step": 3, "steps_per_s": 3, "images_per_s": 1,
                                               "gflop_per_step": 1, "achieved_gflops": 1, "pct_bf16_peak": 1, "pct_fp32_peak": 1,
                                               "peak_memory_mb": 0})
    print(f"\nmatmul peak on this machine: bf16 {peak_bf16 / 1e9:,.1f} GFLOP/s, fp32 {peak_fp32 / 1e9:,.1f} GFLOP/s "
          f"(ratio {peak_bf16 / peak_fp32:.2f})")
    if memory:
        print(f"peak memory: {next(iter(memory.values()))['kind']}, one fresh process per mode")
    speedup = rows[[r["mode"] for r in rows].index("default")]["speedup_wall"]
    verdict = "MET" if speedup >= 3 else "NOT MET"
    default_dtype = by_name["default"].dtype
    why = "" if default_dtype != "float32" else " - the default computes in fp32 here: bf16 is not faster on this device"
    print(f"target: default >= 3x fp32 eager (wall clock): {verdict} ({speedup:.2f}x){why}")
    write_json(args.output, {
        "benchmark": "bench_tokenizer", "preset": PRESET, "batch_size": args.batch_size, "steps": args.steps,
        "repeats": args.repeats, "warmup": args.warmup, "environment": env, "config": config.to_diff_dict(),
        "matmul_peak_gflops": {"bf16": peak_bf16 / 1e9, "fp32": peak_fp32 / 1e9}, "memory": memory,
        "rows": rows, "table_markdown": table, "target": {"default_vs_fp32_eager": speedup, "met": speedup >= 3},
    })


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 timed step x 2 repeats, 1 warm-up step (~1-2 min)")
    parser.add_argument("--batch-size", type=int, default=TOKENIZER_PRESETS[PRESET]["train"]["batch_size"])
    parser.add_argument("--steps", type=int, help="timed steps per repeat (default 2)")
    parser.add_argument("--repeats", type=int, help="interleaved repeats per mode (default 5)")
    parser.add_argument("--warmup", type=int, help="untimed steps per mode first (default 2)")
    parser.add_argument("--compile", action="store_true", help="also time the default path with --compile")
    parser.add_argument("--ablations", action="store_true",
                        help="also time the default path with each fast path off, and the pre-change objective")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-mode peak-memory processes")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--config", help="also time the default path with these VQConfig changes: a JSON object "
                                         "(e.g. '{\"perceptual_depth\": 2}') or a JSON file, as stage 1's --config")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "bench_tokenizer.json")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return apply_run_options(args, quick=dict(steps=1, repeats=2, warmup=1), full=dict(steps=2, repeats=5, warmup=2))


if __name__ == "__main__":
    main(parse_args())
