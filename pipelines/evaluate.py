"""Evaluate image or text pipelines against real data: the metrics, their bootstrap intervals and the figures.

`vqgen compare` calls `evaluate_images` / `evaluate_texts` once per seed with both variants' pipelines;
`vqgen evaluate` calls `evaluate_pipeline_folder` on one folder. Every row, the real one included, uses the same N.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image

from stage1_tokenizer.data import evaluation_subset, load_split, text_dataset
from stage1_tokenizer.evaluation import reconstruction_metrics
from stage1_tokenizer.modeling_text import bytes_to_strings

from .classifier import load_images, load_or_train_classifier, predict_classes
from .image_metrics import (high_frequency_ratio, image_baseline_metrics, image_generation_metrics,
                            inside_real_manifold, radial_power_spectrum)
from .pipeline import VQPipeline
from .plots import guidance_sweep_figure, spectrum_figure
from .pretrained_metrics import optional_pretrained_metrics
from .text_metrics import CharNgramModel, SentimentClassifier, text_generation_metrics, texts_and_labels
from .uncertainty import image_sample_intervals, text_sample_intervals
from .verdict import COLUMN_NAMES


# Samples per generate() batch in the evaluation (images and text).
SAMPLE_BATCH = 250


@contextmanager
def evaluating(what: str):
    """Print `evaluating WHAT` as a phase starts and its seconds when it ends: where the evaluation's minutes go."""
    print(f"evaluating {what}", flush=True)
    start = time.perf_counter()
    yield
    print(f"evaluating {what}: {time.perf_counter() - start:.0f} s", flush=True)


def _grid(images: torch.Tensor, nrow: int) -> Image.Image:
    """(N, C, H, W) in [-1, 1] -> a PIL grid."""
    from torchvision.utils import make_grid

    grid = make_grid((images.float().clamp(-1, 1) + 1) / 2, nrow=nrow, padding=2, pad_value=1.0)
    return Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))


def _generate_images(pipe: VQPipeline, labels: list[int] | None, count: int, guidance: float, seed: int,
                     batch_size: int = SAMPLE_BATCH, temperature: float = 1.0,
                     top_k: int | None = None) -> torch.Tensor:
    out = pipe.generate(num_samples=count, class_labels=labels, guidance_scale=guidance if labels else 1.0,
                        temperature=temperature, top_k=top_k, seed=seed, batch_size=batch_size, output_type="pt")
    return out.images * 2 - 1  # back to [-1, 1]


# The report's guidance sweep: a few scales around the budget's, at up to SWEEP_SAMPLES samples each.
SWEEP_SCALES = (1.0, 1.5, 2.0, 3.0, 4.0)
SWEEP_SAMPLES = 500


SWEEP_METRICS = ("fd_classifier", "kid_mean", "precision", "recall", "class_accuracy")


def score_sampling(pipe: VQPipeline, classifier, reference: torch.Tensor, labels: list[int], seed: int,
                   guidance: float, temperature: float = 1.0, top_k: int | None = None) -> dict[str, float]:
    """SWEEP_METRICS of len(labels) samples drawn with these settings, against `reference` images."""
    fake = _generate_images(pipe, labels, len(labels), guidance, seed, temperature=temperature, top_k=top_k)
    metrics = image_generation_metrics(classifier, reference, fake, labels, seed=seed)
    return {key: metrics[key] for key in SWEEP_METRICS}


def guidance_sweep(pipes: dict[str, VQPipeline], classifier, reference: torch.Tensor, labels: list[int], seed: int,
                   scales=SWEEP_SCALES) -> dict[str, list[dict]]:
    """Each variant's samples at each guidance scale, scored against `reference` images with `labels`.

    The report passes training images: the sweep shows how guidance trades diversity for class fidelity without
    looking at the test split the report scores.
    """
    sweep = {}
    for variant, pipe in pipes.items():
        with evaluating(f"{variant}: guidance sweep ({len(labels)} samples at scales {list(scales)})"):
            sweep[variant] = [{"guidance_scale": scale,
                               **score_sampling(pipe, classifier, reference, labels, seed, scale)} for scale in scales]
    return sweep


