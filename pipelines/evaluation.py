"""Evaluation without downloaded weights: a seeded feature classifier, image and text sample metrics.

Image metrics use the penultimate features of a small CNN trained (seeded) on the data set's own train
split. Its Frechet distance is called "FD-classifier", never FID: the numbers are not comparable with
published FIDs. True FID and LPIPS are in `optional_pretrained_metrics`, only when their weights are
already on disk. All figures take images as (N, C, R, R) tensors in [-1, 1].
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stage1_tokenizer.configuration import PAD_BYTE
from stage1_tokenizer.data import ImageDataset, Split, load_split, text_dataset, to_square
from stage1_tokenizer.modeling import VQModel
from stage1_tokenizer.precision import fast_autocast
from stage1_tokenizer.quantizer import usage_from_counts

CLASSIFIER_VERSION = 1  # bump when the architecture or the training recipe changes: it is part of the cache key
DEFAULT_CACHE_DIR = Path(os.environ.get("VQGEN_CACHE", "~/.cache/vqgen")) / "classifiers"  # as the code cache
# Training length: EPOCHS passes over the train split, at least MIN_STEPS (small sets such as `digits`
# need more than a few passes), at most `max_steps` (Fashion-MNIST at 32x32: 1000 steps ~ 91% test).
CLASSIFIER_EPOCHS = 3
CLASSIFIER_MIN_STEPS = 200
CLASSIFIER_BATCH_SIZE = 128


# ----------------------------------------------------------------------------------------------------
# Feature classifier
# ----------------------------------------------------------------------------------------------------


class FeatureClassifier(nn.Module):
    """A small seeded CNN over (C, R, R) images in [-1, 1]: `.features` for FD/KID/PR, logits for IS/accuracy."""

    def __init__(self, in_channels: int, resolution: int, num_classes: int, width: int = 32, feature_dim: int = 128):
        super().__init__()
        if resolution < 8:
            raise ValueError(f"resolution={resolution} must be >= 8 for the feature classifier")
        self.in_channels, self.resolution, self.num_classes = in_channels, resolution, num_classes
        self.width, self.feature_dim = width, feature_dim

        def block(cin: int, cout: int, pool: bool) -> list[nn.Module]:
            # Pooling before norm and activation: a quarter of the elementwise work at full resolution.
            conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
            return [conv, *([nn.MaxPool2d(2)] if pool else []), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *block(in_channels, width, pool=True),  # (B, w, R/2, R/2)
            *block(width, 2 * width, pool=True),  # (B, 2w, R/4, R/4)
            *block(2 * width, 4 * width, pool=False), nn.AdaptiveAvgPool2d(2),  # (B, 4w, 2, 2)
            nn.Flatten(),
            nn.Linear(16 * width, feature_dim), nn.ReLU(inplace=True),  # (B, F)
        )
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def config(self) -> dict:
        """Constructor arguments (saved in info.json next to the weights)."""
        return dict(in_channels=self.in_channels, resolution=self.resolution, num_classes=self.num_classes,
                    width=self.width, feature_dim=self.feature_dim)

    def check_images(self, images: torch.Tensor) -> None:
        """Raise ValueError unless `images` is (B, C, R, R) for this classifier."""
        expected = (self.in_channels, self.resolution, self.resolution)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must have shape (B, {', '.join(map(str, expected))}), got {tuple(images.shape)}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, F)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes)."""
        return self.head(self.body(x))


