"""The verdict names a winner only where intervals clear each other; bootstrap intervals and seed aggregation."""

import math

import numpy as np
import pytest
import torch

from pipelines.result import aggregate
from pipelines.uncertainty import bootstrap, combine_seeds, image_sample_intervals, mean_interval
from pipelines.verdict import judge


@pytest.mark.parametrize("key, values, intervals, outcome, winner", [
    ("fd_classifier", {"vqvae": 2.0, "vqgan": 3.0}, {"vqvae": [1.8, 2.2], "vqgan": [2.7, 3.3]}, "clear", "vqvae"),
    ("fd_classifier", {"vqvae": 2.0, "vqgan": 3.0}, {"vqvae": [1.5, 2.8], "vqgan": [2.7, 3.3]}, "unclear", None),
    ("recall", {"vqvae": 0.2, "vqgan": 0.3}, {"vqvae": [0.18, 0.22], "vqgan": [0.28, 0.32]}, "clear", "vqgan"),
    ("recall", {"vqvae": 0.2, "vqgan": 0.3}, {"vqvae": [0.18, 0.22]}, "not measured", None),
    # closer to real: distances [3, 7] for VQ-VAE and [0, 2] for VQGAN (its interval holds the real value)
    ("length_mean", {"vqvae": 20.0, "vqgan": 26.0, "real": 25.0}, {"vqvae": [18.0, 22.0], "vqgan": [24.0, 27.0]},
     "clear", "vqgan"),
    ("kid_std", {"vqvae": 0.3, "vqgan": 0.1}, {"vqvae": [0.2, 0.4], "vqgan": [0.0, 0.2]}, None, None),
    ("unknown_metric", {"vqvae": 0.3, "vqgan": 0.1}, {}, None, None),
    ("recall", {"vqvae": 0.3, "vqgan": math.nan}, {}, None, None),
])
def test_judge(key, values, intervals, outcome, winner):
    entry = judge(key, values, intervals)
    if outcome is None:
        assert entry is None
    else:
        assert entry["outcome"] == outcome and entry["winner"] == winner


def test_bootstrap_interval_of_a_mean_covers_the_truth_at_about_its_level():
    generator = np.random.default_rng(0)
    covered = 0
    for trial in range(40):
        sample = generator.normal(1.0, 2.0, size=200)
        low, high = mean_interval(sample, reps=300, seed=trial)
        covered += low <= 1.0 <= high
        assert high - low == pytest.approx(2 * 1.96 * 2.0 / math.sqrt(200), rel=0.3)  # the normal-theory width
    assert 33 <= covered <= 40  # 95% nominal: 38 expected of 40


def test_bootstrap_removes_the_resampling_bias_of_a_biased_statistic():
    values = torch.arange(100, dtype=torch.float64)
    distinct = lambda index: float(len(torch.unique(values[index])))  # 100 on the full sample, ~63 resampled
    low, high = bootstrap(distinct, 100, reps=200, seed=0)
    assert low <= 100 <= high


def test_image_intervals_separate_a_shifted_sample_set():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(400, 8, generator=generator, dtype=torch.float64)
    near = torch.randn(400, 8, generator=generator, dtype=torch.float64)
    far = torch.randn(400, 8, generator=generator, dtype=torch.float64) + 1.0
    ones = torch.ones(400)
    a = image_sample_intervals(real, near, ones, reps=60, kid_subset_size=100)
    b = image_sample_intervals(real, far, ones, reps=60, kid_subset_size=100)
    assert a["fd_classifier"][1] < b["fd_classifier"][0]  # FD of a unit shift in 8 dims is ~8
    assert a["kid_mean"][1] < b["kid_mean"][0]
    assert a["precision"] == [1.0, 1.0]


def test_combine_seeds_gives_mean_spread_and_the_hull_of_intervals():
    mean, spread, interval = combine_seeds([{"a": 1.0, "b": 5.0, "c": "text"}, {"a": 3.0, "b": 7.0}],
                                           [{"a": [0.5, 1.5]}, {"a": [2.0, 4.0]}])
    assert mean == {"a": 2.0, "b": 6.0}
    assert spread["a"] == pytest.approx(math.sqrt(2))
    assert interval == {"a": [0.5, 4.0], "b": [5.0, 7.0]}  # b: no bootstrap, so the seeds' range
    _, spread, interval = combine_seeds([{"a": 1.0}], [{}])
    assert spread == {} and interval == {}  # one seed without a bootstrap: nothing to say


def test_aggregate_over_seeds_names_a_winner_only_when_the_seeds_agree():
    def run(vqvae_fd, vqgan_fd):
        return {"generation": {"vqvae": {"fd_classifier": vqvae_fd}, "vqgan": {"fd_classifier": vqgan_fd},
                               "real": {"fd_classifier": 1.0}}}

    apart = aggregate({"num_eval_samples": 100}, [run(5.0, 9.0), run(5.5, 9.5), run(6.0, 10.0)], [0, 1, 2])
    assert apart.generation["vqvae"]["fd_classifier"] == pytest.approx(5.5)
    assert apart.spread["generation"]["vqvae"]["fd_classifier"] == pytest.approx(0.5)
    assert apart.verdict["metrics"]["generation"][0]["winner"] == "vqvae"
    assert "from each of 3 seeds (0, 1, 2)" in apart.verdict["summary"]
    mixed = aggregate({"num_eval_samples": 100}, [run(5.0, 9.0), run(9.5, 6.0)], [0, 1])
    assert mixed.verdict["metrics"]["generation"][0]["outcome"] == "unclear"
    assert "no clear winner" in mixed.verdict["summary"]
