"""Code-cache building speed: images/s of `stage2_prior.tokenize_dataset.build_code_cache` (what
`stage2_prior.train` runs before training) on digits and, when present, ../shared/data/fashion_mnist, with the
time split into data preparation (decode, resize) and the tokenizer's encoder, and the cache-hit time.

    python benchmarks/bench_tokenize.py [--quick] [--tokenizer DIR] [--output PATH]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import (
    RESULTS_DIR, SHARED_DATA, Timer, apply_run_options, environment, median, pick_device, print_table, write_json,
)

import torch  # noqa: E402

from stage1_tokenizer.configuration import VQConfig  # noqa: E402
from stage1_tokenizer.modeling import VQModel  # noqa: E402
from stage1_tokenizer.precision import bf16_is_fast, fast_autocast  # noqa: E402
from stage1_tokenizer.train_utils import tune_allocator  # noqa: E402
from stage2_prior.tokenize_dataset import build_code_cache, source_dataset  # noqa: E402

BATCH_SIZE = 256  # build_code_cache's default


def datasets_to_run(args) -> list[tuple[str, str, str]]:
    """(label, dataset argument, split) triples: digits always, Fashion-MNIST when ../shared/data has it."""
    runs = [("digits", "digits", "train"), ("digits", "digits", "eval")]
    fashion = SHARED_DATA / "fashion_mnist"
    if fashion.is_dir():
        runs.append(("fashion_mnist", str(fashion), "eval"))
        if args.full:
            runs.append(("fashion_mnist", str(fashion), "train"))
    else:
        print(f"note: {fashion} not found; Fashion-MNIST rows skipped")
    return runs


@torch.no_grad()
def split_times(tokenizer: VQModel, dataset: str, split: str, device: torch.device) -> dict:
    """Data preparation alone and the encoder alone (bf16 autocast where it is faster), as build_code_cache runs them."""
    _, source = source_dataset(tokenizer, dataset, split)
    with Timer(device) as prepare:
        images = torch.stack([source[i][0] for i in range(len(source))])
    with Timer(device) as encode:
        for start in range(0, len(images), BATCH_SIZE):
            with fast_autocast(device):
                tokenizer.encode(images[start:start + BATCH_SIZE].to(device))
    return {"num_images": len(images), "prepare_s": prepare.wall, "encode_s": encode.wall}


def main(args: argparse.Namespace) -> None:
    tune_allocator()
    device = pick_device(args.device)
    env = environment(device)
    if args.tokenizer:
        tokenizer = VQModel.from_pretrained(args.tokenizer)
    else:
        torch.manual_seed(0)
        tokenizer = VQModel(VQConfig.from_preset("small"))  # random weights: the speed does not depend on them
    tokenizer = tokenizer.to(device).eval()
    print(f"code-cache benchmark: tokenizer {args.tokenizer or 'random small preset'} "
          f"({tokenizer.config.resolution}px -> {tuple(tokenizer.config.latent_shape)} codes), {args.repeats} "
          f"repeat(s), {env['torch_threads']} thread(s), {env['cpu']}; load average {env['load_average_at_start']}")
    rows = []
    for label, dataset, split in datasets_to_run(args):
        build, hit, parts = [], [], []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as cache_dir:
                with Timer(device) as miss_timer:
                    encoded, _, cache_hit = build_code_cache(tokenizer, dataset, split, Path(cache_dir))
                assert not cache_hit
                with Timer(device) as hit_timer:
                    _, _, cache_hit = build_code_cache(tokenizer, dataset, split, Path(cache_dir))
                assert cache_hit
            build.append(miss_timer.wall)
            hit.append(hit_timer.wall)
            parts.append(split_times(tokenizer, dataset, split, device))
        count = len(encoded)
        seconds = median(build)
        prepare, encode = median([p["prepare_s"] for p in parts]), median([p["encode_s"] for p in parts])
        rows.append({
            "dataset": label, "split": split, "images": count, "build_s": seconds, "images_per_s": count / seconds,
            "prepare_s": prepare, "encode_s": encode, "encoder_images_per_s": count / encode,
            "other_s": max(seconds - prepare - encode, 0.0), "cache_hit_s": median(hit), "build_runs": build,
        })
        print(f"  {label} {split}: {count} images in {seconds:.1f}s", flush=True)
    columns = [("dataset", "data set"), ("split", "split"), ("images", "images"), ("build_s", "build s"),
               ("images_per_s", "images/s"), ("prepare_s", "decode+resize s"), ("encode_s", "encoder s"),
               ("encoder_images_per_s", "encoder images/s"), ("other_s", "datasets.map + save s"),
               ("cache_hit_s", "cache hit s")]
    precision = "bf16 autocast" if bf16_is_fast(device) else "fp32"
    table = print_table(f"build_code_cache, batch {BATCH_SIZE}, {precision} (medians of {args.repeats})", columns,
                        rows, digits={"images_per_s": 0, "encoder_images_per_s": 0, "build_s": 2, "prepare_s": 2,
                                      "encode_s": 2, "other_s": 2, "cache_hit_s": 3})
    write_json(args.output, {"benchmark": "bench_tokenize", "environment": env, "batch_size": BATCH_SIZE,
                             "tokenizer": args.tokenizer or "random small preset", "repeats": args.repeats,
                             "rows": rows, "table_markdown": table})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 repeat")
    parser.add_argument("--full", action="store_true", help="also the 60000-image Fashion-MNIST train split")
    parser.add_argument("--tokenizer", help="a trained tokenizer folder (default: a random `small` tokenizer)")
    parser.add_argument("--repeats", type=int, help="repeats per data set (default 3)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "bench_tokenize.json")
    args = parser.parse_args(argv)
    return apply_run_options(args, quick=dict(repeats=1), full=dict(repeats=3))


if __name__ == "__main__":
    main(parse_args())