def weights_sha256(module: nn.Module) -> str:
    """sha256 over a module's state dict (names and raw tensor bytes, in name order)."""
    hasher = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        hasher.update(name.encode())
        hasher.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def load_images(dataset: str | Split, split: str, resolution: int, in_channels: int,
                max_items: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, C, R, R) in [-1, 1] and labels (N,) (-1 when unlabelled) of a split ('train' or 'eval')."""
    data = dataset if isinstance(dataset, Split) else load_split(dataset, split, "image")
    items = ImageDataset(data, resolution, in_channels)
    count = len(items) if max_items is None else min(max_items, len(items))
    images = torch.empty(count, in_channels, resolution, resolution)
    labels = torch.empty(count, dtype=torch.long)
    for index in range(count):
        images[index], labels[index] = items[index]
    return images, labels


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def _from_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.float().div(127.5).sub(1.0)


def _accuracy(classifier: FeatureClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    predictions = classifier_outputs(classifier, images)[1].argmax(1)
    return float((predictions == labels).float().mean())


def _train_classifier(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, resolution: int,
                      in_channels: int, seed: int, max_steps: int) -> tuple[FeatureClassifier, int]:
    """Seeded AdamW + one-cycle training on uint8 images; returns the model (eval mode) and its step count."""
    torch.manual_seed(seed)
    model = FeatureClassifier(in_channels, resolution, num_classes).to(memory_format=torch.channels_last)
    steps_per_epoch = max(1, len(train_x) // CLASSIFIER_BATCH_SIZE)
    num_steps = min(max_steps, max(CLASSIFIER_MIN_STEPS, CLASSIFIER_EPOCHS * steps_per_epoch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=num_steps, pct_start=0.15)
    generator = torch.Generator().manual_seed(seed)
    batch = min(CLASSIFIER_BATCH_SIZE, len(train_x))
    order = torch.randperm(len(train_x), generator=generator)
    cursor = 0
    model.train()
    for _ in range(num_steps):
        if cursor + batch > len(order):
            order, cursor = torch.randperm(len(train_x), generator=generator), 0
        index = order[cursor : cursor + batch]
        cursor += batch
        with fast_autocast("cpu"):
            images = _from_uint8(train_x[index]).contiguous(memory_format=torch.channels_last)  # ~30% faster on CPU
            loss = F.cross_entropy(model(images), train_y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval(), num_steps


def load_or_train_classifier(dataset: str, resolution: int, in_channels: int, seed: int = 0,
                             cache_dir: Path | None = None, max_steps: int = 1000) -> tuple[FeatureClassifier, dict]:
    """The data set's feature classifier, trained once (seeded) on its train split and cached on disk."""
    from safetensors.torch import load_file, save_file

    if max_steps < 1:
        raise ValueError(f"max_steps={max_steps!r} must be >= 1")
    dataset = str(dataset)
    train_split = load_split(dataset, "train", "image")
    eval_split = load_split(dataset, "eval", "image")
    if train_split.class_names is None or eval_split.class_names is None:
        raise ValueError(
            f"data set {dataset!r} has no 'label' column: classifier metrics (FD-classifier, KID, IS, "
            "precision/recall, class accuracy) need a labelled data set"
        )
    key_fields = dict(train=train_split.fingerprint, eval=eval_split.fingerprint, resolution=resolution,
                      in_channels=in_channels, seed=seed, max_steps=max_steps, version=CLASSIFIER_VERSION)
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    folder = root / f"{train_split.name}-{resolution}px-c{in_channels}-seed{seed}-{key}"
    weights_path, info_path = folder / "model.safetensors", folder / "info.json"

    if weights_path.exists() and info_path.exists():
        info = json.loads(info_path.read_text())
        classifier = FeatureClassifier(**info["config"])
        classifier.load_state_dict(load_file(str(weights_path)))
        classifier.to(memory_format=torch.channels_last).eval()
        if weights_sha256(classifier) != info["weights_sha256"]:
            raise ValueError(f"cached classifier {folder} does not match its recorded sha256; delete the folder")
        return classifier, {**info, "from_cache": True, "cache_dir": str(folder)}

    start = time.perf_counter()
    train_x, train_y = load_images(train_split, "train", resolution, in_channels)
    test_x, test_y = load_images(eval_split, "eval", resolution, in_channels)
    num_classes = len(train_split.class_names)
    classifier, num_steps = _train_classifier(_to_uint8(train_x), train_y, num_classes, resolution, in_channels,
                                              seed, max_steps)
    info = dict(
        dataset=dataset, train_fingerprint=train_split.fingerprint, eval_fingerprint=eval_split.fingerprint,
        class_names=list(train_split.class_names), config=classifier.config, seed=seed, max_steps=max_steps,
        num_steps=num_steps, batch_size=CLASSIFIER_BATCH_SIZE, num_train=len(train_x), num_test=len(test_x),
        train_accuracy=_accuracy(classifier, train_x[:10000], train_y[:10000]),
        test_accuracy=_accuracy(classifier, test_x, test_y),
        train_seconds=round(time.perf_counter() - start, 2),
        weights_sha256=weights_sha256(classifier), version=CLASSIFIER_VERSION, torch_version=torch.__version__,
        num_threads=torch.get_num_threads(),  # the weights are bit-reproducible for a fixed thread count
    )
    # Write into a temporary sibling, then rename: a concurrent or interrupted run never leaves half a cache.
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=root))
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(staging / "model.safetensors"))
    (staging / "info.json").write_text(json.dumps(info, indent=2))
    try:
        os.replace(staging, folder)
    except OSError:  # another process finished first; its weights are equally valid
        for path in staging.iterdir():
            path.unlink()
        staging.rmdir()
    return classifier, {**info, "from_cache": False, "cache_dir": str(folder)}


def _as_images(images, classifier: FeatureClassifier) -> torch.Tensor:
    """A (N, C, R, R) tensor, or a list of PIL images (converted with the data pipeline's `to_square`)."""
    if not isinstance(images, torch.Tensor):
        images = torch.stack([to_square(image, classifier.resolution, classifier.in_channels) for image in images])
    classifier.check_images(images)
    return images


