"""Invariants of the evaluation metrics, the cached feature classifier and the text judges."""

from __future__ import annotations

import math
import random
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from pipelines import classifier as C
from pipelines import evaluate as E
from pipelines import image_metrics as IM
from pipelines import text_metrics as T
from stage1_tokenizer import VQConfig, VQModel
from stage1_tokenizer.configuration import PAD_BYTE
from stage1_tokenizer.data import Split, evaluation_subset, load_split
from stage1_tokenizer.evaluation import ClassifierFeatures, psnr, reconstruction_metrics

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is missing")


def _whitened(num: int, dim: int, seed: int) -> np.ndarray:
    """Samples whose sample mean is exactly 0 and sample covariance exactly the identity."""
    x = np.random.default_rng(seed).standard_normal((num, dim))
    x -= x.mean(0)
    return x @ np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False))).T


# ---------------------------------------------------------------------------------------------------
# Frechet distance (torchmetrics through ClassifierFeatures), precision/recall, histogram KL, IS
# ---------------------------------------------------------------------------------------------------


class FlatFeatures(torch.nn.Module):
    """A duck-typed "classifier" whose features are its (B, F, 1, 1) input, flattened, and so are its logits."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))  # gives ClassifierFeatures a device to read

    def features(self, x):
        return x.flatten(1)

    def forward(self, x):
        return x.flatten(1)


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    """FD between two (N, F) feature sets, through the extractor wrapper that reconstruction_metrics uses."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=ClassifierFeatures(FlatFeatures(), (a.shape[1], 1, 1)))
    metric.update(torch.from_numpy(a)[..., None, None], real=True)
    metric.update(torch.from_numpy(b)[..., None, None], real=False)
    return float(metric.compute())


def test_classifier_features_are_float64_features_or_logits():
    classifier = C.FeatureClassifier(1, 16, 10).eval()
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    features = ClassifierFeatures(classifier, (1, 16, 16))
    logits = ClassifierFeatures(classifier, (1, 16, 16), output="logits")
    assert features.num_features == classifier.feature_dim and logits.num_features == 10
    assert features(images).dtype == torch.float64
    assert torch.allclose(features(images), classifier.features(images).double())
    assert torch.allclose(logits(images), classifier(images).double())
    with pytest.raises(ValueError, match="output='probs'"):
        ClassifierFeatures(classifier, (1, 16, 16), output="probs")


