"""Budget study: where a minute of training buys the most sample quality.

Each point trains a tokenizer (stage 1) and a prior (stage 2; class-conditional where the data set has labels)
through the real training scripts, on the train split less its last --holdout records (or on the train split when
the data set has a validation split), and scores --num-samples samples against the held-out records: images with
the project's feature classifier (FD-classifier, KID, class accuracy; the real row is held-out images against
training images at the same N), text (`--modality text`) by character 5-gram perplexity under a model of the
training text (and sentiment agreement where labelled), against the held-out texts' own perplexity. The priors
train as the standard budget's do (`--compile`). Nothing here sees the test split that `vqgen compare` reports.
Two sweeps from one base point (the first value of each list): the prior's steps at the base tokenizer, and the
tokenizer's steps under a base-length prior. The wall-clock minutes of each stage are recorded, so the plot shows
the sample metric (FD-classifier, or 5-gram perplexity for text) against minutes for each stage. Finished runs in
--output-dir are reused.

    python benchmarks/budget_study.py --variant vqgan --tokenizer-steps 1200 2400 --prior-steps 1000 2000 4000
    python benchmarks/budget_study.py --modality text --dataset ../shared/data/tiny_shakespeare --variant vqvae \
        --tokenizer-steps 3000 --prior-steps 1000 4000 --tokenizer-config seq_len_128.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import RESULTS_DIR, SHARED_DATA, environment, held_out_dataset, print_table, run_or_reuse, write_json

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from pipelines.evaluate import evaluate_pipeline_folder  # noqa: E402
from stage1_tokenizer.data import load_split  # noqa: E402

# Per modality: the sample metric the study plots (lower is better) and the further columns it shows.
SCORES = {
    "image": ("fd_classifier", "sample FD-classifier", [("kid_mean", "KID"), ("class_accuracy", "class acc.")]),
    "text": ("ngram_perplexity", "sample 5-gram perplexity", [("distinct_2", "distinct-2"), ("copy_rate", "copy rate"),
                                                                ("sentiment_agreement", "sentiment agreement")]),
}


def train_tokenizer(args, steps: int) -> tuple[Path, float]:
    folder = Path(args.output_dir) / f"tokenizer_{args.variant}_{steps}"
    command = [sys.executable, "-m", "stage1_tokenizer.train", "--dataset", str(args.data), "--variant", args.variant,
               "--modality", args.modality, "--preset", "small", "--max-steps", str(steps),
               "--batch-size", str(args.tokenizer_batch),
               "--disc-start", str(round(steps * args.disc_start_fraction)), "--seed", str(args.seed),
               "--max-eval-items", "1000", "--output-dir", str(folder)]
    if args.tokenizer_config:
        command += ["--config", str(args.tokenizer_config)]
    return folder, run_or_reuse(command, folder, "model.safetensors")


def train_prior(args, tokenizer: Path, tokenizer_steps: int, steps: int) -> tuple[Path, float]:
    extra = args.prior_args.split()
    tag = "".join(f"_{word.lstrip('-')}" for word in extra)  # runs with other prior arguments get their own folder
    folder = Path(args.output_dir) / f"prior_{args.variant}_{tokenizer_steps}_{steps}{tag}"
    command = [sys.executable, "-m", "stage2_prior.train", "--tokenizer", str(tokenizer), "--dataset", str(args.data),
               "--preset", "small", "--max-steps", str(steps), "--batch-size", str(args.prior_batch), "--seed",
               str(args.seed), "--compile", "--output-dir", str(folder), *extra]
    if args.class_conditional:
        command.append("--class-conditional")
    return folder, run_or_reuse(command, folder, "pipeline_config.json")


def score(args, pipeline: Path) -> dict:
    # One file per sampling setting: a rerun with another --guidance-scale reuses the training, not the scores.
    cached = pipeline / f"study_scores_n{args.num_samples}_g{args.guidance_scale:g}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    results = evaluate_pipeline_folder(pipeline, str(args.data), args.num_samples, args.seed, args.guidance_scale)
    samples = next(metrics for name, metrics in results["generation"].items() if name != "real")
    scores = {"sample": samples, "real": results["generation"]["real"],
              "reconstruction": next(iter(results["reconstruction"].values()), {})}
    cached.write_text(json.dumps(scores, default=float))
    return scores


def main(args: argparse.Namespace) -> None:
    env = environment(torch.device("cpu"))
    args.data = held_out_dataset(args.dataset, args.holdout, Path(args.output_dir))
    args.class_conditional = load_split(str(args.data), "train", args.modality).class_names is not None
    key, label, extra = SCORES[args.modality]
    base_tokenizer, base_prior = args.tokenizer_steps[0], args.prior_steps[0]
    points = [("prior", base_tokenizer, steps) for steps in args.prior_steps]
    points += [("tokenizer", steps, base_prior) for steps in args.tokenizer_steps[1:]]
    rows = []
    for sweep, tokenizer_steps, prior_steps in points:
        tokenizer, tokenizer_seconds = train_tokenizer(args, tokenizer_steps)
        pipeline, prior_seconds = train_prior(args, tokenizer, tokenizer_steps, prior_steps)
        scores = score(args, pipeline)
        prior_metrics = json.loads((pipeline / "pipeline_config.json").read_text())["metadata"]["prior_metrics"]
        rows.append({"sweep": sweep, "tokenizer_steps": tokenizer_steps, "prior_steps": prior_steps,
                     "tokenizer_minutes": tokenizer_seconds / 60, "prior_minutes": prior_seconds / 60,
                     "minutes": (tokenizer_seconds + prior_seconds) / 60,
                     "byte_accuracy": scores.get("reconstruction", {}).get("byte_accuracy"),
                     "prior_bits": prior_metrics["val_bits_per_code"],
                     **{name: scores["sample"].get(name) for name in [key] + [name for name, _ in extra]},
                     "real": scores["real"].get(key), "over_real": scores["sample"][key] / scores["real"][key]})
    columns = [("sweep", "sweep"), ("tokenizer_steps", "tokenizer steps"), ("prior_steps", "prior steps"),
               ("tokenizer_minutes", "tokenizer min"), ("prior_minutes", "prior min")]
    columns += [("byte_accuracy", "byte accuracy")] if args.modality == "text" else []
    columns += [("prior_bits", "prior bits/code"), (key, label), ("real", "real"), ("over_real", "x real"), *extra]
    table = print_table(
        f"Budget study ({args.variant}, {args.dataset}; samples scored against held-out data (its validation split, "
        f"else the last {args.holdout} training records), N = {args.num_samples}, guidance {args.guidance_scale}; "
        f"minutes of wall-clock training per stage)", columns, rows,
        digits={"tokenizer_minutes": 1, "prior_minutes": 1, "byte_accuracy": 4, "prior_bits": 3, key: 2, "real": 2,
                "over_real": 2, "kid_mean": 3, "class_accuracy": 3, "distinct_2": 3, "copy_rate": 3,
                "sentiment_agreement": 3})
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for sweep, label in (("prior", f"prior steps ({base_tokenizer}-step tokenizer)"),
                         ("tokenizer", f"tokenizer steps ({base_prior}-step prior)")):
        series = [row for row in rows if row["sweep"] == sweep or (row["tokenizer_steps"], row["prior_steps"]) ==
                  (base_tokenizer, base_prior)]
        series.sort(key=lambda row: row["minutes"])
        axis.plot([row["minutes"] for row in series], [row[key] for row in series], marker="o",
                  label=label)
        for row in series:
            axis.annotate(str(row[f"{sweep}_steps"]), (row["minutes"], row[key]), fontsize=7,
                          textcoords="offset points", xytext=(4, 4))
    axis.axhline(rows[0]["real"], color="black", linestyle=":", label="real held-out data (same N)")
    axis.set(xlabel="wall-clock training minutes (tokenizer + prior)", ylabel=f"{label} (held-out)",
             title=f"{args.variant}: sample quality against training time")
    axis.set_yscale("log")
    axis.legend(fontsize=8)
    figure.tight_layout()
    plot = Path(args.plot or RESULTS_DIR / f"budget_study_{args.variant}.png")
    plot.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(plot, dpi=100)
    print(f"wrote {plot}")
    write_json(args.output or RESULTS_DIR / f"budget_study_{args.variant}.json", {
        "environment": env, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "table": table})


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=str(SHARED_DATA / "fashion_mnist"))
    parser.add_argument("--modality", choices=("image", "text"), default="image")
    parser.add_argument("--variant", choices=("vqvae", "vqgan"), default="vqgan")
    parser.add_argument("--tokenizer-config", type=Path, help="a JSON file of VQConfig fields (stage 1's --config)")
    parser.add_argument("--holdout", type=int, default=5000, help="last train images held out for scoring")
    parser.add_argument("--tokenizer-steps", type=int, nargs="+", default=[1200, 2400])
    parser.add_argument("--prior-steps", type=int, nargs="+", default=[1000, 2000, 4000])
    parser.add_argument("--prior-args", default="", help="further stage2_prior.train arguments for every prior, "
                        "e.g. --prior-args=\"--window-offsets 16 --load-best-at-end\" (with '=', as the value "
                        "starts with '--'; their runs get their own folders)")
    parser.add_argument("--tokenizer-batch", type=int, default=32)
    parser.add_argument("--prior-batch", type=int, default=32)
    parser.add_argument("--disc-start-fraction", type=float, default=1 / 3,
                        help="the GAN term reaches the decoder after this share of the tokenizer's steps")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="runs/budget_study")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--plot", type=Path)
    return parser.parse_args()


if __name__ == "__main__":
    main(parse_args())
