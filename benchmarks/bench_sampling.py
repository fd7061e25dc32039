"""Sampling speed on a randomly initialised class-conditional `small` prior (a transformers LlamaForCausalLM) and a
`small` tokenizer whose latent grid matches: tokens/s for 16x16 and 32x32 code grids at batch 1 and 16.

Two tables. "pipeline": `VQPipeline.generate` with the KV cache (the default: vqgen's own decode step,
stage2_prior/llama_decoder.py), with a preallocated transformers StaticCache ("static cache", `static_cache=True`),
without a cache (`use_cache=False`) and with classifier-free guidance (guidance_scale=2).
"generate": the sampler alone against transformers' own `LlamaForCausalLM.generate()` on the same prior, same
batch, same number of codes: KV cache, do_sample=True, top_k=0, temperature 1, generate() restricted to code tokens
by `suppress_tokens` (as vqgen draws only codes), guidance through generate()'s own `guidance_scale` with
`negative_prompt_ids` = the null class (transformers' UnbatchedClassifierFreeGuidanceLogitsProcessor: a second,
unbatched forward per step on log-softmaxed logits, which after restriction to codes is the same distribution as
vqgen's u + s (c - u)). A third sampler row, "vqgen, transformers forward", is vqgen's loop with its decode step
switched off (the prior's own forward and transformers' dynamic cache: vqgen's path before it had its own step).
vqgen samples at `precision="auto"` (bf16 matmul weights in its decode step from 4 rows on a CPU with native bf16);
"vqgen, float32" is the same sampler at `precision="fp32"`, and "generate(), bf16 autocast" is generate() inside
`torch.autocast(dtype=torch.bfloat16)` where bf16 is fast on the device (its matmuls in bf16 too): the ratios are
against plain generate(), in float32 as the prior is loaded, and these two rows show what the precision buys on
each side.

    python benchmarks/bench_sampling.py [--quick] [--tables pipeline generate] [--output PATH]

The no-cache 32x32 runs would take many minutes; they are estimated instead: the no-cache forward (the whole
sequence so far, every step) is timed at a few sequence lengths and integrated over all steps. The same estimate
is printed next to the measured 16x16 runs, so its accuracy can be read off the table.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from contextlib import nullcontext
from unittest import mock

from _common import (
    RESULTS_DIR, Timer, apply_run_options, environment, median, pick_device, print_table, write_json,
)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipelines.pipeline import VQPipeline  # noqa: E402
from stage1_tokenizer.configuration import VQConfig  # noqa: E402
from stage1_tokenizer.modeling import VQModel  # noqa: E402
from stage1_tokenizer.precision import fast_autocast  # noqa: E402
from stage1_tokenizer.train_utils import tune_allocator  # noqa: E402
from stage2_prior.modeling import TokenLayout, build_prior  # noqa: E402
from stage2_prior import sampling  # noqa: E402
from stage2_prior.sampling import _forward, sample_codes  # noqa: E402

NUM_CLASSES = 10
GUIDANCE = 2.0
MODES = ("cache", "CFG", "static cache", "no cache")
# Sampler modes of the "generate" table: (sampler, guided).
SAMPLERS = ("vqgen", "generate()", "vqgen, float32", "generate(), bf16 autocast", "vqgen, transformers forward")
SAMPLER_MODES = tuple((sampler, guided) for sampler in SAMPLERS for guided in (False, True))


def make_pipeline(side: int, device: torch.device) -> VQPipeline:
    """`small` tokenizer with a side x side latent grid and a fresh class-conditional `small` prior."""
    names = [f"class {i}" for i in range(NUM_CLASSES)]
    factor = VQConfig.from_preset("small").downsample_factor
    config = VQConfig.from_preset("small", resolution=side * factor, class_names=names)
    torch.manual_seed(0)
    tokenizer = VQModel(config)
    layout = TokenLayout(config.codebook_size, NUM_CLASSES, side * side)
    prior = build_prior("small", layout)
    return VQPipeline(tokenizer, prior, layout=layout, class_names=names).to(device)


def generate(pipe: VQPipeline, batch: int, mode: str, device: torch.device):
    """One timed generate() call; returns (seconds, codes). "cache" is the default (vqgen's decode step with its
    preallocated cache), "static cache" transformers' forward with its StaticCache (`static_cache=True`)."""
    kwargs = dict(num_samples=batch, class_labels=[3] * batch, seed=0, output_type="pt")
    if mode == "CFG":
        kwargs["guidance_scale"] = GUIDANCE
    with Timer(device) as timer:
        out = pipe.generate(use_cache=mode != "no cache", static_cache=mode == "static cache", **kwargs)
    return timer.wall, out.codes