def test_frechet_distance_matches_gaussian_closed_form():
    var_a, var_b = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 1.0, 0.5])
    mu = np.array([1.0, -2.0, 0.0, 0.5])
    a = _whitened(300, 4, seed=2) * np.sqrt(var_a)
    b = _whitened(300, 4, seed=3) * np.sqrt(var_b) + mu
    expected = mu @ mu + np.sum(var_a + var_b - 2 * np.sqrt(var_a * var_b))
    assert _frechet(a, b) == pytest.approx(expected, rel=1e-8)
    assert _frechet(a, a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_matches_scipy_sqrtm_on_full_covariances():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((200, 6)) @ rng.standard_normal((6, 6))
    b = rng.standard_normal((200, 6)) @ rng.standard_normal((6, 6)) + 0.3
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    diff = a.mean(0) - b.mean(0)
    expected = diff @ diff + np.trace(cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real)
    assert _frechet(a, b) == pytest.approx(expected, rel=1e-6)


def test_precision_recall_on_a_hand_computed_case():
    real = torch.tensor([0.0, 1, 2, 10, 11, 50]).view(-1, 1)
    fake = torch.tensor([0.5, 5, 10.5, 30]).view(-1, 1)
    # k = 1. Real radii: 1 for 0, 1, 2, 10, 11; 39 for 50. Fake radii: 4.5 (0.5, 5), 5.5 (10.5), 19.5 (30).
    # Precision: 0.5 and 10.5 lie within 1 of a real, 30 within 39 of 50, 5 in no real ball -> 3/4.
    # Recall: every real but 50 lies within 4.5 of 0.5 or 5.5 of 10.5; 50 is 20 > 19.5 from 30 -> 5/6.
    assert IM.precision_recall(real, fake, k=1) == (pytest.approx(3 / 4), pytest.approx(5 / 6))


def test_precision_recall_identical_disjoint_and_mode_dropping():
    rng = np.random.default_rng(7)
    real = rng.standard_normal((300, 4))
    assert IM.precision_recall(real, real.copy()) == (1.0, 1.0)
    assert IM.precision_recall(real, real + 100.0) == (0.0, 0.0)
    two_modes = np.concatenate([rng.standard_normal((150, 4)), rng.standard_normal((150, 4)) + 50])
    one_mode = rng.standard_normal((300, 4))  # samples that cover only the first mode
    precision, recall = IM.precision_recall(two_modes, one_mode)
    assert precision > 0.9
    assert 0.4 < recall < 0.6


def test_class_histogram_kl():
    labels = torch.arange(10).repeat(20)
    assert IM.class_histogram_kl(labels, labels.flip(0), 10) == pytest.approx(0.0, abs=1e-12)
    assert IM.class_histogram_kl(labels, torch.full((10,), 0.1), 10) == pytest.approx(0.0, abs=1e-12)
    dropped = labels[labels < 5]  # samples that miss half the classes
    assert IM.class_histogram_kl(dropped, labels, 10) > 0.5
    with pytest.raises(ValueError, match="pred_labels_fake"):
        IM.class_histogram_kl(torch.tensor([10]), labels, 10)


def test_class_histogram_kl_on_a_hand_computed_case():
    # Add-one counts: samples [0, 0, 1] -> (3, 2) / 5; reference [0, 1] -> (2, 2) / 4.
    expected = 0.5 * math.log(0.5 / 0.6) + 0.5 * math.log(0.5 / 0.4)
    assert IM.class_histogram_kl([0, 0, 1], torch.tensor([0, 1]), 2) == pytest.approx(expected, rel=1e-12)


def test_class_conditional_accuracy():
    assert IM.class_conditional_accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    with pytest.raises(ValueError, match="equal length"):
        IM.class_conditional_accuracy([1, 2], [1])


def test_psnr_is_finite_for_identical_images_and_exact_for_a_constant_error():
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    assert torch.equal(psnr(images, images), torch.full((4,), 100.0))
    assert torch.allclose(psnr(images, images + 0.2), torch.full((4,), 20.0))  # 10 log10(2^2 / 0.04)


# ---------------------------------------------------------------------------------------------------
# The feature classifier and image metrics (scikit-learn digits, 16x16)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("classifiers")


@pytest.fixture(scope="module")
def digits_classifier(classifier_cache):
    start = time.perf_counter()
    classifier, info = C.load_or_train_classifier("digits", 16, 1, seed=0, cache_dir=classifier_cache)
    return classifier, info, time.perf_counter() - start


@pytest.fixture(scope="module")
def digits_test_images():
    return C.load_images("digits", "eval", 16, 1)


def test_classifier_trains_on_digits(digits_classifier):
    classifier, info, _ = digits_classifier
    assert not info["from_cache"]
    assert info["test_accuracy"] > 0.85
    assert info["weights_sha256"] == C.weights_sha256(classifier)
    assert info["num_test"] == 360


def test_classifier_cache_is_reused(digits_classifier, classifier_cache):
    _, first_info, first_seconds = digits_classifier
    weights = Path(first_info["cache_dir"]) / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    start = time.perf_counter()
    classifier, info = C.load_or_train_classifier("digits", 16, 1, seed=0, cache_dir=classifier_cache)
    assert info["from_cache"]
    assert info["weights_sha256"] == first_info["weights_sha256"] == C.weights_sha256(classifier)
    assert weights.stat().st_mtime_ns == mtime
    assert time.perf_counter() - start < first_seconds
    assert len(list(classifier_cache.iterdir())) == 1


def test_classifier_rejects_unlabelled_data(tmp_path):
    import datasets
    from PIL import Image

    images = [Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)) for i in range(4)]
    table = datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image())
    for split in ("train", "test"):
        table.to_parquet(str(tmp_path / f"{split}.parquet"))
    with pytest.raises(ValueError, match="labelled data set"):
        C.load_or_train_classifier(str(tmp_path), 16, 1, cache_dir=tmp_path / "cache")


def test_classifier_rejects_wrong_image_shape(digits_classifier):
    classifier = digits_classifier[0]
    with pytest.raises(ValueError, match=r"\(B, 1, 16, 16\)"):
        C.predict_classes(classifier, torch.zeros(2, 1, 8, 8))