@torch.no_grad()
def classifier_outputs(classifier: FeatureClassifier, images: torch.Tensor,
                       batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, F) and class probabilities (N, K), in float64, computed in fp32 eval mode."""
    classifier.check_images(images)
    classifier.eval()
    device = next(classifier.parameters()).device
    features, probs = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device=device, dtype=torch.float32)
        batch = batch.contiguous(memory_format=torch.channels_last)  # ~40% faster convolutions on CPU
        feats = classifier.features(batch)
        features.append(feats.double().cpu())
        probs.append(classifier.head(feats).double().softmax(-1).cpu())
    return torch.cat(features), torch.cat(probs)


# ----------------------------------------------------------------------------------------------------
# Image metrics on features and predictions
# ----------------------------------------------------------------------------------------------------


def _as_float64(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    array = np.asarray(values, np.float64)
    if array.ndim != 2:
        raise ValueError(f"features must be a 2-D (N, F) array, got shape {array.shape}")
    return array


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fit to two (N, F) feature sets, in float64.

    ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), with tr((S_a S_b)^(1/2)) taken as the sum of
    square roots of the eigenvalues of the symmetric PSD matrix S_a^(1/2) S_b S_a^(1/2): the same value as
    scipy.linalg.sqrtm, but real by construction (no imaginary parts to discard).
    """
    a, b = _as_float64(feats_a), _as_float64(feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets differ in width: {a.shape[1]} vs {b.shape[1]}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"frechet_distance needs >= 2 samples per set, got {len(a)} and {len(b)}")
    mean_diff = a.mean(0) - b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _sqrt_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    value = mean_diff @ mean_diff + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt
    return float(max(value, 0.0))


def kernel_inception_distance(feats_a, feats_b, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID: unbiased MMD^2 with the kernel (x.y / F + 1)^3 over random subsets; (mean, std) as torchmetrics."""
    a, b = _as_float64(feats_a), _as_float64(feats_b)
    if subset_size < 2 or subset_size > min(len(a), len(b)):
        raise ValueError(f"subset_size={subset_size} must be in [2, min set size = {min(len(a), len(b))}]")
    if subsets < 1:
        raise ValueError(f"subsets={subsets!r} must be >= 1")
    rng = np.random.default_rng(seed)
    dim, m = a.shape[1], subset_size
    scores = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        k_xx, k_yy, k_xy = ((x @ x.T / dim + 1) ** 3, (y @ y.T / dim + 1) ** 3, (x @ y.T / dim + 1) ** 3)
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        scores.append(within - 2 * k_xy.sum() / m**2)
    scores = np.asarray(scores)
    return float(scores.mean()), float(scores.std())


def classifier_inception_score(probs) -> float:
    """exp(E_x KL(p(y|x) || p(y))) over the whole set of (N, K) class probabilities: 1 (no information) .. K."""
    p = _as_float64(probs)
    p = p / p.sum(1, keepdims=True)
    marginal = p.mean(0, keepdims=True)
    kl = (p * (np.log(np.clip(p, 1e-30, None)) - np.log(np.clip(marginal, 1e-30, None)))).sum(1)
    return float(np.exp(kl.mean()))


def _kth_neighbour_radii(feats: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    radii = []
    for start in range(0, len(feats), chunk):
        distances = torch.cdist(feats[start : start + chunk], feats)
        radii.append(distances.kthvalue(k + 1, dim=1).values)  # k + 1: the point itself is at distance 0
    return torch.cat(radii)


def _inside_manifold(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    inside = []
    for start in range(0, len(points), chunk):
        distances = torch.cdist(points[start : start + chunk], centres)  # (chunk, M)
        inside.append((distances <= radii.unsqueeze(0)).any(dim=1))
    return torch.cat(inside)


def precision_recall(real_feats, fake_feats, k: int = 3, chunk: int = 2048) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): k-NN balls around each set's points.

    Precision: share of fakes inside the real manifold (union of balls reaching each real's k-th nearest
    real neighbour); recall: share of reals inside the fake manifold.
    """
    real = torch.from_numpy(_as_float64(real_feats))
    fake = torch.from_numpy(_as_float64(fake_feats))
    if k < 1 or k >= min(len(real), len(fake)):
        raise ValueError(f"k={k!r} must be in [1, min set size - 1 = {min(len(real), len(fake)) - 1}]")
    real_radii = _kth_neighbour_radii(real, k, chunk)
    fake_radii = _kth_neighbour_radii(fake, k, chunk)
    precision = _inside_manifold(fake, real, real_radii, chunk).double().mean()
    recall = _inside_manifold(real, fake, fake_radii, chunk).double().mean()
    return float(precision), float(recall)


def class_histogram_kl(pred_labels_fake, reference, num_classes: int, smoothing: float = 1.0) -> float:
    """KL(reference || fake) between class histograms, each count smoothed by `smoothing` (add-alpha).

    `reference` is either integer labels (predicted classes of real images) or a float class prior of
    length `num_classes`. KL(reference || fake) grows when the samples miss classes the data has.
    """
    fake = torch.as_tensor(pred_labels_fake).long().flatten()
    if fake.numel() == 0:
        raise ValueError("pred_labels_fake is empty")
    if int(fake.min()) < 0 or int(fake.max()) >= num_classes:
        raise ValueError(f"pred_labels_fake must lie in [0, {num_classes - 1}]")
    fake_hist = torch.bincount(fake, minlength=num_classes).double() + smoothing
    reference = torch.as_tensor(reference)
    if reference.is_floating_point():
        if reference.shape != (num_classes,) or bool((reference < 0).any()):
            raise ValueError(f"a class prior must be {num_classes} non-negative numbers, "
                             f"got shape {tuple(reference.shape)}")
        ref_hist = reference.double()
    else:
        ref_labels = reference.long().flatten()
        if ref_labels.numel() == 0 or int(ref_labels.min()) < 0 or int(ref_labels.max()) >= num_classes:
            raise ValueError(f"reference labels must be non-empty and lie in [0, {num_classes - 1}]")
        ref_hist = torch.bincount(ref_labels, minlength=num_classes).double() + smoothing
    p, q = ref_hist / ref_hist.sum(), fake_hist / fake_hist.sum()
    terms = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q.log()), torch.zeros_like(p))
    return float(terms.sum().clamp_min(0.0))