@torch.no_grad()
def sample(pipe: VQPipeline, batch: int, sampler: str, guided: bool, device: torch.device):
    """One timed draw of `batch` code grids by `sampler`; returns (seconds, codes (batch, num_codes))."""
    layout, prior = pipe.layout, pipe.prior
    labels = torch.full((batch,), 3)
    scale = GUIDANCE if guided else 1.0
    if sampler.startswith("generate()"):
        autocast = fast_autocast(device) if sampler == "generate(), bf16 autocast" else nullcontext()
        condition = layout.condition_tokens(labels, batch).unsqueeze(1).to(device)  # (B, 1)
        guidance = dict(guidance_scale=scale, negative_prompt_ids=torch.full_like(condition, layout.null_token)) \
            if guided else {}
        torch.manual_seed(0)
        with autocast, Timer(device) as timer:
            out = prior.generate(
                input_ids=condition, attention_mask=torch.ones_like(condition), max_new_tokens=layout.num_codes,
                min_new_tokens=layout.num_codes, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, use_cache=True,
                suppress_tokens=list(range(layout.codebook_size, layout.vocab_size)), eos_token_id=None,
                pad_token_id=layout.null_token, **guidance)
        return timer.wall, out[:, 1:]
    generic = mock.patch.object(sampling, "fast_decoder", lambda *args: None) \
        if sampler == "vqgen, transformers forward" else nullcontext()
    with generic, Timer(device) as timer:
        codes = sample_codes(prior, layout, batch, labels, guidance_scale=scale,
                             generator=torch.Generator().manual_seed(0),
                             precision="fp32" if sampler == "vqgen, float32" else "auto")
    return timer.wall, codes


def compare_with_generate(args, pipes: dict, device: torch.device) -> tuple[list[dict], dict, str]:
    """Interleaved repeats of the sampler modes; rows with tokens/s and the ratios vqgen / generate()."""
    cases = [(side, batch, sampler, guided) for side in args.grids for batch in args.batches
             for sampler, guided in SAMPLER_MODES]
    for side, pipe in pipes.items():
        for sampler in SAMPLERS:  # warm-up
            sample(pipe, 1, sampler, True, device)
    measured = {case: [] for case in cases}
    for repeat in range(args.repeats):
        for case in cases:
            seconds, codes = sample(pipes[case[0]], case[1], case[2], case[3], device)
            assert codes.shape == (case[1], case[0] ** 2) and int(codes.max()) < pipes[case[0]].layout.codebook_size
            measured[case].append(seconds)
            print(f"  {case[0]}x{case[0]} batch {case[1]:2d} {case[2]:27s} {'CFG' if case[3] else '   '}: "
                  f"{seconds:7.2f}s", flush=True)
    rows, targets = [], {}
    for side, batch, sampler, guided in cases:
        runs, reference = measured[(side, batch, sampler, guided)], measured[(side, batch, "generate()", guided)]
        # Each repeat's pair ran back to back, so its ratio sees one load level: the median of those ratios.
        ratio = median([theirs / ours for ours, theirs in zip(runs, reference)])
        rows.append({"grid": f"{side}x{side}", "batch": batch, "sampler": sampler,
                     "guidance": GUIDANCE if guided else 1.0, "seconds": median(runs),
                     "tokens_per_s": batch * side * side / median(runs), "vs_generate": ratio, "runs": runs})
        if sampler == "vqgen":
            targets[f"vqgen_vs_generate_{side}x{side}_batch_{batch}{'_cfg' if guided else ''}"] = ratio
    columns = [("grid", "grid"), ("batch", "batch"), ("sampler", "sampler"), ("guidance", "guidance"),
               ("seconds", "s / draw"), ("tokens_per_s", "tokens/s"), ("vs_generate", "speed vs generate() (median of paired ratios)")]
    table = print_table(f"sampler vs transformers generate(), random `small` prior (medians of {args.repeats}, "
                        f"interleaved)", columns, rows,
                        digits={"guidance": 0, "seconds": 2, "tokens_per_s": 0, "vs_generate": 2})
    for name, ratio in targets.items():
        print(f"target: vqgen >= 2x generate() tokens/s, {name}: {'MET' if ratio >= 2 else 'NOT MET'} "
              f"({ratio:.2f}x)")
    return rows, targets, table


