"""Sampling sweep: guidance scale, temperature and top-k of a class-conditional image pipeline, on held-out data.

Each setting draws --num-samples samples (the held-out images' own labels, so every row has the real class
histogram) and scores them against the held-out images with the project's feature classifier: FD-classifier,
KID, precision / recall and class-conditional accuracy. The real row is held-out images against training images
at the same N. The pipelines must have been trained without the held-out images, e.g. by budget_study.py, whose
--output-dir holds both the pipelines and the held-out data (`_held_out_data`, the default --data here). Nothing
here sees the test split that `vqgen compare` reports, so its choice of sampling defaults is fair.

    python benchmarks/sampling_sweep.py runs/budget_study/prior_vqgan_1200_1000 \
        --guidance 1 1.5 2 3 4 --temperature 1.0 0.9 --top-k 0 64
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

from _common import RESULTS_DIR, environment, print_table, write_json

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from pipelines.classifier import load_images, load_or_train_classifier  # noqa: E402
from pipelines.evaluate import score_sampling  # noqa: E402
from pipelines.image_metrics import image_baseline_metrics  # noqa: E402
from pipelines.pipeline import VQPipeline  # noqa: E402
from stage1_tokenizer.data import load_split  # noqa: E402

def sweep_pipeline(pipe: VQPipeline, name: str, settings, classifier, held_out, labels, seed: int) -> list[dict]:
    rows = []
    for guidance, temperature, top_k in settings:
        start = time.time()
        metrics = score_sampling(pipe, classifier, held_out, labels, seed, guidance, temperature, top_k or None)
        rows.append({"pipeline": name, "guidance": guidance, "temperature": temperature, "top_k": top_k or "-",
                     **metrics, "seconds": time.time() - start})
        print(f"{name} guidance {guidance} temperature {temperature} top-k {top_k or '-'}: FD-classifier "
              f"{metrics['fd_classifier']:.3f}, KID {metrics['kid_mean']:.3f}, class acc. "
              f"{metrics['class_accuracy']:.3f}", flush=True)
    return rows


def plot(rows: list[dict], real_fd: float, path: Path) -> None:
    """FD-classifier and class accuracy against the guidance scale, one line per pipeline, temperature, top-k."""
    figure, (fd_axis, acc_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    groups = sorted({(row["pipeline"], row["temperature"], row["top_k"]) for row in rows}, key=str)
    for group in groups:
        series = sorted((row for row in rows if (row["pipeline"], row["temperature"], row["top_k"]) == group),
                        key=lambda row: row["guidance"])
        label = f"{group[0]}, T {group[1]}, top-k {group[2]}"
        scales = [row["guidance"] for row in series]
        fd_axis.plot(scales, [row["fd_classifier"] for row in series], marker="o", label=label)
        acc_axis.plot(scales, [100 * row["class_accuracy"] for row in series], marker="o", label=label)
    fd_axis.axhline(real_fd, color="black", linestyle=":", label="real images (same N)")
    fd_axis.set(xlabel="guidance scale", ylabel="sample FD-classifier (held-out, lower is better)")
    acc_axis.set(xlabel="guidance scale", ylabel="class-conditional accuracy (%)")
    fd_axis.legend(fontsize=7)
    figure.suptitle("Sampling settings on held-out data")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    print(f"wrote {path}")


def main(args: argparse.Namespace) -> None:
    env = environment(torch.device("cpu"))
    pipes = {Path(folder).name: VQPipeline.from_pretrained(folder) for folder in args.pipelines}
    first = next(iter(pipes.values()))
    if first.modality != "image" or not first.layout.conditional:
        raise SystemExit("error: the sweep is for class-conditional image pipelines")
    data = str(args.data or Path(args.pipelines[0]).parent / "_held_out_data")
    config = first.tokenizer.config
    classifier, _ = load_or_train_classifier(data, config.resolution, config.in_channels, 0)
    held_out, labels = load_images(load_split(data, "eval", "image"), "eval", config.resolution, config.in_channels,
                                   max_items=args.num_samples)
    train, _ = load_images(load_split(data, "train", "image"), "train", config.resolution, config.in_channels,
                           max_items=len(held_out))
    real = image_baseline_metrics(classifier, train, held_out, labels, seed=args.seed)
    print(f"real (training images against held-out, N = {len(held_out)}): FD-classifier {real['fd_classifier']:.3f}")
    settings = list(itertools.product(args.guidance, args.temperature, args.top_k))
    rows = [row for name, pipe in pipes.items()
            for row in sweep_pipeline(pipe, name, settings, classifier, held_out, labels.tolist(), args.seed)]
    for row in rows:
        row["fd_over_real"] = row["fd_classifier"] / real["fd_classifier"]
    table = print_table(
        f"Sampling sweep on held-out data ({data}, N = {len(held_out)}; real FD-classifier "
        f"{real['fd_classifier']:.3f}, real KID {real['kid_mean']:.4f})",
        [("pipeline", "pipeline"), ("guidance", "guidance"), ("temperature", "temperature"), ("top_k", "top-k"),
         ("fd_classifier", "FD-classifier"), ("fd_over_real", "x real"), ("kid_mean", "KID"),
         ("precision", "precision"), ("recall", "recall"), ("class_accuracy", "class acc.")], rows,
        digits={"fd_classifier": 2, "fd_over_real": 1, "kid_mean": 3, "precision": 3, "recall": 3,
                "class_accuracy": 3})
    plot(rows, real["fd_classifier"], Path(args.plot or RESULTS_DIR / "sampling_sweep.png"))
    write_json(args.output or RESULTS_DIR / "sampling_sweep.json", {
        "environment": env, "args": {k: str(v) for k, v in vars(args).items()}, "real": real, "rows": rows,
        "table": table})


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipelines", nargs="+", help="pipeline folders trained without the held-out data")
    parser.add_argument("--data", type=Path, help="data set whose eval split is the held-out data "
                        "(default: _held_out_data beside the first pipeline)")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0])
    parser.add_argument("--temperature", type=float, nargs="+", default=[1.0])
    parser.add_argument("--top-k", type=int, nargs="+", default=[0], help="0: no top-k")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--plot", type=Path)
    return parser.parse_args()


if __name__ == "__main__":
    main(parse_args())