def test_image_metrics_real_against_itself_and_against_noise(digits_classifier, digits_test_images):
    classifier, info, _ = digits_classifier
    images, labels = digits_test_images
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        same = IM.image_generation_metrics(classifier, images, images, requested_labels=labels, kid_subsets=10)
    # torchmetrics' notes that KID and IS keep their features (wanted here) are not repeated at every call.
    assert not [w for w in caught if "extracted features" in str(w.message)]
    assert set(same) == {"fd_classifier", "kid_mean", "kid_std", "inception_score", "precision", "recall",
                         "class_hist_kl", "class_accuracy"}
    assert same["fd_classifier"] == pytest.approx(0.0, abs=1e-6)
    assert same["precision"] == same["recall"] == 1.0
    assert same["class_hist_kl"] == pytest.approx(0.0, abs=1e-12)
    assert same["class_accuracy"] == pytest.approx(info["test_accuracy"])
    assert same["inception_score"] > 5.0
    assert same["kid_std"] > 0  # subsets of half the set differ from each other

    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    bad = IM.image_generation_metrics(classifier, images, noise, kid_subsets=10)
    assert "class_accuracy" not in bad
    assert bad["fd_classifier"] > 10 * max(same["fd_classifier"], 1e-3)
    assert bad["kid_mean"] > same["kid_mean"] + 10 * bad["kid_std"]
    assert bad["precision"] < 0.5
    assert bad["inception_score"] < same["inception_score"]


def test_evaluation_phases_print_their_seconds(monkeypatch, capsys):
    clock = iter([100.0, 162.4])
    monkeypatch.setattr(E.time, "perf_counter", lambda: next(clock))
    with E.evaluating("vqgan: 2000 samples"):
        print("inside")
    assert capsys.readouterr().out.splitlines() == [
        "evaluating vqgan: 2000 samples", "inside", "evaluating vqgan: 2000 samples: 62 s"]


def test_image_metrics_match_hand_formulas_on_the_same_classifier_outputs(digits_classifier, digits_test_images):
    classifier = digits_classifier[0]
    images = digits_test_images[0]
    real, fake = images[:180], torch.nn.functional.avg_pool2d(images[180:], 3, stride=1, padding=1)
    metrics = IM.image_generation_metrics(classifier, real, fake, kid_subsets=5, seed=1)
    with torch.no_grad():
        a, b = classifier.features(real).double().numpy(), classifier.features(fake).double().numpy()
        probs = classifier(fake).double().softmax(-1).numpy()
    diff = a.mean(0) - b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr((S_a S_b)^(1/2)) from the symmetric PSD S_a^(1/2) S_b S_a^(1/2): dead ReLU units make S_a singular.
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    frechet = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt
    assert metrics["fd_classifier"] == pytest.approx(frechet, rel=1e-4)
    # The Inception Score over the whole set (one split): exp(E_x KL(p(y|x) || p(y))).
    inception = np.exp((probs * (np.log(probs) - np.log(probs.mean(0)))).sum(1).mean())
    assert metrics["inception_score"] == pytest.approx(inception, rel=1e-6)
    again = IM.image_generation_metrics(classifier, real, fake, kid_subsets=5, seed=1)
    other_seed = IM.image_generation_metrics(classifier, real, fake, kid_subsets=5, seed=2)
    assert (again["kid_mean"], again["kid_std"]) == (metrics["kid_mean"], metrics["kid_std"])
    assert other_seed["kid_mean"] != metrics["kid_mean"]


def test_image_baseline_metrics_on_two_real_sets(digits_classifier, digits_test_images):
    classifier = digits_classifier[0]
    images, labels = digits_test_images
    train_images, _ = C.load_images("digits", "train", 16, 1, max_items=len(images))
    baseline = IM.image_baseline_metrics(classifier, train_images, images, labels, kid_subsets=10)
    assert all(math.isfinite(value) for value in baseline.values())
    assert baseline["class_accuracy"] > 0.85
    assert baseline["precision"] > 0.7 and baseline["recall"] > 0.7
    with pytest.raises(ValueError, match="same number"):
        IM.image_baseline_metrics(classifier, train_images[:10], images[:11])


