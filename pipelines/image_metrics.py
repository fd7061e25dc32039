"""Image sample metrics in the feature classifier's space, with a real-data baseline row, and power spectra.

FD-classifier ("FD-classifier", never FID: not comparable with published FIDs), KID and the classifier
Inception Score come from torchmetrics with the classifier as a custom feature extractor; precision/recall
(k-NN manifolds) and the class-histogram KL, which torchmetrics lacks, are computed here. Images are
(N, C, R, R) tensors in [-1, 1] or lists of PIL images.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from stage1_tokenizer.evaluation import ClassifierFeatures

from .classifier import FeatureClassifier, as_images, predict_classes


def _as_float64(values) -> torch.Tensor:
    values = torch.as_tensor(values).detach().to("cpu", torch.float64)
    if values.dim() != 2:
        raise ValueError(f"features must be a 2-D (N, F) array, got shape {tuple(values.shape)}")
    return values


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
    real, fake = _as_float64(real_feats), _as_float64(fake_feats)
    if k < 1 or k >= min(len(real), len(fake)):
        raise ValueError(f"k={k!r} must be in [1, min set size - 1 = {min(len(real), len(fake)) - 1}]")
    real_radii = _kth_neighbour_radii(real, k, chunk)
    fake_radii = _kth_neighbour_radii(fake, k, chunk)
    precision = _inside_manifold(fake, real, real_radii, chunk).double().mean()
    recall = _inside_manifold(real, fake, fake_radii, chunk).double().mean()
    return float(precision), float(recall)


def inside_real_manifold(real_feats, fake_feats, k: int = 3, chunk: int = 2048) -> torch.Tensor:
    """Per fake sample, whether it lies in the real k-NN manifold: precision's per-sample form (its mean)."""
    real, fake = _as_float64(real_feats), _as_float64(fake_feats)
    return _inside_manifold(fake, real, _kth_neighbour_radii(real, k, chunk), chunk)


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
                             kid_subsets: int = 100, kid_subset_size: int = 1000, k: int = 3, seed: int = 0,
                             batch_size: int = 512) -> dict[str, float]:
    """FD-classifier, KID, classifier IS, precision/recall, class-histogram KL (and class accuracy) of samples.

    Keys: fd_classifier, kid_mean, kid_std, inception_score, precision, recall, class_hist_kl, and
    class_accuracy when `requested_labels` is given. The histogram KL compares against the classifier's
    predictions on `real_images`. KID uses `kid_subsets` subsets of min(kid_subset_size, N / 2) images drawn
    with `seed`; the Inception Score is taken over the whole set (one split). Use the same N of real and fake
    images and the same seed for every row (see `image_baseline_metrics`).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore
    from torchmetrics.image.kid import KernelInceptionDistance
    from torchmetrics.utilities import dim_zero_cat

    real = as_images(real_images, classifier)
    fake = as_images(fake_images, classifier)
    features = ClassifierFeatures(classifier, real.shape[1:])
    # Subsets of at most half the smaller set, so that they differ and kid_std means something; the
    # unbiased MMD estimate has the same expectation at any subset size.
    subset_size = max(2, min(kid_subset_size, min(len(real), len(fake)) // 2))
    frechet = FrechetInceptionDistance(feature=features)
    with warnings.catch_warnings():
        # Both warn that they keep every feature: wanted here (read back below); N x the feature width in floats.
        warnings.filterwarnings("ignore", message=r".*will save all extracted features in buffer", category=UserWarning)
        kernel = KernelInceptionDistance(feature=features, subsets=kid_subsets, subset_size=subset_size)
        inception = InceptionScore(feature=ClassifierFeatures(classifier, real.shape[1:], output="logits"), splits=1)
    for images, is_real in ((real, True), (fake, False)):
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            frechet.update(batch, real=is_real)
            kernel.update(batch, real=is_real)
            if not is_real:
                inception.update(batch)
    with torch.random.fork_rng(devices=[]):  # KID draws its subsets from the global generator
        torch.manual_seed(seed)
        kid_mean, kid_std = kernel.compute()
    with warnings.catch_warnings():
        # One split gives one score, whose standard deviation torch reports as NaN with a warning.
        warnings.filterwarnings("ignore", message=r"std\(\): degrees of freedom", category=UserWarning)
        inception_score = inception.compute()[0]
    # The extractors' outputs, kept by the metrics: no second pass through the classifier.
    real_feats, fake_feats = dim_zero_cat(kernel.real_features), dim_zero_cat(kernel.fake_features)
    fake_pred = dim_zero_cat(inception.features).argmax(1)
    precision, recall = precision_recall(real_feats, fake_feats, k)
    metrics = dict(
        fd_classifier=max(float(frechet.compute()), 0.0),
        kid_mean=float(kid_mean),
        kid_std=float(kid_std),
        inception_score=float(inception_score),
        precision=precision,
        recall=recall,
        class_hist_kl=class_histogram_kl(fake_pred, predict_classes(classifier, real), classifier.num_classes),
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