def class_conditional_accuracy(pred_labels, requested_labels) -> float:
    """Share of samples whose predicted class equals the class they were generated for."""
    pred = torch.as_tensor(pred_labels).long().flatten()
    requested = torch.as_tensor(requested_labels).long().flatten()
    if pred.shape != requested.shape or pred.numel() == 0:
        raise ValueError(f"pred_labels ({pred.numel()}) and requested_labels ({requested.numel()}) must be "
                         "non-empty and of equal length")
    return float((pred == requested).double().mean())


def image_generation_metrics(classifier: FeatureClassifier, real_images, fake_images, requested_labels=None,
                             kid_subsets: int = 100, kid_subset_size: int = 1000, k: int = 3,
                             seed: int = 0) -> dict[str, float]:
    """FD-classifier, KID, classifier IS, precision/recall, class-histogram KL (and class accuracy) of samples.

    Keys: fd_classifier, kid_mean, kid_std, inception_score, precision, recall, class_hist_kl, and
    class_accuracy when `requested_labels` is given. The histogram KL compares against the classifier's
    predictions on `real_images`. KID uses `kid_subsets` subsets of min(kid_subset_size, N / 2) images.
    Use the same N of real and fake images and the same seed for every row (see `image_baseline_metrics`).
    """
    real = _as_images(real_images, classifier)
    fake = _as_images(fake_images, classifier)
    real_feats, real_probs = classifier_outputs(classifier, real)
    fake_feats, fake_probs = classifier_outputs(classifier, fake)
    # Subsets of at most half the smaller set, so that they differ and kid_std means something; the
    # unbiased MMD estimate has the same expectation at any subset size.
    subset_size = max(2, min(kid_subset_size, min(len(real), len(fake)) // 2))
    kid_mean, kid_std = kernel_inception_distance(real_feats, fake_feats, kid_subsets, subset_size, seed)
    precision, recall = precision_recall(real_feats, fake_feats, k)
    fake_pred = fake_probs.argmax(1)
    metrics = dict(
        fd_classifier=frechet_distance(real_feats, fake_feats),
        kid_mean=kid_mean,
        kid_std=kid_std,
        inception_score=classifier_inception_score(fake_probs),
        precision=precision,
        recall=recall,
        class_hist_kl=class_histogram_kl(fake_pred, real_probs.argmax(1), classifier.num_classes),
    )
    if requested_labels is not None:
        metrics["class_accuracy"] = class_conditional_accuracy(fake_pred, requested_labels)
    return metrics


def image_baseline_metrics(classifier: FeatureClassifier, real_a, real_b, labels_b=None, **kwargs) -> dict[str, float]:
    """The real-data baseline row: `image_generation_metrics` with real images (e.g. test) standing in for samples.

    `real_a` and `real_b` are disjoint real sets of the same N as the samples being judged (e.g. N train
    images vs N test images); with `labels_b`, class_accuracy is the classifier's accuracy on `real_b`.
    """
    if len(real_a) != len(real_b):
        raise ValueError(f"real_a and real_b must hold the same number of images, got {len(real_a)} and {len(real_b)}")
    return image_generation_metrics(classifier, real_a, real_b, labels_b, **kwargs)


# ----------------------------------------------------------------------------------------------------
# Reconstruction
# ----------------------------------------------------------------------------------------------------


def radial_power_spectrum(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean radially averaged power spectrum of (N, C, H, W) images: (frequencies in cycles/pixel, power).

    Periodic artefacts (a decoder painting stripes) show as excess power at high frequencies against real images.
    """
    x = images.double().mean(1)  # (N, H, W), grey
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fftshift(torch.fft.fft2(x).abs().pow(2), dim=(-2, -1)).mean(0)  # (H, W)
    height, width = power.shape
    fy = torch.fft.fftshift(torch.fft.fftfreq(height, dtype=torch.float64))
    fx = torch.fft.fftshift(torch.fft.fftfreq(width, dtype=torch.float64))
    radius = (fy[:, None].pow(2) + fx[None, :].pow(2)).sqrt()
    bins = torch.round(radius * min(height, width)).long().flatten()  # rings one frequency step wide
    count = torch.bincount(bins)
    total = torch.bincount(bins, weights=power.flatten())
    keep = (count > 0) & (torch.arange(len(count)) > 0) & (torch.arange(len(count)) <= min(height, width) // 2)
    frequencies = torch.arange(len(count), dtype=torch.float64) / min(height, width)
    return frequencies[keep].numpy(), (total[keep] / count[keep]).numpy()


def high_frequency_ratio(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Power above a quarter cycle per pixel (the upper half of the spectrum), relative to the reference's."""
    frequencies, power = radial_power_spectrum(images)
    _, reference_power = radial_power_spectrum(reference)
    high = frequencies > 0.25
    return float(power[high].sum() / max(reference_power[high].sum(), 1e-12))


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor, max_db: float = 100.0) -> torch.Tensor:
    """Per-image PSNR (B,) in dB of [-1, 1] images (range 2: equal to [0, 1] with range 1), capped at max_db."""
    mse = (reference.float() - reconstruction.float()).pow(2).flatten(1).mean(1)
    floor = 4.0 / 10 ** (max_db / 10)  # identical images give max_db instead of inf
    return 10 * torch.log10(4.0 / mse.clamp_min(floor))


def _ssim_per_image(reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    from torchmetrics.functional.image import structural_similarity_index_measure

    side = min(reference.shape[-2:])
    kernel = min(11, side if side % 2 else side - 1)  # the standard 11x11 window, or the largest that fits
    return structural_similarity_index_measure(
        (reconstruction.float() + 1) / 2, (reference.float() + 1) / 2, data_range=1.0,
        kernel_size=kernel, reduction="none",
    )


def _eval_items(model: VQModel, dataset) -> torch.utils.data.Dataset:
    """A data set name/path or Split -> its evaluation items for the model's modality; Datasets pass through."""
    config = model.config
    if isinstance(dataset, (str, os.PathLike)):
        dataset = load_split(str(dataset), "eval", config.modality)
    if isinstance(dataset, Split):
        if config.modality == "image":
            return ImageDataset(dataset, config.resolution, config.in_channels)
        return text_dataset(dataset, config.seq_len)
    if isinstance(dataset, torch.utils.data.Dataset):
        return dataset
    raise TypeError(f"dataset must be a name/path, a Split or a torch Dataset, got {type(dataset).__name__}")


@torch.no_grad()
def reconstruction_metrics(model: VQModel, dataset, classifier: FeatureClassifier | None = None,
                           batch_size: int = 256, max_items: int | None = None) -> dict[str, float]:
    """Reconstruction quality and codebook usage of a tokenizer over (the first `max_items` of) an eval split.

    `dataset` is a name/path (its eval split is used), a Split, or a torch Dataset of (input, label) pairs.
    Images: mse (on [-1, 1]), psnr (dB, per image then averaged, capped at 100), ssim (on [0, 1]), and with a
    classifier fd_classifier (real vs reconstructed) plus, for labelled data, classifier_accuracy
    (reconstructions) and classifier_accuracy_real (originals). Text, one padded record per item:
    byte_accuracy (share of the record's own byte positions, pads beyond the text ignored, decoded
    exactly) and exact_match (share of records with every such byte right). Both: codebook_usage (% of
    codes used over the whole split), perplexity (of that code histogram) and num_items.
    """
    items = _eval_items(model, dataset)
    count = len(items) if max_items is None else min(max_items, len(items))
    if count == 0:
        raise ValueError("reconstruction_metrics got an empty data set")
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(items, range(count)), batch_size=batch_size)
    was_training = model.training
    model.eval()
    device = model.quantizer.embedding.weight.device
    counts = torch.zeros(model.config.codebook_size, dtype=torch.long)
    sums = Counter()
    reals, fakes, labels = [], [], []
    for inputs, batch_labels in loader:
        indices = model.encode(inputs.to(device))
        counts += torch.bincount(indices.flatten().cpu(), minlength=model.config.codebook_size)
        output = model.decode(indices).float().cpu()
        if model.config.modality == "image":
            sums["squared_error"] += float((output - inputs).pow(2).flatten(1).mean(1).double().sum())
            sums["psnr"] += float(psnr(inputs, output).double().sum())
            sums["ssim"] += float(_ssim_per_image(inputs, output).double().sum())
            if classifier is not None:
                reals.append(inputs)
                fakes.append(output)
                labels.append(batch_labels)
        else:
            predicted = output.argmax(1)  # (B, L) byte ids, PAD_BYTE included
            mask = inputs != PAD_BYTE
            correct = (predicted == inputs) & mask
            sums["bytes"] += int(mask.sum())
            sums["correct_bytes"] += int(correct.sum())
            sums["exact"] += int((correct.sum(1) == mask.sum(1)).sum())
    if was_training:
        model.train()

    metrics: dict[str, float] = {}
    if model.config.modality == "image":
        metrics.update(mse=sums["squared_error"] / count, psnr=sums["psnr"] / count, ssim=sums["ssim"] / count)
        if classifier is not None:
            real, fake, label = torch.cat(reals), torch.cat(fakes), torch.cat(labels)
            real_feats, real_probs = classifier_outputs(classifier, real)
            fake_feats, fake_probs = classifier_outputs(classifier, fake)
            metrics["fd_classifier"] = frechet_distance(real_feats, fake_feats)
            if bool((label >= 0).all()):
                metrics["classifier_accuracy"] = float((fake_probs.argmax(1) == label).double().mean())
                metrics["classifier_accuracy_real"] = float((real_probs.argmax(1) == label).double().mean())
    else:
        metrics.update(byte_accuracy=sums["correct_bytes"] / max(sums["bytes"], 1), exact_match=sums["exact"] / count)
    metrics.update(usage_from_counts(counts))
    metrics["num_items"] = count
    return metrics


# ----------------------------------------------------------------------------------------------------
# Text samples
# ----------------------------------------------------------------------------------------------------


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al. 2016) over whitespace-split words: unique n-grams / all n-grams across the texts."""
    grams = [gram for text in texts for gram in _ngrams(text.split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _ngram_counts(tokens: Sequence[str]) -> list[Counter]:
    return [Counter(_ngrams(tokens, n)) for n in range(1, 5)]


def _bleu4(hyp: list[Counter], hyp_len: int, refs: Sequence[list[Counter]], ref_lens: Sequence[int],
           epsilon: float) -> float:
    if hyp_len == 0 or not refs:
        return 0.0
    log_precision = 0.0
    for n in range(4):
        max_ref = Counter()
        for ref in refs:
            max_ref |= ref[n]  # element-wise max: clipping against the best reference for each n-gram
        clipped = sum(min(value, max_ref[gram]) for gram, value in hyp[n].items())
        total = max(sum(hyp[n].values()), 1)
        log_precision += math.log((clipped if clipped > 0 else epsilon) / total) / 4
    # Brevity penalty against the reference length closest to the hypothesis length (shorter on ties).
    ref_len = min((abs(length - hyp_len), length) for length in ref_lens)[1]
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(log_precision)


def sentence_bleu4(hypothesis: Sequence[str], references: Sequence[Sequence[str]], epsilon: float = 0.1) -> float:
    """Sentence BLEU-4 of one token list against several; a zero n-gram match counts as `epsilon`.

    The smoothing is NLTK's method1, as in Texygen's self-BLEU (Zhu et al. 2018). A hypothesis shorter than
    4 words has no 4-grams, so its 4-gram precision is epsilon / 1 and its BLEU stays below 1.
    """
    return _bleu4(_ngram_counts(hypothesis), len(hypothesis), [_ngram_counts(r) for r in references],
                  [len(r) for r in references], epsilon)


def self_bleu4(texts: Sequence[str], max_hypotheses: int = 200, max_references: int = 100, seed: int = 0) -> float:
    """Self-BLEU-4 (Zhu et al. 2018), word level: mean BLEU-4 of each sample against the others.

    Bounded for speed: at most `max_hypotheses` samples, each against at most `max_references` others
    (seeded random subsets).
    """
    if len(texts) < 2:
        raise ValueError(f"self-BLEU needs >= 2 texts, got {len(texts)}")
    rng = random.Random(seed)
    tokens = [text.split() for text in texts]
    counts = [_ngram_counts(t) for t in tokens]
    hypotheses = rng.sample(range(len(texts)), min(max_hypotheses, len(texts)))
    scores = []
    for index in hypotheses:
        others = [j for j in range(len(texts)) if j != index]
        chosen = rng.sample(others, min(max_references, len(others)))
        scores.append(_bleu4(counts[index], len(tokens[index]), [counts[j] for j in chosen],
                             [len(tokens[j]) for j in chosen], epsilon=0.1))
    return float(np.mean(scores))


class CharNgramModel:
    """Interpolated Kneser-Ney byte n-gram model (Chen and Goodman 1998); backs off to uniform over 256 bytes.

    "Characters" are UTF-8 bytes, so unseen symbols still get probability > 0 and perplexity is finite.
    """

    def __init__(self, order: int = 5, discount: float = 0.75):
        if order < 1:
            raise ValueError(f"order={order!r} must be >= 1")
        if not 0 < discount < 1:
            raise ValueError(f"discount={discount!r} must be in (0, 1)")
        self.order, self.discount = order, discount
        self.counts: list[Counter] = []  # counts[n-1][gram of n bytes]: raw for n = order, continuation below
        self.context_totals: list[Counter] = []
        self.context_types: list[Counter] = []

    def fit(self, texts: Sequence[str], max_bytes: int | None = None) -> "CharNgramModel":
        """Count n-grams of the texts' UTF-8 bytes (each text on its own, joined by newlines)."""
        data = "\n".join(texts).encode("utf-8")[:max_bytes]
        if not data:
            raise ValueError("CharNgramModel.fit got no text")
        counts = {self.order: Counter(data[i : i + self.order] for i in range(len(data) - self.order + 1))}
        for n in range(1, self.order):
            # Kneser-Ney continuation count of an n-gram: the number of distinct bytes seen before it.
            distinct = {data[i : i + n + 1] for i in range(len(data) - n)}
            counts[n] = Counter(gram[1:] for gram in distinct)
        self.counts = [counts[n] for n in range(1, self.order + 1)]
        self.context_totals, self.context_types = [], []
        for table in self.counts:
            totals, types = Counter(), Counter()
            for gram, value in table.items():
                totals[gram[:-1]] += value
                types[gram[:-1]] += 1
            self.context_totals.append(totals)
            self.context_types.append(types)
        return self

    def probability(self, context: bytes, symbol: int) -> float:
        """P(symbol | the last order-1 bytes of context), interpolated down to the uniform distribution."""
        prob = 1.0 / 256
        for n in range(1, min(self.order, len(context) + 1) + 1):
            history = context[-(n - 1):] if n > 1 else b""
            total = self.context_totals[n - 1].get(history, 0)
            if total == 0:
                continue
            count = self.counts[n - 1].get(history + bytes([symbol]), 0)
            weight = self.discount * self.context_types[n - 1][history] / total
            prob = max(count - self.discount, 0) / total + weight * prob
        return prob

    def perplexity(self, texts: Sequence[str]) -> float:
        """exp(mean negative log-likelihood per byte) over the texts, each scored from an empty context."""
        if not self.counts:
            raise ValueError("CharNgramModel is not fitted; call fit(texts) first")
        nll, num_bytes = 0.0, 0
        for text in texts:
            data = text.encode("utf-8")
            for i in range(len(data)):
                nll -= math.log(self.probability(data[max(0, i - self.order + 1) : i], data[i]))
            num_bytes += len(data)
        if num_bytes == 0:
            raise ValueError("perplexity needs at least one non-empty text")
        return math.exp(nll / num_bytes)


class SentimentClassifier:
    """TF-IDF (word 1-2 grams) + logistic regression, fit on a labelled train split; judges sample sentiment."""

    def __init__(self, seed: int = 0):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        self.model = make_pipeline(
            TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
            LogisticRegression(C=4.0, max_iter=1000, random_state=seed),
        )
        self.test_accuracy: float | None = None
        self.class_names: list[str] | None = None

    def fit(self, texts: Sequence[str], labels: Sequence[int]) -> "SentimentClassifier":
        """Fit on texts and integer labels."""
        if len(texts) != len(labels) or not texts:
            raise ValueError(f"texts ({len(texts)}) and labels ({len(labels)}) must be non-empty and of equal length")
        self.model.fit(list(texts), list(labels))
        return self

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """Predicted integer labels."""
        return self.model.predict(list(texts))

    def accuracy(self, texts: Sequence[str], labels: Sequence[int]) -> float:
        """Share of texts whose predicted label equals the given one."""
        return float((self.predict(texts) == np.asarray(labels)).mean())

    @classmethod
    def from_dataset(cls, dataset: str, max_train: int | None = None, seed: int = 0) -> "SentimentClassifier":
        """Fit on a labelled text data set's train split (first `max_train`); record the eval accuracy (ceiling)."""
        train, test = load_split(dataset, "train", "text"), load_split(dataset, "eval", "text")
        if train.class_names is None or test.class_names is None:
            raise ValueError(f"data set {dataset!r} has no 'label' column: "
                             "the sentiment classifier needs labelled text")
        train_texts, train_labels = texts_and_labels(train, max_train)
        test_texts, test_labels = texts_and_labels(test)
        classifier = cls(seed).fit(train_texts, train_labels)
        classifier.test_accuracy = classifier.accuracy(test_texts, test_labels)
        classifier.class_names = list(train.class_names)
        return classifier


def texts_and_labels(split: Split, max_items: int | None = None) -> tuple[list[str], list[int] | None]:
    """The first `max_items` texts of a text split and their integer labels (None for unlabelled data)."""
    records = split.records[: max_items if max_items is not None else len(split)]
    if isinstance(records, list):  # built-ins: a list of dicts
        texts = [r[split.column] for r in records]
        labels = [int(r["label"]) for r in records] if split.class_names is not None else None
    else:  # a datasets.Dataset slice: a dict of columns
        texts = list(records[split.column])
        labels = [int(v) for v in records["label"]] if split.class_names is not None else None
    return [t if t is not None else "" for t in texts], labels




def text_generation_metrics(texts: list[str], train_texts: list[str], ngram_model: CharNgramModel | None = None,
                            sentiment: SentimentClassifier | None = None,
                            requested_labels: Sequence[int] | None = None) -> dict[str, float]:
    """Diversity, length, n-gram perplexity and sentiment agreement of text samples.

    Keys: distinct_1, distinct_2, distinct_3 (word level), self_bleu4 (word level), length_mean, length_std,
    length_min, length_max (UTF-8 bytes), ngram_perplexity (per byte, under `ngram_model`, or an order-5
    CharNgramModel fit on `train_texts`), and sentiment_agreement when both `sentiment` and
    `requested_labels` are given.
    """
    if not texts:
        raise ValueError("text_generation_metrics got no texts")
    if ngram_model is None:
        ngram_model = CharNgramModel(order=5).fit(train_texts)
    lengths = np.array([len(t.encode("utf-8")) for t in texts], dtype=np.float64)
    metrics = {f"distinct_{n}": distinct_n(texts, n) for n in (1, 2, 3)}
    metrics.update(
        self_bleu4=self_bleu4(texts),
        length_mean=float(lengths.mean()),
        length_std=float(lengths.std()),
        length_min=float(lengths.min()),
        length_max=float(lengths.max()),
        ngram_perplexity=ngram_model.perplexity([t for t in texts if t]) if any(texts) else float("inf"),
    )
    if sentiment is not None and requested_labels is not None:
        if len(requested_labels) != len(texts):
            raise ValueError(f"requested_labels ({len(requested_labels)}) must match texts ({len(texts)})")
        metrics["sentiment_agreement"] = sentiment.accuracy(texts, requested_labels)
    return metrics


def text_baseline_metrics(real_texts: list[str], train_texts: list[str], ngram_model: CharNgramModel | None = None,
                          sentiment: SentimentClassifier | None = None,
                          labels: Sequence[int] | None = None) -> dict[str, float]:
    """The real-data baseline row: `text_generation_metrics` of N held-out real texts (with their true labels)."""
    return text_generation_metrics(real_texts, train_texts, ngram_model, sentiment, labels)


# ----------------------------------------------------------------------------------------------------
# Pretrained-weight metrics, only when the weights are already on disk
# ----------------------------------------------------------------------------------------------------

FID_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's InceptionV3 (torchmetrics FID)


def _hub_checkpoint(filename: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def optional_pretrained_metrics(real_images: torch.Tensor, fake_images: torch.Tensor,
                                paired: bool = False) -> tuple[dict[str, float], list[str]]:
    """True FID (torchmetrics, InceptionV3) and, for paired images, LPIPS (VGG), only if weights are cached.

    Returns (metrics, notes): metrics holds "fid" and/or "lpips_vgg" when computed, notes say why a metric
    was skipped. Nothing is downloaded: the torch hub cache is checked for the weight files first.
    `paired=True` means fake_images[i] is a reconstruction of real_images[i] (LPIPS needs pairs).
    """
    metrics: dict[str, float] = {}
    notes: list[str] = []
    to_unit_rgb = lambda x: ((x.float().clamp(-1, 1) + 1) / 2).expand(-1, 3, -1, -1)  # (N, 3, R, R) in [0, 1]

    fid_file = _hub_checkpoint(FID_WEIGHTS_FILE)
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics' FID feature extractor)
        has_fidelity = True
    except ImportError:
        has_fidelity = False
    if not has_fidelity:
        notes.append("fid skipped: torch-fidelity is not installed (pip install torch-fidelity)")
    elif not fid_file.exists():
        notes.append(f"fid skipped: InceptionV3 weights not in the torch hub cache ({fid_file}); nothing is downloaded")
    else:
        from torchmetrics.image.fid import FrechetInceptionDistance

        fid = FrechetInceptionDistance(feature=2048, normalize=True)
        for images, real in ((real_images, True), (fake_images, False)):
            for start in range(0, len(images), 64):
                fid.update(to_unit_rgb(images[start : start + 64]), real=real)
        metrics["fid"] = float(fid.compute())

    if paired:
        from torchvision.models import VGG16_Weights

        vgg_file = _hub_checkpoint(Path(VGG16_Weights.IMAGENET1K_V1.url).name)
        if not vgg_file.exists():
            notes.append(f"lpips skipped: VGG16 ImageNet weights not in the torch hub cache ({vgg_file}); "
                         "nothing is downloaded")
        elif len(real_images) != len(fake_images):
            raise ValueError(f"paired LPIPS needs equal counts, got {len(real_images)} and {len(fake_images)}")
        else:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            lpips = LearnedPerceptualImagePatchSimilarity(net_type="vgg", normalize=True)
            for start in range(0, len(real_images), 64):
                lpips.update(to_unit_rgb(fake_images[start : start + 64]), to_unit_rgb(real_images[start : start + 64]))
            metrics["lpips_vgg"] = float(lpips.compute())
    return metrics, notes