def test_image_metrics_accept_pil_images(digits_classifier, digits_test_images):
    from PIL import Image

    classifier = digits_classifier[0]
    images = digits_test_images[0][:40]
    pil = [Image.fromarray(image[0].add(1).mul(127.5).round().byte().numpy()) for image in images]
    metrics = IM.image_generation_metrics(classifier, images, pil, kid_subsets=2)
    assert metrics["fd_classifier"] == pytest.approx(0.0, abs=1e-6)


def test_reconstruction_metrics_of_an_untrained_image_tokenizer(digits_classifier):
    torch.manual_seed(0)
    model = VQModel(VQConfig.from_preset("tiny", in_channels=1))
    metrics = reconstruction_metrics(model, "digits", digits_classifier[0], batch_size=32, max_items=64)
    expected = {"mse", "psnr", "ssim", "fd_classifier", "classifier_accuracy", "classifier_accuracy_real",
                "codebook_usage", "perplexity", "num_items"}
    assert set(metrics) == expected
    assert all(math.isfinite(value) for value in metrics.values())
    assert metrics["num_items"] == 64
    assert 0 < metrics["codebook_usage"] <= 100
    assert 1 <= metrics["perplexity"] <= model.config.codebook_size
    assert metrics["classifier_accuracy_real"] > 0.85
    assert model.training  # the training flag is restored


