r"""How a tokenizer is trained: the autoencoder's learning-rate schedule and a weight EMA, on held-out images.

Each --variants tokenizer trains once per --lr-schedules entry, --learning-rates value (default: the preset's)
and --configs entry (VQConfig changes; default none) through `stage1_tokenizer.train --lr-schedule S --learning-rate
LR --config JSON --weight-ema DECAY`, at --batch-size (and --adam-betas). The average does not change training, so
the run's last checkpoint holds the trained weights and `model.safetensors` their average. Both are scored on
held-out data (the data set's validation split, else the last --holdout train images, left out of training) with the
project's feature classifier: PSNR, SSIM, FD-classifier and class accuracy of the reconstructions. Nothing here sees
the test split that `vqgen compare` reports. Finished runs are reused.

    python benchmarks/tokenizer_training.py --steps 2400 --disc-start 800 --weight-ema 0.999 \
        --lr-schedules constant cosine
    python benchmarks/tokenizer_training.py --variants vqvae --steps 1200 --disc-start 400 \
        --learning-rates 4e-4 8e-4 1.6e-3
    python benchmarks/tokenizer_training.py --variants vqvae --steps 1200 --disc-start 400 \
        --configs '{}' '{"rotation_trick": true}' '{"ema_decay": 0.99}'
    python benchmarks/tokenizer_training.py --variants vqvae --steps 1200 --disc-start 400 --adam-betas 0.9 0.95
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

from _common import RESULTS_DIR, SHARED_DATA, environment, held_out_dataset, print_table, run_or_reuse, write_json

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from pipelines.classifier import load_or_train_classifier  # noqa: E402
from stage1_tokenizer import VQModel  # noqa: E402
from stage1_tokenizer.arguments import LR_SCHEDULES  # noqa: E402
from stage1_tokenizer.configuration import TOKENIZER_PRESETS  # noqa: E402
from stage1_tokenizer.evaluation import reconstruction_metrics  # noqa: E402


def config_tag(fields: dict) -> str:
    """A folder-name part for VQConfig changes: {"ema_decay": 0.99} -> "_ema_decay0.99" ("" for none)."""
    return "".join(f"_{key}{str(value).lower()}" for key, value in sorted(fields.items()))


def run_folder(args, variant: str, schedule: str, learning_rate: float | None, fields: dict) -> Path:
    """The folder of one training run, named by every setting the study varies (seed included)."""
    # Constant-rate runs at the preset's rate and batch 32 keep the folder names they had before schedules,
    # rates and batches were measured, so they are reused.
    tag = "" if schedule == "constant" else f"_{schedule}"
    if tag and args.warmup_steps:
        tag += f"_warmup{args.warmup_steps}"
    if learning_rate is not None:
        tag += f"_lr{learning_rate:g}"
    if args.batch_size != 32:
        tag += f"_batch{args.batch_size}"
    tag += config_tag(fields)
    if args.adam_betas:
        tag += "_betas{:g}-{:g}".format(*args.adam_betas)
    if args.seed:  # seed 0's folders keep the names they had before seeds were named
        tag += f"_seed{args.seed}"
    return Path(args.output_dir) / f"tokenizer_{variant}_{args.steps}{tag}_ema{args.weight_ema:g}"


def train(args, variant: str, schedule: str, learning_rate: float | None, fields: dict) -> tuple[Path, float]:
    folder = run_folder(args, variant, schedule, learning_rate, fields)
    command = [sys.executable, "-m", "stage1_tokenizer.train", "--dataset", str(args.data), "--variant", variant,
               "--preset", "small", "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--disc-start", str(args.disc_start), "--weight-ema", str(args.weight_ema), "--seed", str(args.seed),
               "--max-eval-items", "1000", "--output-dir", str(folder)]
    if schedule != "constant":
        command += ["--lr-schedule", schedule, "--warmup-steps", str(args.warmup_steps)]
    if learning_rate is not None:
        command += ["--learning-rate", str(learning_rate)]
    if fields:
        command += ["--config", json.dumps(fields)]
    if args.adam_betas:
        command += ["--adam-beta1", str(args.adam_betas[0]), "--adam-beta2", str(args.adam_betas[1])]
    return folder, run_or_reuse(command, folder, "model.safetensors")


def trained_weights(folder: Path, steps: int) -> VQModel:
    """The run's own weights at its last step (the checkpoint), in the saved model's architecture."""
    model = VQModel.from_pretrained(folder)
    model.load_state_dict(load_file(str(folder / "checkpoints" / f"step_{steps}" / "model.safetensors")))
    return model.eval()


def main(args: argparse.Namespace) -> None:
    env = environment(torch.device("cpu"))
    preset_rate = TOKENIZER_PRESETS["small"]["train"]["learning_rate"]
    args.data = held_out_dataset(args.dataset, args.holdout, Path(args.output_dir))
    rows = []
    for variant in args.variants:
        for schedule, learning_rate, fields in itertools.product(args.lr_schedules, args.learning_rates or [None],
                                                                 args.configs):
            folder, seconds = train(args, variant, schedule, learning_rate, fields)
            averaged = VQModel.from_pretrained(folder).eval()
            classifier, _ = load_or_train_classifier(str(args.data), averaged.config.resolution,
                                                     averaged.config.in_channels, seed=args.seed)
            for label, model in (("trained", trained_weights(folder, args.steps)),
                                 (f"EMA {args.weight_ema:g}", averaged)):
                metrics = reconstruction_metrics(model, str(args.data), classifier=classifier)
                rows.append({"variant": variant, "schedule": schedule, "learning_rate": learning_rate or preset_rate,
                             "config": json.dumps(fields) if fields else "preset",
                             "weights": label, "minutes": seconds / 60, **metrics})
    table = print_table(
        f"Tokenizer training ({args.dataset}, {args.steps} steps at batch {args.batch_size}, GAN from step "
        f"{args.disc_start}, warm-up {args.warmup_steps} steps for the schedules, Adam betas "
        f"{tuple(args.adam_betas) if args.adam_betas else 'stage 1 default'}; reconstructions of held-out images, "
        f"N = {rows[0]['num_items']})",
        [("variant", "variant"), ("schedule", "schedule"), ("learning_rate", "learning rate"),
         ("config", "VQConfig changes"), ("weights", "weights"), ("minutes", "training min"),
         ("psnr", "PSNR"), ("ssim", "SSIM"), ("fd_classifier", "FD-classifier"), ("classifier_accuracy", "class acc."),
         ("codebook_usage", "codebook usage %")], rows,
        digits={"learning_rate": 5, "minutes": 1, "psnr": 2, "ssim": 3, "fd_classifier": 3, "classifier_accuracy": 3,
                "codebook_usage": 1})
    write_json(args.output or RESULTS_DIR / "tokenizer_training.json",
               {"environment": env, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "table": table})


def json_object(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=str(SHARED_DATA / "fashion_mnist"))
    parser.add_argument("--variants", nargs="+", choices=("vqvae", "vqgan"), default=["vqgan", "vqvae"])
    parser.add_argument("--holdout", type=int, default=5000, help="last train images held out for scoring")
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--disc-start", type=int, default=800)
    parser.add_argument("--weight-ema", type=float, default=0.999)
    parser.add_argument("--lr-schedules", nargs="+", choices=LR_SCHEDULES, default=["constant"],
                        help="the autoencoder's learning-rate schedules, one run each (stage 1's --lr-schedule)")
    parser.add_argument("--learning-rates", type=float, nargs="+",
                        help="autoencoder learning rates, one run each (default: the preset's)")
    parser.add_argument("--configs", type=json_object, nargs="+", default=[{}],
                        help="VQConfig changes over the preset, one run each, as JSON objects "
                             "(e.g. '{}' '{\"rotation_trick\": true}' '{\"ema_decay\": 0.99}')")
    parser.add_argument("--adam-betas", type=float, nargs=2, metavar=("BETA1", "BETA2"),
                        help="the autoencoder's Adam betas (default: stage 1's, taming's 0.5 0.9)")
    parser.add_argument("--warmup-steps", type=int, default=0, help="stage 1's --warmup-steps for the schedules")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="runs/tokenizer_training")
    parser.add_argument("--output", type=Path)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
