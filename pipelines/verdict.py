"""What the metrics mean and who wins on each: the metric registry, GAN health and the comparison's verdict.

A winner is named on a metric only where the two variants' intervals (bootstrap over samples, and the spread
over seeds when there are several) do not overlap; otherwise the verdict is "no clear difference", and where a
metric has no interval at all (one seed, no bootstrap form) it is "not measured". FD is biased upwards at
finite N, so the verdict quotes the real-vs-real floor at the same N and judges FD only by its intervals.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

VARIANTS = ("vqvae", "vqgan")
COLUMNS = (*VARIANTS, "real")
COLUMN_NAMES = {"vqvae": "VQ-VAE", "vqgan": "VQGAN", "real": "Real data"}
JUDGED_GROUPS = ("generation", "reconstruction")


@dataclass(frozen=True)
class Metric:
    """How one metric is shown and judged."""

    label: str
    direction: str | None  # "lower" or "higher" is better, "closer" to the real baseline, None: not judged
    description: str
    unit: str = ""  # "fraction" is shown as %, "percent" is already in %, "dB", "seconds"


METRICS: dict[str, Metric] = {
    # Reconstruction of the test split (images)
    "mse": Metric("MSE", "lower", "Mean squared error of reconstructions, pixels in [-1, 1]."),
    "psnr": Metric("PSNR", "higher", "Peak signal-to-noise ratio of reconstructions (per image, capped at 100 dB).",
                   "dB"),
    "ssim": Metric("SSIM", "higher", "Structural similarity of reconstructions to the originals (1 = identical)."),
    "fd_classifier": Metric("FD-classifier", "lower",
                            "Fréchet distance to real test images in the evaluation classifier's features "
                            "(not FID: no Inception network). Biased upwards at finite N: compare with the real row."),
    "classifier_accuracy": Metric("Classifier accuracy", "higher",
                                  "Share of reconstructions the evaluation classifier puts in the original's class.",
                                  "fraction"),
    "codebook_usage": Metric("Codebook usage", "higher", "Share of codebook entries used to encode the test split.",
                             "percent"),
    "perplexity": Metric("Code perplexity", "higher",
                         "exp(entropy) of the test split's code histogram: the effective number of codes in use."),
    "lpips_vgg": Metric("LPIPS (VGG)", "lower",
                        "Learned perceptual distance to the originals (ImageNet VGG weights, only when cached)."),
    "num_items": Metric("Items", None, "Number of test items evaluated."),
    "high_frequency_ratio": Metric("High-frequency power", "closer",
                                   "Power above 0.25 cycles/pixel relative to the real test images' (1 = as real; "
                                   "stripes or checkerboards push it up, blur pulls it down)."),
    # Generated images
    "fid": Metric("FID (InceptionV3)", "lower", "True FID with ImageNet InceptionV3 features (only when cached)."),
    "kid_mean": Metric("KID", "lower", "Kernel distance (unbiased MMD², cubic polynomial kernel) to real images in "
                                       "classifier features, mean over subsets."),
    "kid_std": Metric("KID std", None, "Standard deviation of KID over subsets: its uncertainty, not a score."),
    "inception_score": Metric("Classifier IS", "higher",
                              "Inception Score with the evaluation classifier: confident, class-balanced samples "
                              "score high."),
    "precision": Metric("Precision", "higher", "Share of samples inside the real images' k-NN feature manifold "
                                               "(fidelity).", "fraction"),
    "recall": Metric("Recall", "higher", "Share of real images inside the samples' k-NN feature manifold (coverage).",
                     "fraction"),
    "class_hist_kl": Metric("Class-histogram KL", "lower",
                            "KL divergence of the samples' predicted-class histogram from the real images' "
                            "(mode balance)."),
    "class_accuracy": Metric("Class accuracy", "higher",
                             "Share of class-conditional samples the classifier puts in the requested class.",
                             "fraction"),
    # Text reconstruction
    "byte_accuracy": Metric("Byte accuracy", "higher", "Share of bytes reconstructed exactly (padding ignored).",
                            "fraction"),
    "exact_match": Metric("Exact match", "higher", "Share of records reconstructed with every byte right.",
                          "fraction"),
    # Generated text: diversity and length are judged by how close they come to real text, since random
    # bytes are maximally "diverse" and a repeated common phrase scores a low n-gram perplexity.
    "distinct_1": Metric("Distinct-1", "closer", "Unique words / all words across samples (higher = more diverse)."),
    "distinct_2": Metric("Distinct-2", "closer", "Unique word bigrams / all bigrams (higher = more diverse)."),
    "distinct_3": Metric("Distinct-3", "closer", "Unique word trigrams / all trigrams (higher = more diverse)."),
    "self_bleu4": Metric("Self-BLEU-4", "closer", "BLEU-4 of each sample against the others (lower = more diverse)."),
    "length_mean": Metric("Length mean", "closer", "Mean sample length in UTF-8 bytes."),
    # The spread of lengths is shown, not scored: it would count one property four times.
    "length_std": Metric("Length std", None, "Standard deviation of sample length in bytes."),
    "length_min": Metric("Length min", None, "Shortest sample in bytes."),
    "length_max": Metric("Length max", None, "Longest sample in bytes."),
    "ngram_perplexity": Metric("n-gram perplexity", "closer",
                               "Per-byte perplexity under a character 5-gram model fit on the train split (fluency)."),
    "copy_rate": Metric("Copy rate", "closer",
                        "Share of the samples' 32-character strings found verbatim in the train split (memorisation; "
                        "a copied sample also scores a low n-gram perplexity).", "fraction"),
    "sentiment_agreement": Metric("Sentiment agreement", "higher",
                                  "Share of samples a TF-IDF + logistic-regression classifier gives the requested "
                                  "sentiment.", "fraction"),
    # Prior: lower means a tokenizer's codes are easier to predict, which says nothing about sample quality
    "val_nll": Metric("Validation NLL", None, "The prior's held-out negative log-likelihood per code (nats); "
                                              "code predictability, not sample quality."),
    "val_bits_per_code": Metric("Validation bits/code", None, "The same in bits per code."),
    # Training cost
    "tokenizer_seconds": Metric("Tokenizer training", None, "Wall-clock time of stage 1 (the two variants train side "
                                "by side unless --jobs 1).", "seconds"),
    "prior_seconds": Metric("Prior training", None, "Wall-clock time of stage 2 (side by side unless --jobs 1).",
                            "seconds"),
}


def is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------------------------------
# GAN health
# ----------------------------------------------------------------------------------------------------

# A discriminator "separated" real from fake when, over the last quarter of its logged steps, its hinge loss
# fell below this (1.0 is chance: logits near 0) and it put most real and most fake patches on their own side.
SEPARATED_MAX_LOSS = 0.95
SEPARATED_MIN_ACCURACY = 0.55
# Short of that, it still "ranks" them when its separation AUC (the chance that a real patch scores above a
# reconstructed one, whatever the threshold) reaches this: a weak but real signal, not none.
RANKED_MIN_AUC = 0.6
HEALTH_KEYS = ("disc_loss", "logits_real", "logits_fake", "disc_acc_real", "disc_acc_fake", "disc_auc",
               "gan_weight", "adaptive_weight")


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
    health["ranked"] = health["separated"] or health.get("disc_auc", 0.5) >= RANKED_MIN_AUC
    return health


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def gan_health_sentence(health, inputs: str = "images") -> str:
    """A sentence on whether VQGAN's discriminator separated real from reconstructed `inputs` (images or text; ''
    without data)."""
    if not isinstance(health, dict) or not is_number(health.get("disc_loss")):
        return ""
    accuracy = (f", accuracy {health['disc_acc_real']:.0%} on real and {health['disc_acc_fake']:.0%} on "
                "reconstructed patches" if is_number(health.get("disc_acc_real")) else "")
    auc = f", separation AUC {health['disc_auc']:.2f}" if is_number(health.get("disc_auc")) else ""
    figures = (f"hinge loss {health['disc_loss']:.3f}{accuracy}{auc} over the last quarter of its steps; "
               f"{_and(['1.0'] + ['50%'] * bool(accuracy) + ['0.5'] * bool(auc))} "
               f"{'are' if accuracy or auc else 'is'} chance")
    if health.get("separated"):
        return f"VQGAN's discriminator separated real from reconstructed {inputs} ({figures})."
    if health.get("ranked"):
        return (f"**VQGAN's discriminator separated real from reconstructed {inputs} only weakly** ({figures}): it "
                "ranks real patches above reconstructed ones more often than not, but does not reliably tell them "
                "apart, so its adversarial term is a weak signal (see GAN health under Training curves).")
    return (f"**VQGAN's discriminator never separated real from reconstructed {inputs}** ({figures}), so its "
            "adversarial term carried no signal: read the VQGAN column as an L1 + perceptual autoencoder, not as "
            "a working GAN (see GAN health under Training curves).")


# ----------------------------------------------------------------------------------------------------
# Verdict
# ----------------------------------------------------------------------------------------------------


def _distance_interval(interval: list[float], real: float) -> list[float]:
    """The interval of |x - real| for x in `interval`."""
    low, high = interval
    if low <= real <= high:
        return [0.0, max(real - low, high - real)]
    return sorted([abs(low - real), abs(high - real)])


def judge(key: str, values: dict, intervals: dict) -> dict | None:
    """The verdict on one metric: {"key", "outcome", "winner", "intervals"}; None when the metric is not judged.

    outcome: "clear" (intervals apart: `winner` is better), "unclear" (they overlap), "not measured" (no
    interval for a variant). For "closer" metrics the intervals are of the distance to the real row.
    """
    metric = METRICS.get(key)
    if metric is None or metric.direction is None or not all(is_number(values.get(v)) for v in VARIANTS):
        return None
    entry = {"key": key, "outcome": "not measured", "winner": None,
             "intervals": {v: intervals.get(v) for v in VARIANTS}}
    if not all(isinstance(intervals.get(v), list) and all(map(is_number, intervals[v])) for v in VARIANTS):
        return entry
    spans = {v: list(intervals[v]) for v in VARIANTS}
    direction = metric.direction
    if direction == "closer":
        if not is_number(values.get("real")):
            return None
        spans = {v: _distance_interval(spans[v], values["real"]) for v in VARIANTS}
        direction = "lower"
    a, b = spans["vqvae"], spans["vqgan"]
    if a[1] < b[0] or b[1] < a[0]:
        lower = "vqvae" if a[1] < b[0] else "vqgan"
        entry.update(outcome="clear", winner=lower if direction == "lower" else ("vqgan" if lower == "vqvae" else "vqvae"))
    else:
        entry["outcome"] = "unclear"
    return entry


def _labels(keys: list[str]) -> str:
    return ", ".join(METRICS[k].label if k in METRICS else k for k in keys)


def verdict(groups: dict[str, dict], intervals: dict[str, dict], seeds: list[int], num_samples: int | None,
            gan: dict | None = None, inputs: str = "images") -> dict:
    """The judged metrics per group and a summary paragraph (Markdown **bold**) that names only clear winners.

    groups: {"generation": {"vqvae": {key: value}, "vqgan": ..., "real": ...}, "reconstruction": ...};
    intervals: the same shape with [low, high] per key (absent where not measured).
    """
    judged = {}
    for group in JUDGED_GROUPS:
        columns = groups.get(group) or {}
        keys = list(dict.fromkeys(k for v in VARIANTS for k in (columns.get(v) or {})))
        entries = []
        for key in keys:
            values = {c: (columns.get(c) or {}).get(key) for c in COLUMNS}
            spans = {v: ((intervals.get(group) or {}).get(v) or {}).get(key) for v in VARIANTS}
            entry = judge(key, values, spans)
            if entry is not None:
                entries.append(entry)
        judged[group] = entries
    sentences = []
    samples = f"{num_samples:,} generated samples per variant" if isinstance(num_samples, int) else "their samples"
    if len(seeds) > 1:
        basis = (f"Judged on {samples} from each of {len(seeds)} seeds ({', '.join(map(str, seeds))}); a variant is "
                 "named only where its 95% interval (every seed's bootstrap interval, or the seeds' range) clears "
                 "the other's.")
    else:
        basis = (f"Judged on {samples} from one seed ({seeds[0] if seeds else '?'}): the intervals are 95% bootstrap "
                 "intervals over samples; seed-to-seed variation was not measured (use --seeds 3).")
    sentences.append(basis)
    for group, name in (("generation", "samples"), ("reconstruction", "reconstructions")):
        entries = judged.get(group) or []
        if not entries:
            continue
        wins = {v: [e["key"] for e in entries if e["winner"] == v] for v in VARIANTS}
        unclear = [e["key"] for e in entries if e["outcome"] == "unclear"]
        unmeasured = [e["key"] for e in entries if e["outcome"] == "not measured"]
        parts = [f"**{COLUMN_NAMES[v]}** is clearly better on {_labels(wins[v])}" for v in VARIANTS if wins[v]]
        if unclear:
            parts.append(f"no clear difference on {_labels(unclear)}")
        if unmeasured:
            parts.append(f"no interval for {_labels(unmeasured)}")
        if not any(wins.values()):
            parts.insert(0, "no clear winner")
        sentences.append(f"On {name}: " + "; ".join(parts) + ".")
    real_fd = ((groups.get("generation") or {}).get("real") or {}).get("fd_classifier")
    if is_number(real_fd):
        sentences.append(f"FD-classifier is biased upwards at finite N: real images against real images at the same N "
                         f"score {real_fd:.3g}, the floor any sample set is measured against.")
    health = gan_health_sentence(gan, inputs)
    if health:
        sentences.append(health)
    return {"seeds": list(seeds), "seed_variation_measured": len(seeds) > 1, "metrics": judged,
            "summary": " ".join(sentences)}