def test_reconstruction_metrics_of_a_perfect_image_tokenizer(monkeypatch, digits_classifier):
    model = VQModel(VQConfig.from_preset("tiny", in_channels=1))
    seen = {}

    def encode(inputs):
        seen["inputs"] = inputs
        return torch.zeros(len(inputs), *model.config.latent_shape, dtype=torch.long)

    monkeypatch.setattr(model, "encode", encode)
    monkeypatch.setattr(model, "decode", lambda indices: seen["inputs"].clone())
    metrics = reconstruction_metrics(model, "digits", digits_classifier[0], max_items=50)
    assert metrics["mse"] == 0.0 and metrics["psnr"] == 100.0
    assert metrics["ssim"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["fd_classifier"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["classifier_accuracy"] == metrics["classifier_accuracy_real"]
    assert metrics["codebook_usage"] == pytest.approx(100 / model.config.codebook_size)
    assert metrics["perplexity"] == pytest.approx(1.0)


def test_text_reconstruction_ignores_pad_positions(monkeypatch):
    model = VQModel(VQConfig.from_preset("tiny", modality="text"))
    texts = ["def f(x):", "return x + 1", "a much longer line that runs past the window of 32 bytes"]
    # Labelled text is evaluated one record per sequence (pads after each record's text).
    split = Split([{"text": t, "label": 0} for t in texts], "text", ["only"], "fixture", "fixture")
    seen = {}

    def encode(inputs):
        seen["inputs"] = inputs
        return torch.zeros(len(inputs), *model.config.latent_shape, dtype=torch.long)

    def decode(indices):
        predicted = seen["inputs"].clone()
        predicted[predicted == PAD_BYTE] = ord("x")  # wrong only where the record has no text
        predicted[1, 0] = ord("R")  # and one wrong byte in the second record
        return torch.nn.functional.one_hot(predicted, 257).movedim(-1, 1).float()

    monkeypatch.setattr(model, "encode", encode)
    monkeypatch.setattr(model, "decode", decode)
    metrics = reconstruction_metrics(model, split)
    num_bytes = sum(min(len(t), 32) for t in texts)
    assert set(metrics) == {"byte_accuracy", "exact_match", "codebook_usage", "perplexity", "num_items"}
    assert metrics["byte_accuracy"] == pytest.approx((num_bytes - 1) / num_bytes)
    assert metrics["exact_match"] == pytest.approx(2 / 3)


def test_a_pad_only_mistake_leaves_byte_accuracy_unchanged(monkeypatch):
    model = VQModel(VQConfig.from_preset("tiny", modality="text"))
    texts = ["def f(x):", "return x + 1", "pass"]  # all shorter than seq_len: every record ends in pads
    split = Split([{"text": t, "label": 0} for t in texts], "text", ["only"], "fixture", "fixture")
    seen = {}

    def encode(inputs):
        seen["inputs"] = inputs
        return torch.zeros(len(inputs), *model.config.latent_shape, dtype=torch.long)

    def decoder(wrong_pads: bool):
        def decode(indices):
            predicted = seen["inputs"].clone()
            predicted[1, 3] = ord("?")  # one wrong text byte
            if wrong_pads:
                predicted[predicted == PAD_BYTE] = ord(" ")
            return torch.nn.functional.one_hot(predicted, 257).movedim(-1, 1).float()
        return decode

    monkeypatch.setattr(model, "encode", encode)
    monkeypatch.setattr(model, "decode", decoder(wrong_pads=False))
    right = reconstruction_metrics(model, split)
    monkeypatch.setattr(model, "decode", decoder(wrong_pads=True))
    wrong = reconstruction_metrics(model, split)
    num_bytes = sum(len(t) for t in texts)
    assert wrong["byte_accuracy"] == right["byte_accuracy"] == pytest.approx((num_bytes - 1) / num_bytes)
    assert wrong["exact_match"] == right["exact_match"] == pytest.approx(2 / 3)


def test_reconstruction_metrics_of_an_untrained_text_tokenizer():
    torch.manual_seed(0)
    model = VQModel(VQConfig.from_preset("tiny", modality="text"))
    metrics = reconstruction_metrics(model, "python-docs", max_items=16)
    assert all(math.isfinite(value) for value in metrics.values())
    assert 0 <= metrics["byte_accuracy"] < 0.5 and metrics["exact_match"] == 0.0


# ---------------------------------------------------------------------------------------------------
# Text samples
# ---------------------------------------------------------------------------------------------------


def test_distinct_n_on_known_strings():
    texts = ["a b a b", "a c"]
    assert T.distinct_n(texts, 1) == pytest.approx(3 / 6)
    assert T.distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert T.distinct_n(texts, 3) == pytest.approx(2 / 2)


def test_self_bleu_of_identical_texts_is_one_and_lower_for_different_ones():
    same = ["the cat sat on the mat today"] * 5
    assert T.self_bleu4(same) == pytest.approx(1.0)
    different = ["the cat sat on the mat today", "a dog ran in the park at night",
                 "we will sing a song of joy", "prices rose by ten percent in may"]
    assert T.self_bleu4(different) < 0.2


def test_sentence_bleu_matches_torchmetrics_when_every_order_matches():
    from torchmetrics.text import BLEUScore

    hypothesis = "the quick brown fox jumps over the lazy dog"
    references = ["the quick brown fox jumped over the lazy dog", "a quick brown fox jumps over a dog"]
    expected = float(BLEUScore(n_gram=4)([hypothesis], [references]))
    assert T.sentence_bleu4(hypothesis.split(), [r.split() for r in references]) == pytest.approx(expected, rel=1e-6)


@pytest.fixture(scope="module")
def ngram_model():
    from pydoc_data.topics import topics

    return T.CharNgramModel(order=5).fit([topics[key] for key in sorted(topics)[:60]])


@pytest.mark.parametrize("context", [b"", b"t", b"the q", b"\xff\xfe\xfd\xfc"])
def test_ngram_probabilities_sum_to_one(ngram_model, context):
    assert sum(ngram_model.probability(context, symbol) for symbol in range(256)) == pytest.approx(1.0, abs=1e-9)


def test_ngram_model_on_a_hand_computed_case():
    model = T.CharNgramModel(order=2, discount=0.75).fit(["abab"])
    # Bigrams: ab x2, ba x1. Continuation counts of unigrams: a 1 (after b), b 1 (after a); 2 in total.
    p_unigram = (1 - 0.75) / 2 + 0.75 * 2 / 2 / 256  # for "a" or "b": discounted count + backoff to uniform
    p_b_after_a = (2 - 0.75) / 2 + 0.75 * 1 / 2 * p_unigram
    p_a_after_a = 0.75 * 1 / 2 * p_unigram  # "aa" unseen: backoff mass only
    assert model.probability(b"a", ord("b")) == pytest.approx(p_b_after_a, rel=1e-12)
    assert model.probability(b"a", ord("a")) == pytest.approx(p_a_after_a, rel=1e-12)
    # "ab": "a" from an empty context (unigram level), then "b" after "a".
    assert model.perplexity(["ab"]) == pytest.approx(math.exp(-(math.log(p_unigram) + math.log(p_b_after_a)) / 2))


def test_ngram_perplexity_is_lower_on_train_like_text_than_on_random_bytes(ngram_model):
    english = ["The value of the expression is returned by the function.",
               "If the object is an instance of the class, the method is called."]
    rng = random.Random(0)
    noise = ["".join(chr(rng.randrange(32, 0x3000)) for _ in range(60)) for _ in range(2)]
    english_ppl, noise_ppl = ngram_model.perplexity(english), ngram_model.perplexity(noise)
    assert math.isfinite(noise_ppl)
    assert english_ppl < 10 < noise_ppl


def test_text_generation_metrics_keys_and_sentiment_agreement():
    class Echo:  # a stand-in sentiment judge: label 1 when the text says "good"
        def accuracy(self, texts, labels):
            return float(np.mean([int("good" in t) == label for t, label in zip(texts, labels)]))

    texts = ["a good film", "a bad film", "good good good"]
    metrics = T.text_generation_metrics(texts, ["a good film indeed", "not bad at all"], sentiment=Echo(),
                                        requested_labels=[1, 0, 0])
    assert set(metrics) == {"distinct_1", "distinct_2", "distinct_3", "self_bleu4", "length_mean", "length_std",
                            "length_min", "length_max", "ngram_perplexity", "copy_rate", "sentiment_agreement"}
    assert metrics["sentiment_agreement"] == pytest.approx(2 / 3)
    assert (metrics["length_min"], metrics["length_max"]) == (10.0, 14.0)
    assert all(math.isfinite(value) for value in metrics.values())


def test_copy_rate_counts_the_substrings_found_verbatim_in_training():
    train = ["To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
             "Now is the winter of our discontent made glorious summer by this sun of York"]
    copied = train[0][10:60]  # 50 characters: all 11 of its 40-character substrings are in the training text
    novel = "An entirely new sentence that no training text has ever said."
    assert T.copy_rate([copied], train, span=40) == 1.0
    assert T.copy_rate([novel], train, span=40) == 0.0
    half = copied[:45] + "#" * 50  # 6 of the 56 substrings lie inside the copied part
    assert T.copy_rate([half], train, span=40) == pytest.approx(6 / 56)
    assert T.copy_rate([copied, novel], train, span=40) == pytest.approx(11 / (11 + len(novel) - 39))
    assert T.copy_rate(["short"], train, span=40) == 0.0  # nothing long enough to judge
    # A copy spanning two training records is not one verbatim string of the training text.
    assert T.copy_rate([train[0][-20:] + train[1][:20]], train, span=40) == 0.0


def test_texts_and_labels_of_labelled_and_unlabelled_splits():
    from stage1_tokenizer.data import load_split

    texts, labels = T.texts_and_labels(load_split("python-docs", "eval", "text"), max_items=3)
    assert len(texts) == 3 and all(isinstance(t, str) and t for t in texts) and labels is None
    split = Split([{"text": "good", "label": 1}, {"text": None, "label": 0}], "text", ["neg", "pos"], "f", "f")
    assert T.texts_and_labels(split) == (["good", ""], [1, 0])


def test_texts_and_labels_caps_with_a_draw_across_a_split_stored_sorted_by_label():
    import datasets

    from stage1_tokenizer.data import evaluation_subset

    rows = [{"text": f"t{i}", "label": int(i >= 50)} for i in range(100)]  # sorted: all 0s, then all 1s
    for records in (rows, datasets.Dataset.from_list(rows)):
        texts, labels = T.texts_and_labels(Split(records, "text", ["neg", "pos"], "f", "f"), max_items=10)
        assert texts == [f"t{i}" for i in evaluation_subset(100, 10)] and len(texts) == 10
        assert set(labels) == {0, 1}  # the first 10 would all be label 0


@needs_shared_data
def test_sentiment_classifier_on_sst2_beats_chance():
    from stage1_tokenizer.data import load_split

    train_texts, train_labels = T.texts_and_labels(load_split(str(SHARED_DATA / "sst2"), "train", "text"), 20000)
    test_texts, test_labels = T.texts_and_labels(load_split(str(SHARED_DATA / "sst2"), "eval", "text"))
    sentiment = T.SentimentClassifier().fit(train_texts, train_labels)
    assert sentiment.accuracy(test_texts, test_labels) > 0.75
    texts = ["a wonderful , moving and beautifully acted film .", "a dull , tedious and painfully boring mess ."]
    assert sentiment.accuracy(texts, [1, 0]) == 1.0


def test_optional_pretrained_metrics_skip_quickly_without_weights(monkeypatch, tmp_path):
    from pipelines.pretrained_metrics import optional_pretrained_metrics

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    images = torch.zeros(4, 1, 16, 16)
    start = time.perf_counter()
    metrics, notes = optional_pretrained_metrics(images, images)
    assert metrics == {}
    assert len(notes) == 1 and notes[0].startswith("fid skipped")
    assert time.perf_counter() - start < 5


def test_power_spectrum_finds_stripes_and_blur():
    from pipelines.image_metrics import high_frequency_ratio, radial_power_spectrum

    torch.manual_seed(0)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(32, 1, 32, 32), 5, stride=1, padding=2)  # low-pass "images"
    columns = torch.arange(32).view(1, 1, 1, 32)
    striped = smooth + 0.2 * (columns % 2 * 2 - 1)  # period-2 vertical stripes: 0.5 cycles / pixel
    frequencies, power = radial_power_spectrum(striped)
    assert frequencies.min() > 0 and frequencies.max() == 0.5 and len(frequencies) == len(power) == 16
    assert power[-1] > 100 * radial_power_spectrum(smooth)[1][-1]  # the stripes' frequency stands out
    assert high_frequency_ratio(striped, smooth) > 10
    assert high_frequency_ratio(smooth, smooth) == pytest.approx(1.0)
    blurred = torch.nn.functional.avg_pool2d(smooth, 3, stride=1, padding=1)
    assert high_frequency_ratio(blurred, smooth) < 0.75  # blur removes high-frequency power
    flat = torch.ones(4, 1, 16, 16)  # a constant image has no power away from 0
    assert radial_power_spectrum(flat)[1].max() == pytest.approx(0.0, abs=1e-20)


def test_power_spectrum_of_a_cosine_on_a_hand_computed_case():
    from pipelines.image_metrics import radial_power_spectrum

    size, cycles = 16, 4
    columns = torch.arange(size, dtype=torch.float64)
    image = torch.cos(2 * math.pi * cycles * columns / size).expand(1, 1, size, size)
    frequencies, power = radial_power_spectrum(image)
    # fft2 puts (size^2 / 2)^2 at (0, +-4) each; the ring at radius 4 averages that over its cells.
    offsets = range(-size // 2, size // 2)
    ring = sum(1 for fy in offsets for fx in offsets if round(math.hypot(fy, fx)) == cycles)
    expected = np.zeros(size // 2)
    expected[cycles - 1] = 2 * (size**2 / 2) ** 2 / ring
    assert frequencies == pytest.approx(np.arange(1, size // 2 + 1) / size)
    assert power == pytest.approx(expected, abs=1e-6)


def test_the_sweep_floor_takes_other_images_with_exactly_the_reference_labels():
    from pipelines.evaluate import _same_labels

    labels = torch.tensor([0, 1, 1, 2, 0, 1, 2, 2])
    picked = _same_labels(labels, [1, 2, 1])
    assert sorted(labels[picked].tolist()) == [1, 1, 2] and len(set(picked.tolist())) == 3
    assert _same_labels(labels, [0, 0, 0]) is None  # only two images of class 0


def test_capped_evaluations_draw_across_a_split_stored_sorted_by_label():
    """MNIST's splits are stored sorted by label, so their first 2,000 test images are all 0s and 1s. An evaluation
    capped at N items (the real rows and the labels samples are requested with, reconstruction metrics, the prior's
    validation) draws them across the split instead, the same draw every time."""
    test = load_split("digits", "eval", "image")
    records = sorted(test.records, key=lambda r: r["label"])
    assert {r["label"] for r in records[:60]} == {0, 1}  # what the first 60 would have been
    stored_sorted = Split(records, test.column, test.class_names, test.fingerprint + "-sorted", "digits")
    images, labels = C.load_images(stored_sorted, "eval", 16, 1, max_items=60)
    assert images.shape == (60, 1, 16, 16) and set(labels.tolist()) == set(range(10))
    assert C.load_images(stored_sorted, "eval", 16, 1, max_items=60)[1].tolist() == labels.tolist()
    assert C.load_images(stored_sorted, "eval", 16, 1)[1].tolist() == [r["label"] for r in records]  # uncapped: all
    assert evaluation_subset(5, 10) == evaluation_subset(5, None) == [0, 1, 2, 3, 4]
    draw = evaluation_subset(1000, 100)
    assert len(set(draw)) == 100 and draw == sorted(draw) and min(draw) < 100 and max(draw) > 900