@torch.no_grad()
def estimate_no_cache(pipe: VQPipeline, batch: int, device: torch.device, points: int) -> float:
    """Seconds for a no-cache generate(): the full-sequence forward timed at `points` lengths, integrated over
    every step (per-step sampling and the final decode are left out; both are small next to these forwards)."""
    num_codes = pipe.layout.num_codes
    lengths = np.unique(np.linspace(1, num_codes, points).round().astype(int))  # sequence length at each step
    costs = []
    for length in lengths:
        sequence = torch.randint(0, pipe.layout.codebook_size, (batch, int(length)), device=device)
        _forward(pipe.prior, sequence, None, False)  # warm the allocator for this shape
        with Timer(device) as timer:
            _forward(pipe.prior, sequence, None, False)
        costs.append(timer.wall)
    steps = np.arange(1, num_codes + 1)  # step t feeds the t tokens sampled so far (condition token included)
    return float(np.interp(steps, lengths, costs).sum())


def main(args: argparse.Namespace) -> None:
    tune_allocator()
    device = pick_device(args.device)
    env = environment(device)
    print(f"sampling benchmark: random `small` prior, {NUM_CLASSES} classes, {args.repeats} repeat(s), "
          f"{env['torch_threads']} thread(s), {env['cpu']}; load average {env['load_average_at_start']}", flush=True)
    pipes = {side: make_pipeline(side, device) for side in args.grids}
    assert all(type(pipe.prior).__name__ == "LlamaForCausalLM" for pipe in pipes.values())
    result = {"benchmark": "bench_sampling", "environment": env, "guidance_scale": GUIDANCE, "repeats": args.repeats}
    if "generate" in args.tables:
        rows, targets, table = compare_with_generate(args, pipes, device)
        result.update(generate_rows=rows, generate_targets=targets, generate_table_markdown=table)
    if "pipeline" in args.tables:
        result.update(pipeline_table(args, pipes, device))
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(args.output, result)