def _same_labels(labels: torch.Tensor, wanted: list[int]) -> torch.Tensor | None:
    """Indices into `labels` with exactly the label multiset `wanted` (each used once), or None when too few.

    At a few hundred images FD-classifier depends on the class histogram: the sweep's samples share the
    reference's labels, so its real floor must too."""
    pools = {c: (labels == c).nonzero().flatten().tolist() for c in set(wanted)}
    if any(len(pools[c]) < wanted.count(c) for c in pools):
        return None
    return torch.tensor([pools[c].pop() for c in wanted])


def _per_class_images(images: torch.Tensor, labels: torch.Tensor, num_classes: int, per_class: int) -> torch.Tensor:
    rows = []
    for c in range(num_classes):
        chosen = images[labels == c][:per_class]
        if len(chosen) < per_class:  # pad a short class with blanks so rows stay aligned
            chosen = torch.cat([chosen, torch.ones(per_class - len(chosen), *images.shape[1:])])
        rows.append(chosen)
    return torch.cat(rows)


@torch.no_grad()
def _features(classifier, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    classifier.eval()
    return torch.cat([classifier.features(images[i : i + batch_size].float())
                      for i in range(0, len(images), batch_size)])


def _sample_intervals(classifier, real: torch.Tensor, fake: torch.Tensor, requested: list[int] | None,
                      seed: int) -> dict[str, list[float]]:
    """Bootstrap intervals of the sample metrics that have one (see pipelines.uncertainty)."""
    real_feats, fake_feats = _features(classifier, real).double(), _features(classifier, fake).double()
    inside = inside_real_manifold(real_feats, fake_feats)
    correct = None
    if requested is not None:
        correct = (predict_classes(classifier, fake) == torch.tensor(requested)).double()
    return image_sample_intervals(real_feats, fake_feats, inside.double(), correct, seed=seed)


def evaluate_images(pipes: dict[str, VQPipeline], dataset: str, num_samples: int, guidance_scale: float,
                    output_dir: Path, seed: int, classifier_seed: int = 0) -> dict:
    """Reconstruction + generation metrics, sample intervals and figures for image pipelines, with a real row.

    The classifier is trained (or loaded from its cache) with `classifier_seed`, the same for every seed of a
    comparison; `seed` draws the samples.
    """
    first = next(iter(pipes.values()))
    config = first.tokenizer.config
    with evaluating("the feature classifier"):
        classifier, classifier_info = load_or_train_classifier(dataset, config.resolution, config.in_channels,
                                                               classifier_seed)
    count = num_samples
    eval_split = load_split(dataset, "eval", "image")  # loaded once, for the real rows and both reconstructions
    real_test, test_labels = load_images(eval_split, "eval", config.resolution, config.in_channels, max_items=count)
    real_train, train_labels = load_images(load_split(dataset, "train", "image"), "train", config.resolution,
                                           config.in_channels, max_items=len(real_test))
    count = len(real_test)
    conditional = first.layout.conditional
    requested = test_labels.tolist() if conditional else None  # same class histogram as the real rows
    figures = output_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    results = {"classifier": classifier_info, "reconstruction": {}, "generation": {}, "figures": {
        "samples": {}, "reconstructions": {}}, "notes": [], "intervals": {"generation": {}}}
    num_classes = first.layout.num_classes
    per_class = 8
    real_grid = _per_class_images(real_test, test_labels, num_classes, per_class) if conditional else real_test[:64]
    _grid(real_grid, per_class if conditional else 8).save(figures / "samples_real.png")
    results["figures"]["samples"]["real"] = "figures/samples_real.png"
    spectra = {"real test images": radial_power_spectrum(real_test)}
    for variant, pipe in pipes.items():
        with evaluating(f"{variant}: reconstructions"):
            row = results["reconstruction"][variant] = reconstruction_metrics(pipe.tokenizer, eval_split, classifier)
            row.pop("classifier_accuracy_real", None)  # the real row has the classifier's
            with torch.no_grad():
                recon_all = torch.cat([pipe.tokenizer.decode(pipe.tokenizer.encode(real_test[i:i + SAMPLE_BATCH]))
                                       .float().cpu() for i in range(0, count, SAMPLE_BATCH)])
            row["high_frequency_ratio"] = high_frequency_ratio(recon_all, real_test)
            spectra[f"{COLUMN_NAMES[variant]} reconstructions"] = radial_power_spectrum(recon_all)
            originals, recon = real_test[:8], recon_all[:8]
            _grid(torch.cat([originals, recon]), 8).save(figures / f"reconstructions_{variant}.png")
            results["figures"]["reconstructions"][variant] = f"figures/reconstructions_{variant}.png"
        with evaluating(f"{variant}: {count} samples"):
            fake = _generate_images(pipe, requested, count, guidance_scale, seed)
            row = results["generation"][variant] = image_generation_metrics(classifier, real_test, fake, requested,
                                                                            seed=seed)
            results["intervals"]["generation"][variant] = _sample_intervals(classifier, real_test, fake, requested,
                                                                            seed)
            row["high_frequency_ratio"] = high_frequency_ratio(fake, real_test)
            spectra[f"{COLUMN_NAMES[variant]} samples"] = radial_power_spectrum(fake)
            grid = (_per_class_images(fake, torch.tensor(requested), num_classes, per_class) if conditional
                    else fake[:64])
            _grid(grid, per_class if conditional else 8).save(figures / f"samples_{variant}.png")
            results["figures"]["samples"][variant] = f"figures/samples_{variant}.png"
        extra, notes = optional_pretrained_metrics(real_test, fake)
        results["generation"][variant].update(extra)
        results["notes"] += [n for n in notes if n not in results["notes"]]
    results["reconstruction"]["real"] = {"classifier_accuracy": classifier_info.get("test_accuracy"),
                                         "high_frequency_ratio": 1.0}
    results["generation"]["real"] = image_baseline_metrics(classifier, real_train, real_test,
                                                           test_labels if conditional else None, seed=seed)
    results["generation"]["real"]["high_frequency_ratio"] = high_frequency_ratio(real_train, real_test)
    spectrum_figure(spectra).savefig(figures / "power_spectrum.png", format="png", dpi=100)
    results["figures"]["spectrum"] = "figures/power_spectrum.png"
    if conditional:  # training images only: the reference, and a disjoint real set with the same labels (floor)
        n = min(SWEEP_SAMPLES, len(real_train) // 2)
        reference, reference_labels = real_train[:n], train_labels[:n].tolist()
        rows = guidance_sweep(pipes, classifier, reference, reference_labels, seed)
        floor = _same_labels(train_labels[n:], reference_labels)
        real_fd = (image_baseline_metrics(classifier, real_train[n:][floor], reference, seed=seed)["fd_classifier"]
                   if floor is not None else None)
        results["guidance_sweep"] = {"num_samples": n, "real_fd_classifier": real_fd, "rows": rows}
        guidance_sweep_figure(rows, real_fd).savefig(figures / "guidance_sweep.png", format="png", dpi=100)
        results["figures"]["guidance_sweep"] = "figures/guidance_sweep.png"
    return results


def _text_intervals(texts: list[str], ngram: CharNgramModel, sentiment: SentimentClassifier | None,
                    requested: list[int] | None, seed: int) -> dict[str, list[float]]:
    """Bootstrap intervals of n-gram perplexity and sentiment agreement (see pipelines.uncertainty)."""
    scored = [t for t in texts if t]
    if len(scored) < 2:
        return {}
    nll = [ngram.text_nll(t) for t in scored]
    lengths = [len(t.encode("utf-8")) for t in scored]
    agreement = None
    if sentiment is not None and requested is not None:
        agreement = (sentiment.predict(texts) == torch.tensor(requested).numpy()).astype(float)
    return text_sample_intervals(nll, lengths, agreement, seed=seed)


def evaluate_texts(pipes: dict[str, VQPipeline], dataset: str, num_samples: int, guidance_scale: float,
                   seed: int) -> dict:
    """Reconstruction + sample metrics and intervals for text pipelines, with a real-text row and sample texts."""
    first = next(iter(pipes.values()))
    train_split, eval_split = load_split(dataset, "train", "text"), load_split(dataset, "eval", "text")
    train_texts, train_labels = texts_and_labels(train_split, None)
    # Real rows: held-out sequences exactly as the tokenizer sees them (records if labelled, else windows), drawn
    # across the split rather than its first records.
    held_out = text_dataset(eval_split, first.tokenizer.config.seq_len)
    chosen = torch.tensor(evaluation_subset(len(held_out), num_samples))
    real_texts = bytes_to_strings(held_out.windows[chosen])
    real_labels = held_out.labels[chosen].tolist() if held_out.has_labels else None
    with evaluating("the 5-gram model"):
        ngram = CharNgramModel(order=5).fit(train_texts)
    # The training text as the tokenizer saw it, for the copy rate: records, or one stream of newline-joined lines.
    seen = train_texts if train_labels is not None else ["\n".join(train_texts)]
    conditional = first.layout.conditional
    sentiment = None
    results = {"classifier": {}, "reconstruction": {}, "generation": {}, "text_samples": {}, "notes": [],
               "intervals": {"generation": {}}}
    if conditional:
        with evaluating("the sentiment classifier"):
            sentiment = SentimentClassifier(seed=0).fit(train_texts, train_labels)
            results["classifier"]["sentiment_test_accuracy"] = sentiment.accuracy(real_texts, real_labels)
    requested = list(real_labels) if conditional else None
    for variant, pipe in pipes.items():
        with evaluating(f"{variant}: reconstructions"):
            results["reconstruction"][variant] = reconstruction_metrics(pipe.tokenizer, eval_split)
        with evaluating(f"{variant}: {len(real_texts)} samples"):
            out = pipe.generate(num_samples=len(real_texts), class_labels=requested,
                                guidance_scale=guidance_scale if conditional else 1.0, seed=seed,
                                batch_size=SAMPLE_BATCH)
            results["generation"][variant] = text_generation_metrics(out.texts, seen, ngram, sentiment, requested)
            results["intervals"]["generation"][variant] = _text_intervals(out.texts, ngram, sentiment, requested,
                                                                          seed)
            results["text_samples"][variant] = _texts_by_class(out.texts, requested, pipe.class_names)
    with evaluating(f"{len(real_texts)} real texts"):
        results["generation"]["real"] = text_generation_metrics(real_texts, seen, ngram, sentiment, requested)
    results["text_samples"]["real"] = _texts_by_class(real_texts, requested, first.class_names)
    return results


def _texts_by_class(texts: list[str], labels: list[int] | None, names: list[str] | None, per_group: int = 6):
    if labels is None:
        return texts[:per_group * 2]
    groups: dict[str, list[str]] = {}
    for text, label in zip(texts, labels):
        group = groups.setdefault(names[label] if names else str(label), [])
        if len(group) < per_group:
            group.append(text)
    return groups


def evaluate_pipeline_folder(folder: Path, dataset: str | None = None, num_samples: int = 1000, seed: int = 0,
                             guidance_scale: float = 1.0) -> dict:
    """`vqgen evaluate`: the compare metrics for one pipeline folder (its own data set by default)."""
    pipe = VQPipeline.from_pretrained(folder)
    dataset = dataset or pipe.metadata.get("dataset")
    if not dataset:
        raise ValueError(f"{folder} does not record its data set; pass --dataset")
    variant = pipe.tokenizer.config.variant
    if pipe.modality == "image":
        return evaluate_images({variant: pipe}, dataset, num_samples, guidance_scale, Path(folder) / "evaluation", seed)
    return evaluate_texts({variant: pipe}, dataset, num_samples, guidance_scale, seed)
