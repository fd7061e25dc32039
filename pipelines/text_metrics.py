"""Text sample metrics: distinct-n, self-BLEU-4, lengths, a character n-gram perplexity and sentiment agreement."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence

import numpy as np

from stage1_tokenizer.data import Split, evaluation_subset


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al. 2016) over whitespace-split words: unique n-grams / all n-grams across the texts."""
    grams = [gram for text in texts for gram in _ngrams(text.split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


COPY_SPAN = 32  # characters: longer than any phrase text repeats by chance, shorter than a memorised window


def copy_rate(texts: Sequence[str], train_texts: Sequence[str], span: int = COPY_SPAN) -> float:
    """Share of the texts' `span`-character substrings (every position) that occur verbatim in `train_texts`: how
    much of the samples a prior copied from its training data. Real held-out text sets the natural level (repeated
    names, refrains); 0.0 when no text is `span` characters long."""
    wanted = Counter(text[i : i + span] for text in texts for i in range(len(text) - span + 1))
    if not wanted:
        return 0.0
    found = set()
    for text in train_texts:  # one pass over the training text, looking up only the samples' substrings
        found.update(piece for piece in (text[i : i + span] for i in range(len(text) - span + 1)) if piece in wanted)
    return sum(count for piece, count in wanted.items() if piece in found) / sum(wanted.values())


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

    def text_nll(self, text: str) -> float:
        """Negative log-likelihood (nats) of one text's UTF-8 bytes, scored from an empty context."""
        if not self.counts:
            raise ValueError("CharNgramModel is not fitted; call fit(texts) first")
        data = text.encode("utf-8")
        return -sum(math.log(self.probability(data[max(0, i - self.order + 1) : i], data[i])) for i in range(len(data)))

    def perplexity(self, texts: Sequence[str]) -> float:
        """exp(mean negative log-likelihood per byte) over the texts, each scored from an empty context."""
        if not self.counts:
            raise ValueError("CharNgramModel is not fitted; call fit(texts) first")
        nll = sum(self.text_nll(text) for text in texts)
        num_bytes = sum(len(text.encode("utf-8")) for text in texts)
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


def texts_and_labels(split: Split, max_items: int | None = None) -> tuple[list[str], list[int] | None]:
    """The texts of a text split and their integer labels (None for unlabelled data); at most `max_items`, drawn
    by `evaluation_subset` (a fixed random draw, in order: never the first N of a split stored sorted)."""
    indices = evaluation_subset(len(split.records), max_items)
    if isinstance(split.records, list):  # built-ins: a list of dicts
        records = [split.records[i] for i in indices]
        texts = [r[split.column] for r in records]
        labels = [int(r["label"]) for r in records] if split.class_names is not None else None
    else:  # a datasets.Dataset: indexing with a list of rows gives a dict of columns
        columns = split.records[indices]
        texts = list(columns[split.column])
        labels = [int(v) for v in columns["label"]] if split.class_names is not None else None
    return [t if t is not None else "" for t in texts], labels


def text_generation_metrics(texts: list[str], train_texts: list[str], ngram_model: CharNgramModel | None = None,
                            sentiment: SentimentClassifier | None = None,
                            requested_labels: Sequence[int] | None = None) -> dict[str, float]:
    """Diversity, length, n-gram perplexity and sentiment agreement of text samples.

    Keys: distinct_1, distinct_2, distinct_3 (word level), self_bleu4 (word level), length_mean, length_std,
    length_min, length_max (UTF-8 bytes), ngram_perplexity (per byte, under `ngram_model`, or an order-5
    CharNgramModel fit on `train_texts`), copy_rate (see `copy_rate`), and sentiment_agreement when both
    `sentiment` and `requested_labels` are given.
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
        copy_rate=copy_rate(texts, train_texts),
    )
    if sentiment is not None and requested_labels is not None:
        if len(requested_labels) != len(texts):
            raise ValueError(f"requested_labels ({len(requested_labels)}) must match texts ({len(texts)})")
        metrics["sentiment_agreement"] = sentiment.accuracy(texts, requested_labels)
    return metrics