def pipeline_table(args: argparse.Namespace, pipes: dict, device: torch.device) -> dict:
    """The VQPipeline.generate modes (KV cache, CFG, static cache, no cache): rows, targets and table."""
    rows, codes = [], {}
    for side, pipe in pipes.items():
        pipe.generate(num_samples=1, class_labels=[0], seed=0, output_type="pt")  # warm-up
    cases = [(side, batch, mode) for side in args.grids for batch in args.batches
             for mode in MODES]
    measured = {case: [] for case in cases if not (case[2] == "no cache" and case[0] > args.max_no_cache_side)}
    for repeat in range(args.repeats):
        for case in measured:
            if case[2] == "no cache" and repeat >= args.no_cache_repeats:
                continue
            seconds, case_codes = generate(pipes[case[0]], case[1], case[2], device)
            measured[case].append(seconds)
            codes[case] = case_codes
            print(f"  {case[0]}x{case[0]} batch {case[1]:2d} {case[2]:8s}: {seconds:7.2f}s", flush=True)
    estimates = {}
    for side in args.grids:
        for batch in args.batches:
            estimates[(side, batch)] = estimate_no_cache(pipes[side], batch, device, args.points)
    equal_codes = {f"{side}x{side} batch {batch}": bool(torch.equal(codes[(side, batch, "cache")],
                                                                      codes[(side, batch, "no cache")]))
                   for side, batch, mode in measured if mode == "no cache"}

    for side in args.grids:
        for batch in args.batches:
            tokens = batch * side * side
            cached = median(measured[(side, batch, "cache")])
            for mode in MODES:
                runs = measured.get((side, batch, mode))
                seconds = median(runs) if runs else estimates[(side, batch)]
                rows.append({
                    "grid": f"{side}x{side}", "codes": side * side, "batch": batch, "mode": mode,
                    "seconds": seconds, "tokens_per_s": tokens / seconds, "vs_cache": seconds / cached,
                    "how": "measured" if runs else "estimated",
                    "no_cache_estimate_s": estimates[(side, batch)] if mode == "no cache" else None,
                    "runs": runs or [],
                })
    columns = [("grid", "grid"), ("batch", "batch"), ("mode", "mode"), ("seconds", "s / generate()"),
               ("tokens_per_s", "tokens/s"), ("vs_cache", "time vs KV cache"), ("how", "how"),
               ("no_cache_estimate_s", "no-cache estimate s")]
    table = print_table(f"VQPipeline.generate, random `small` prior (medians of {args.repeats}; "
                        f"no cache: {args.no_cache_repeats})", columns, rows,
                        digits={"seconds": 2, "tokens_per_s": 0, "vs_cache": 2, "no_cache_estimate_s": 1})
    print(f"\nseeded cached and uncached runs give equal codes: {equal_codes}")
    for side, batch, mode in measured:
        if mode == "static cache":
            same = torch.equal(codes[(side, batch, "cache")], codes[(side, batch, mode)])
            equal_codes[f"{side}x{side} batch {batch} static vs dynamic cache"] = bool(same)
            print(f"static cache (transformers forward) and default path give equal codes, {side}x{side} batch {batch}: "
                  f"{same}")
    by_case = {(r["grid"], r["batch"], r["mode"]): r for r in rows}
    targets = {}
    key = ("16x16", 16)
    if key + ("no cache",) in by_case:
        ratio = by_case[key + ("no cache",)]["vs_cache"]
        targets["kv_cache_speedup_256_codes_batch_16"] = ratio
        print(f"target: KV cache >= 10x no-cache at 256 codes, batch 16: {'MET' if ratio >= 10 else 'NOT MET'} "
              f"({ratio:.1f}x, {by_case[key + ('no cache',)]['how']})")
    for side in args.grids:
        for batch in args.batches:
            cost = by_case[(f"{side}x{side}", batch, "CFG")]["vs_cache"]
            targets[f"cfg_cost_{side}x{side}_batch_{batch}"] = cost
            print(f"target: CFG <= 1.3x unguided, {side}x{side} batch {batch}: {'MET' if cost <= 1.3 else 'NOT MET'} "
                  f"({cost:.2f}x)")
    return {"rows": rows, "equal_codes_cached_vs_uncached": equal_codes, "targets": targets, "table_markdown": table}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 repeat of each run (about 2 minutes)")
    parser.add_argument("--tables", nargs="+", choices=("generate", "pipeline"), default=["generate", "pipeline"],
                        help="which tables to measure (default both)")
    parser.add_argument("--grids", type=int, nargs="+", default=[16, 32], help="code grid sides")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, help="interleaved repeats of the cached, CFG and generate() runs "
                        "(default 3)")
    parser.add_argument("--no-cache-repeats", type=int, help="repeats of the measured no-cache runs (default 2)")
    parser.add_argument("--max-no-cache-side", type=int, help="measure no-cache runs only up to this grid side; "
                        "larger ones are estimated (default 16)")
    parser.add_argument("--points", type=int, default=8, help="sequence lengths timed for a no-cache estimate")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "bench_sampling.json")
    args = parser.parse_args(argv)
    return apply_run_options(args, quick=dict(repeats=1, no_cache_repeats=1, max_no_cache_side=16),
                             full=dict(repeats=3, no_cache_repeats=2, max_no_cache_side=16))


if __name__ == "__main__":
    main(parse_args())
