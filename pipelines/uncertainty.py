"""Bootstrap confidence intervals over generated samples, and how several seeds combine.

A sample metric is recomputed on samples drawn with replacement from the N generated ones (the real set stays
fixed), `reps` times; the interval is the central `level` share of those values (the percentile bootstrap),
shifted by the bootstrap's own bias.
Metrics that are means of per-sample values (precision, class accuracy, sentiment agreement) resample those
values; FD-classifier and KID are recomputed from resampled features; n-gram perplexity from per-text
log-likelihoods. Recall has no per-sample form and its k-NN radii collapse on duplicated samples, so it gets
no bootstrap interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torchmetrics.image.fid import _compute_fid
from torchmetrics.image.kid import poly_mmd

DEFAULT_REPS = 200
DEFAULT_LEVEL = 0.95


def percentile_interval(values: Sequence[float], level: float = DEFAULT_LEVEL) -> list[float]:
    """[low, high]: the central `level` share of bootstrap values (non-finite ones dropped)."""
    finite = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return [math.nan, math.nan]
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail))]


def bootstrap(statistic: Callable[[torch.Tensor], float], n: int, reps: int = DEFAULT_REPS, seed: int = 0,
              level: float = DEFAULT_LEVEL) -> list[float]:
    """Bias-corrected percentile interval of `statistic(indices)` over `reps` resamples of range(n).

    Resampling with replacement duplicates samples, which inflates distances such as FD; the interval is
    therefore shifted by the bootstrap's bias (the mean of the resampled values minus the full-sample value).
    """
    if n < 2:
        raise ValueError(f"a bootstrap needs at least 2 samples, got {n}")
    generator = torch.Generator().manual_seed(seed)
    values = [statistic(torch.randint(n, (n,), generator=generator)) for _ in range(reps)]
    finite = [v for v in values if math.isfinite(v)]
    estimate = statistic(torch.arange(n))
    bias = float(np.mean(finite)) - estimate if finite and math.isfinite(estimate) else 0.0
    low, high = percentile_interval(values, level)
    return [low - bias, high - bias]


def mean_interval(per_sample, reps: int = DEFAULT_REPS, seed: int = 0, level: float = DEFAULT_LEVEL) -> list[float]:
    """Interval of the mean of per-sample values (e.g. 0/1 correctness)."""
    values = torch.as_tensor(per_sample, dtype=torch.float64)
    return bootstrap(lambda index: float(values[index].mean()), len(values), reps, seed, level)


def image_sample_intervals(real_feats: torch.Tensor, fake_feats: torch.Tensor, fake_inside_real: torch.Tensor,
                           fake_correct: torch.Tensor | None = None, reps: int = DEFAULT_REPS, seed: int = 0,
                           kid_subset_size: int = 1000, kid_subsets: int = 5,
                           level: float = DEFAULT_LEVEL) -> dict[str, list[float]]:
    """Bootstrap intervals of fd_classifier, kid_mean, precision (and class_accuracy) of N generated images.

    `fake_inside_real`: per sample, whether it lies in the real k-NN manifold (precision's per-sample form);
    `fake_correct`: per sample, whether the classifier gives it the requested class.
    """
    real, fake = real_feats.double(), fake_feats.double()
    real_mean, real_cov = real.mean(0), torch.cov(real.T)

    def fd(index):
        chosen = fake[index]
        return max(float(_compute_fid(real_mean, real_cov, chosen.mean(0), torch.cov(chosen.T))), 0.0)

    size = max(2, min(kid_subset_size, min(len(real), len(fake)) // 2))
    kid_generator = torch.Generator().manual_seed(seed + 1)

    def kid(index):
        chosen = fake[index]
        values = []
        for _ in range(kid_subsets):
            a = real[torch.randperm(len(real), generator=kid_generator)[:size]]
            b = chosen[torch.randperm(len(chosen), generator=kid_generator)[:size]]
            values.append(float(poly_mmd(a, b, degree=3, gamma=None, coef=1.0)))
        return float(np.mean(values))

    intervals = {"fd_classifier": bootstrap(fd, len(fake), reps, seed, level),
                 "kid_mean": bootstrap(kid, len(fake), max(reps // 2, 2), seed, level),
                 "precision": mean_interval(fake_inside_real, reps, seed, level)}
    if fake_correct is not None:
        intervals["class_accuracy"] = mean_interval(fake_correct, reps, seed, level)
    return intervals


def text_sample_intervals(nll_per_text: Sequence[float], bytes_per_text: Sequence[int],
                          agreement: Sequence[float] | None = None, reps: int = DEFAULT_REPS, seed: int = 0,
                          level: float = DEFAULT_LEVEL) -> dict[str, list[float]]:
    """Bootstrap intervals of ngram_perplexity (exp of total NLL / total bytes) and sentiment_agreement."""
    nll = torch.as_tensor(nll_per_text, dtype=torch.float64)
    size = torch.as_tensor(bytes_per_text, dtype=torch.float64)

    def perplexity(index):
        total = float(size[index].sum())
        return math.exp(float(nll[index].sum()) / total) if total > 0 else math.inf

    intervals = {"ngram_perplexity": bootstrap(perplexity, len(nll), reps, seed, level)}
    if agreement is not None:
        intervals["sentiment_agreement"] = mean_interval(agreement, reps, seed, level)
    return intervals


def combine_seeds(per_seed: list[dict[str, float]], per_seed_intervals: list[dict[str, list[float]]] | None = None
                  ) -> tuple[dict[str, float], dict[str, float], dict[str, list[float]]]:
    """(mean, spread, interval) per metric over seeds.

    spread: the sample standard deviation over seeds (only with 2+ seeds). interval: with bootstrap intervals,
    the hull of every seed's interval (sampling noise and seed-to-seed variation together); without them, the
    range of the seeds' values (2+ seeds); with one seed and no bootstrap, none.
    """
    keys = [k for k in per_seed[0] if all(isinstance(run.get(k), (int, float)) and not isinstance(run.get(k), bool)
                                          for run in per_seed)]
    mean, spread, interval = {}, {}, {}
    for key in keys:
        values = [float(run[key]) for run in per_seed]
        mean[key] = float(np.mean(values))
        if len(values) > 1:
            spread[key] = float(np.std(values, ddof=1))
        bootstrapped = [iv[key] for iv in (per_seed_intervals or []) if key in iv]
        if len(bootstrapped) == len(per_seed):
            interval[key] = [min(iv[0] for iv in bootstrapped), max(iv[1] for iv in bootstrapped)]
        elif len(values) > 1:
            interval[key] = [min(values), max(values)]
    return mean, spread, interval
