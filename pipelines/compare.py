"""`vqgen compare`: train VQ-VAE and VQGAN tokenizers under one budget, a prior on each, and judge the samples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from stage1_tokenizer.data import load_split, text_dataset
from stage1_tokenizer.evaluation import reconstruction_metrics
from stage1_tokenizer.modeling_text import bytes_to_strings
from stage1_tokenizer.threads import set_torch_threads

from .classifier import load_images, load_or_train_classifier
from .image_metrics import high_frequency_ratio, image_baseline_metrics, image_generation_metrics, radial_power_spectrum
from .pretrained_metrics import optional_pretrained_metrics
from .text_metrics import CharNgramModel, SentimentClassifier, text_generation_metrics, texts_and_labels
from .pipeline import VQPipeline
from .report import COLUMN_NAMES

VARIANTS = ("vqvae", "vqgan")
DEFAULT_DATASETS = {"image": "digits", "text": "python-docs"}

# Everything both variants share; only the objective differs between them.
BUDGETS: dict[str, dict] = {
    # Offline, digits (16x16 -> 8x8 codes) in a few minutes on 2 idle CPU cores (fp32): tiny tokenizers run at
    # ~11 (VQ-VAE) and ~7 (VQGAN, discriminator on) steps/s, the tiny prior at ~25 steps/s: 5 min 22 s measured
    # (54 + 90 s tokenizers, 82 + 79 s priors). 800 prior steps saved 1 min but cut class accuracy from 84% to 64%.
    "quick": dict(tokenizer_preset="tiny", tokenizer_steps=500, tokenizer_batch=32, disc_start=150,
                  prior_preset="tiny", prior_steps=1500, prior_batch=32, num_eval_samples=360, guidance_scale=2.0),
    # Fashion-MNIST (32x32 -> 8x8 codes) in under an hour on 2 CPU cores *without* fast bf16 (fp32 throughout,
    # e.g. an AVX2-only CPU): measured 0.55 s per VQ-VAE step and 0.65-0.9 s per VQGAN step at batch 32.
    "standard": dict(tokenizer_preset="small", tokenizer_steps=1200, tokenizer_batch=32, disc_start=400,
                     prior_preset="small", prior_steps=1000, prior_batch=32, num_eval_samples=2000,
                     guidance_scale=2.0),
}
# Per-modality changes to a budget (text models are 1-D and far cheaper per step than image models).
MODALITY_BUDGETS: dict[str, dict[str, dict]] = {"text": {
    # python-docs: the `small` text tokenizer (the `tiny` one has 64 codes for 2 bytes: too few to read back).
    "quick": dict(tokenizer_preset="small", tokenizer_steps=600, disc_start=200),
    # tiny-shakespeare / SST-2: ~7 tokenizer steps/s at batch 32 on 2 cores; 3000 steps reach 97% byte accuracy.
    "standard": dict(tokenizer_steps=3000, disc_start=1000),
}}


# A discriminator "separated" real from fake when, over the last quarter of its logged steps, its hinge loss
# fell below this (1.0 is chance: logits near 0) and it put most real and most fake patches on their own side.
SEPARATED_MAX_LOSS = 0.95
SEPARATED_MIN_ACCURACY = 0.55
HEALTH_KEYS = ("disc_loss", "logits_real", "logits_fake", "disc_acc_real", "disc_acc_fake", "gan_weight",
               "adaptive_weight")


def gan_health(log_rows: list[dict]) -> dict | None:
    """The discriminator's state over the last quarter of its logged steps (a VQGAN metrics.jsonl); None if none."""
    rows = [row for row in log_rows if "disc_loss" in row]
    if not rows:
        return None
    tail = rows[len(rows) - max(1, len(rows) // 4):]
    health = {key: sum(row[key] for row in tail) / len(tail) for key in HEALTH_KEYS if key in tail[0]}
    health.update(first_step=tail[0]["step"], last_step=tail[-1]["step"])
    accuracy = min(health.get("disc_acc_real", 0.0), health.get("disc_acc_fake", 0.0))
    health["separated"] = health["disc_loss"] <= SEPARATED_MAX_LOSS and accuracy >= SEPARATED_MIN_ACCURACY
    return health


def budget_settings(budget: str, modality: str) -> dict:
    """The settings of a named budget for one modality: BUDGETS[budget] with MODALITY_BUDGETS' changes."""
    if budget not in BUDGETS:
        raise ValueError(f"budget {budget!r} is unknown; expected one of {list(BUDGETS)}")
    return {**BUDGETS[budget], **MODALITY_BUDGETS.get(modality, {}).get(budget, {})}


def _run(module: str, arguments: list[str], log_path: Path) -> None:
    """Run a training script in a child process (fresh memory, its own progress bar); fail loudly."""
    command = [sys.executable, "-m", module, *arguments]
    print(f"$ {' '.join(command)}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      env=env, text=True) as process:
        for line in process.stdout:
            log.write(line)
            sys.stdout.write(line)
            sys.stdout.flush()
        code = process.wait()
    if code != 0:
        raise RuntimeError(f"{module} exited with status {code}; its output is in {log_path}")


def _reusable(folder: Path, settings: dict, done_file: str) -> bool:
    stamp = folder / "compare_settings.json"
    return (folder / done_file).is_file() and stamp.is_file() and json.loads(stamp.read_text()) == settings


def train_variant(variant: str, dataset: str, modality: str, budget: dict, output_dir: Path, seed: int,
                  class_conditional: bool, perceptual_backend: str, force: bool) -> dict:
    """Train (or reuse) one tokenizer and its prior; returns wall-clock seconds of each stage."""
    timings = {}
    tokenizer_dir = output_dir / "tokenizers" / variant
    settings = dict(variant=variant, dataset=dataset, modality=modality, seed=seed, perceptual=perceptual_backend,
                    **{k: budget[k] for k in ("tokenizer_preset", "tokenizer_steps", "tokenizer_batch", "disc_start")})
    if force or not _reusable(tokenizer_dir, settings, "model.safetensors"):
        tokenizer_dir.mkdir(parents=True, exist_ok=True)
        (tokenizer_dir / "compare_settings.json").unlink(missing_ok=True)
        start = time.time()
        _run("stage1_tokenizer.train", [
            "--dataset", dataset, "--modality", modality, "--variant", variant,
            "--preset", budget["tokenizer_preset"], "--max-steps", str(budget["tokenizer_steps"]),
            "--batch-size", str(budget["tokenizer_batch"]), "--disc-start", str(budget["disc_start"]),
            "--perceptual", perceptual_backend, "--seed", str(seed), "--output-dir", str(tokenizer_dir),
        ], output_dir / f"train_tokenizer_{variant}.log")
        timings["tokenizer_seconds"] = time.time() - start
        (tokenizer_dir / "compare_settings.json").write_text(json.dumps(settings))
    else:
        print(f"reusing the {variant} tokenizer in {tokenizer_dir} (pass --force to retrain)")

    prior_dir = output_dir / "pipelines" / variant
    prior_settings = dict(settings, prior_preset=budget["prior_preset"], prior_steps=budget["prior_steps"],
                          prior_batch=budget["prior_batch"],
                          class_conditional=class_conditional,
                          tokenizer_weights_mtime=(tokenizer_dir / "model.safetensors").stat().st_mtime)
    if force or "tokenizer_seconds" in timings or not _reusable(prior_dir, prior_settings, "pipeline_config.json"):
        prior_dir.mkdir(parents=True, exist_ok=True)
        (prior_dir / "compare_settings.json").unlink(missing_ok=True)
        start = time.time()
        _run("stage2_prior.train", [
            "--tokenizer", str(tokenizer_dir), "--dataset", dataset, "--preset", budget["prior_preset"],
            "--max-steps", str(budget["prior_steps"]), "--batch-size", str(budget["prior_batch"]),
            "--seed", str(seed), "--output-dir", str(prior_dir),
            *(["--class-conditional"] if class_conditional else []),
        ], output_dir / f"train_prior_{variant}.log")
        timings["prior_seconds"] = time.time() - start
        (prior_dir / "compare_settings.json").write_text(json.dumps(prior_settings))
    else:
        print(f"reusing the {variant} prior in {prior_dir} (pass --force to retrain)")
    return timings


def _grid(images: torch.Tensor, nrow: int) -> Image.Image:
    """(N, C, H, W) in [-1, 1] -> a PIL grid."""
    from torchvision.utils import make_grid

    grid = make_grid((images.float().clamp(-1, 1) + 1) / 2, nrow=nrow, padding=2, pad_value=1.0)
    return Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))


def _generate_images(pipe: VQPipeline, labels: list[int] | None, count: int, guidance: float, seed: int,
                     batch_size: int = 250) -> torch.Tensor:
    out = pipe.generate(num_samples=count, class_labels=labels, guidance_scale=guidance if labels else 1.0,
                        seed=seed, batch_size=batch_size, output_type="pt")
    return out.images * 2 - 1  # back to [-1, 1]


def _per_class_images(images: torch.Tensor, labels: torch.Tensor, num_classes: int, per_class: int) -> torch.Tensor:
    rows = []
    for c in range(num_classes):
        chosen = images[labels == c][:per_class]
        if len(chosen) < per_class:  # pad a short class with blanks so rows stay aligned
            chosen = torch.cat([chosen, torch.ones(per_class - len(chosen), *images.shape[1:])])
        rows.append(chosen)
    return torch.cat(rows)


def evaluate_images(pipes: dict[str, VQPipeline], dataset: str, budget: dict, output_dir: Path, seed: int) -> dict:
    """Reconstruction + generation metrics and figures for image pipelines, with a real-data baseline."""
    first = next(iter(pipes.values()))
    config = first.tokenizer.config
    classifier, classifier_info = load_or_train_classifier(dataset, config.resolution, config.in_channels, seed)
    count = budget["num_eval_samples"]
    real_test, test_labels = load_images(dataset, "eval", config.resolution, config.in_channels, max_items=count)
    real_train, _ = load_images(dataset, "train", config.resolution, config.in_channels, max_items=len(real_test))
    count = len(real_test)
    conditional = first.layout.conditional
    requested = test_labels.tolist() if conditional else None  # same class histogram as the real rows
    figures = output_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    results = {"classifier": classifier_info, "reconstruction": {}, "generation": {}, "figures": {
        "samples": {}, "reconstructions": {}}, "notes": []}
    num_classes = first.layout.num_classes
    per_class = 8
    real_grid = _per_class_images(real_test, test_labels, num_classes, per_class) if conditional else real_test[:64]
    _grid(real_grid, per_class if conditional else 8).save(figures / "samples_real.png")
    results["figures"]["samples"]["real"] = "figures/samples_real.png"
    spectra = {"real test images": radial_power_spectrum(real_test)}
    for variant, pipe in pipes.items():
        print(f"evaluating {variant}: reconstructions")
        results["reconstruction"][variant] = reconstruction_metrics(pipe.tokenizer, dataset, classifier)
        with torch.no_grad():
            recon_all = torch.cat([pipe.tokenizer.decode(pipe.tokenizer.encode(real_test[i:i + 250])).float().cpu()
                                   for i in range(0, count, 250)])
        results["reconstruction"][variant]["high_frequency_ratio"] = high_frequency_ratio(recon_all, real_test)
        spectra[f"{COLUMN_NAMES[variant]} reconstructions"] = radial_power_spectrum(recon_all)
        originals, recon = real_test[:8], recon_all[:8]
        _grid(torch.cat([originals, recon]), 8).save(figures / f"reconstructions_{variant}.png")
        results["figures"]["reconstructions"][variant] = f"figures/reconstructions_{variant}.png"
        print(f"evaluating {variant}: {count} samples")
        fake = _generate_images(pipe, requested, count, budget["guidance_scale"], seed)
        results["generation"][variant] = image_generation_metrics(classifier, real_test, fake, requested)
        results["generation"][variant]["high_frequency_ratio"] = high_frequency_ratio(fake, real_test)
        spectra[f"{COLUMN_NAMES[variant]} samples"] = radial_power_spectrum(fake)
        grid = _per_class_images(fake, torch.tensor(requested), num_classes, per_class) if conditional else fake[:64]
        _grid(grid, per_class if conditional else 8).save(figures / f"samples_{variant}.png")
        results["figures"]["samples"][variant] = f"figures/samples_{variant}.png"
        extra, notes = optional_pretrained_metrics(real_test, fake)
        results["generation"][variant].update(extra)
        results["notes"] += [n for n in notes if n not in results["notes"]]
    results["reconstruction"]["real"] = {"classifier_accuracy": classifier_info.get("test_accuracy"),
                                         "high_frequency_ratio": 1.0}
    results["generation"]["real"] = image_baseline_metrics(classifier, real_train, real_test,
                                                           test_labels if conditional else None)
    results["generation"]["real"]["high_frequency_ratio"] = high_frequency_ratio(real_train, real_test)
    _spectrum_figure(spectra).savefig(figures / "power_spectrum.png", format="png", dpi=100)
    results["figures"]["spectrum"] = "figures/power_spectrum.png"
    return results


def _spectrum_figure(spectra: dict):
    """Radially averaged power spectra on a log scale: stripes and checkerboards show as a high-frequency excess."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 3.8), layout="constrained")
    axis = figure.subplots()
    styles = {"real": dict(color="#1f2328", linewidth=2.2), "VQ-VAE": dict(color="#1f77b4"),
              "VQGAN": dict(color="#d95f02")}
    for label, (frequencies, power) in spectra.items():
        style = next(v for k, v in styles.items() if label.startswith(k))
        axis.plot(frequencies, power, linestyle="--" if label.endswith("samples") else "-", label=label,
                  **{"linewidth": 1.5, **style})
    axis.set_yscale("log")
    axis.axvline(0.25, color="#59636e", linestyle=":", linewidth=1.0)
    axis.set_xlabel("spatial frequency (cycles / pixel)")
    axis.set_ylabel("power")
    axis.set_title("Radially averaged power spectrum (right of the dotted line: high frequencies)", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(frameon=False, fontsize=8)
    return figure


def evaluate_texts(pipes: dict[str, VQPipeline], dataset: str, budget: dict, seed: int) -> dict:
    """Reconstruction + sample metrics for text pipelines, with a real-text baseline and sample texts."""
    first = next(iter(pipes.values()))
    count = budget["num_eval_samples"]
    train_split = load_split(dataset, "train", "text")
    train_texts, train_labels = texts_and_labels(train_split, None)
    # Real rows: held-out sequences exactly as the tokenizer sees them (records if labelled, else windows).
    held_out = text_dataset(load_split(dataset, "eval", "text"), first.tokenizer.config.seq_len)
    count = min(count, len(held_out))
    real_texts = bytes_to_strings(held_out.windows[:count])
    real_labels = held_out.labels[:count].tolist() if held_out.has_labels else None
    ngram = CharNgramModel(order=5).fit(train_texts)
    conditional = first.layout.conditional
    sentiment = None
    results = {"classifier": {}, "reconstruction": {}, "generation": {}, "text_samples": {}, "notes": []}
    if conditional:
        sentiment = SentimentClassifier(seed=seed).fit(train_texts, train_labels)
        results["classifier"]["sentiment_test_accuracy"] = sentiment.accuracy(real_texts, real_labels)
    requested = list(real_labels) if conditional else None
    for variant, pipe in pipes.items():
        results["reconstruction"][variant] = reconstruction_metrics(pipe.tokenizer, dataset)
        out = pipe.generate(num_samples=len(real_texts), class_labels=requested,
                            guidance_scale=budget["guidance_scale"] if conditional else 1.0, seed=seed, batch_size=250)
        results["generation"][variant] = text_generation_metrics(out.texts, train_texts, ngram, sentiment, requested)
        results["text_samples"][variant] = _texts_by_class(out.texts, requested, pipe.class_names)
    results["generation"]["real"] = text_generation_metrics(real_texts, train_texts, ngram, sentiment, requested)
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
    budget = {"num_eval_samples": num_samples, "guidance_scale": guidance_scale}
    variant = pipe.tokenizer.config.variant
    if pipe.modality == "image":
        return evaluate_images({variant: pipe}, dataset, budget, Path(folder) / "evaluation", seed)
    return evaluate_texts({variant: pipe}, dataset, budget, seed)


def run_compare(dataset: str | None, modality: str, budget: str, output_dir: Path, seed: int = 0,
                class_conditional: bool | None = None, force: bool = False,
                perceptual_backend: str = "random-vgg", threads: int | None = None) -> dict:
    """Train both variants under identical settings, evaluate them, and write metrics.json and the report."""
    from .report import write_report

    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the training processes inherit it
    set_torch_threads(threads)
    started = time.time()
    dataset = dataset or DEFAULT_DATASETS[modality]
    settings = budget_settings(budget, modality)
    class_names = load_split(dataset, "train", modality).class_names
    if class_conditional is None:
        class_conditional = class_names is not None
    if class_conditional and class_names is None:
        raise ValueError(f"--class-conditional needs a labelled data set; {dataset!r} has no 'label' column")
    output_dir.mkdir(parents=True, exist_ok=True)
    training = {}
    for variant in VARIANTS:
        print(f"== {variant}: tokenizer and prior ({budget} budget) ==", flush=True)
        training[variant] = train_variant(variant, dataset, modality, settings, output_dir, seed, class_conditional,
                                          perceptual_backend, force)
    print("== evaluation ==", flush=True)
    pipes = {v: VQPipeline.from_pretrained(output_dir / "pipelines" / v) for v in VARIANTS}
    if modality == "image":
        results = evaluate_images(pipes, dataset, settings, output_dir, seed)
    else:
        results = evaluate_texts(pipes, dataset, settings, seed)
    results["prior"] = {v: p.metadata.get("prior_metrics", {}) for v, p in pipes.items()}
    log_path = output_dir / "tokenizers" / "vqgan" / "metrics.jsonl"
    if log_path.is_file():
        results["gan_health"] = gan_health([json.loads(line) for line in log_path.read_text().splitlines() if line])
    results["training"] = training
    results["settings"] = dict(
        dataset=dataset, modality=modality, budget=budget, seed=seed, class_conditional=class_conditional,
        class_names=class_names if class_conditional else None, perceptual_backend=perceptual_backend,
        elapsed_seconds=time.time() - started, library_versions=pipes["vqvae"].config_dict()["library_versions"],
        **{k: v for k, v in settings.items()},
    )
    for variant, pipe in pipes.items():  # the model cards state what the comparison measured
        pipe.metadata["evaluation_metrics"] = {
            group: results[group][variant] for group in ("reconstruction", "generation") if variant in results[group]}
        pipe.save_metadata(output_dir / "pipelines" / variant)
    (output_dir / "metrics.json").write_text(json.dumps(results, indent=2, default=float))
    html, markdown = write_report(output_dir, results)
    print(f"wrote {html}, {markdown} and {output_dir / 'metrics.json'}")
    return results
