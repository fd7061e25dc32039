"""`vqgen compare` report: a self-contained report.html and a report.md built from metrics.json and the run folder.

The verdict is computed from the generation metrics (which tokenizer's samples win more of them), every table
has a real-data baseline column, and the training curves are drawn from the stage-1 and stage-2 metrics.jsonl
logs. Anything missing (a metric, a log, a figure) is left out with a note instead of breaking the page.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import numbers
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

VARIANTS = ("vqvae", "vqgan")
COLUMNS = (*VARIANTS, "real")
COLUMN_NAMES = {"vqvae": "VQ-VAE", "vqgan": "VQGAN", "real": "Real data"}
COLORS = {"vqvae": "#1f77b4", "vqgan": "#d95f02"}  # the same colours in the tables and the plots
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PIXELATED_MAX_WIDTH = 420  # grids narrower than a column get scaled up, so keep their pixels sharp
MAX_TEXT_SAMPLES = 16
MAX_TEXT_CHARS = 600


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
                            "(not FID: no Inception network)."),
    "classifier_accuracy": Metric("Classifier accuracy", "higher",
                                  "Share of reconstructions the evaluation classifier puts in the original's class.",
                                  "fraction"),
    "classifier_accuracy_real": Metric("Classifier accuracy (originals)", None,
                                       "The evaluation classifier's accuracy on the original test images.",
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
    # The spread of lengths is shown, not scored: it would count one property four times (and fixed-size windows
    # make every variant tie on it).
    "length_std": Metric("Length std", None, "Standard deviation of sample length in bytes."),
    "length_min": Metric("Length min", None, "Shortest sample in bytes."),
    "length_max": Metric("Length max", None, "Longest sample in bytes."),
    "ngram_perplexity": Metric("n-gram perplexity", "closer",
                               "Per-byte perplexity under a character 5-gram model fit on the train split (fluency)."),
    "sentiment_agreement": Metric("Sentiment agreement", "higher",
                                  "Share of samples a TF-IDF + logistic-regression classifier gives the requested "
                                  "sentiment.", "fraction"),
    # Prior: lower means a tokenizer's codes are easier to predict, which says nothing about sample quality
    "val_nll": Metric("Validation NLL", None, "The prior's held-out negative log-likelihood per code (nats); "
                                              "code predictability, not sample quality."),
    "val_bits_per_code": Metric("Validation bits/code", None, "The same in bits per code."),
    # Training cost
    "tokenizer_seconds": Metric("Tokenizer training", None, "Wall-clock time of stage 1.", "seconds"),
    "prior_seconds": Metric("Prior training", None, "Wall-clock time of stage 2.", "seconds"),
}

GOALS = {"lower": "↓ lower", "higher": "↑ higher", "closer": "≈ real", None: ""}
TABLES = {"generation": "Generated samples", "reconstruction": "Reconstruction of the test split",
          "prior": "Prior (stage 2)", "training": "Training time"}  # metrics dict section -> heading
SETTING_UNITS = {"elapsed_seconds": "seconds", "train_seconds": "seconds", "test_accuracy": "fraction",
                 "train_accuracy": "fraction", "sentiment_test_accuracy": "fraction"}
SETTING_LABELS = {
    "dataset": "Data set", "modality": "Modality", "budget": "Budget", "seed": "Seed",
    "class_conditional": "Class-conditional", "tokenizer_preset": "Tokenizer preset", "prior_preset": "Prior preset",
    "tokenizer_steps": "Tokenizer steps", "prior_steps": "Prior steps", "tokenizer_batch": "Tokenizer batch size",
    "disc_start": "Discriminator start step", "num_eval_samples": "Evaluation samples (N)",
    "guidance_scale": "Guidance scale", "perceptual_backend": "Perceptual loss network", "elapsed_seconds": "Elapsed",
    "library_versions": "Library versions", "class_names": "Classes",
}
CLASSIFIER_LABELS = {  # the evaluation classifier's facts shown up front; the rest go under "all fields"
    "test_accuracy": "Classifier test accuracy", "sentiment_test_accuracy": "Sentiment classifier test accuracy",
    "train_accuracy": "Classifier train accuracy", "num_steps": "Classifier training steps",
    "weights_sha256": "Classifier weights SHA-256",
}


# ----------------------------------------------------------------------------------------------------
# Numbers and verdicts
# ----------------------------------------------------------------------------------------------------


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)  # numpy scalars included


def _significant(value: float, digits: int = 4) -> str:
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    if 4 <= magnitude < 12:  # 12345.6 -> "12,350", not "1.235e+04"
        return f"{round(value, digits - 1 - magnitude):,.0f}"
    return f"{value:.{digits}g}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.3g} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def format_value(value, unit: str = "") -> str:
    """A metric or setting value for a table: 4 significant digits, fractions and percents as %, durations."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if _is_number(value):
        value = int(value) if isinstance(value, numbers.Integral) else float(value)
    if isinstance(value, int):
        return f"{value:,}" if unit != "seconds" else _duration(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if math.isinf(value):
            return "∞" if value > 0 else "−∞"
        if unit == "fraction":
            return f"{_significant(value * 100)}%"
        if unit == "percent":
            return f"{_significant(value)}%"
        if unit == "seconds":
            return _duration(value)
        return _significant(value) + (" dB" if unit == "dB" else "")
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return str(value)


# Differences under 1% are noise at these sample sizes (and a 4th-decimal lead in distinct-n is no lead).
TIE_TOLERANCE = 0.01


def better_variant(key: str, values: dict) -> str | None:
    """"vqvae" or "vqgan" (whichever is better on `key`), "tie", or None when the metric is not judged.

    `values` maps columns ("vqvae", "vqgan", "real") to numbers. Values within TIE_TOLERANCE of each other
    (relative to the larger) are a tie, and so are "closer" metrics whose distances to the real baseline differ
    by less than that share of the values; "closer" metrics need the real baseline.
    """
    metric = METRICS.get(key)
    a, b = values.get("vqvae"), values.get("vqgan")
    if metric is None or metric.direction is None or not all(_is_number(v) and math.isfinite(v) for v in (a, b)):
        return None
    scale = max(abs(a), abs(b))
    if abs(a - b) <= TIE_TOLERANCE * scale:  # also every pair that prints the same at 4 significant digits
        return "tie"
    if metric.direction == "closer":
        real = values.get("real")
        if not (_is_number(real) and math.isfinite(real)):
            return None
        scale = max(scale, abs(real))
        a, b = -abs(a - real), -abs(b - real)  # higher = closer
        if abs(a - b) <= TIE_TOLERANCE * scale:
            return "tie"
    elif metric.direction == "lower":
        a, b = -a, -b
    return "vqvae" if a > b else "vqgan"


def _section(metrics: dict, name: str) -> dict:
    value = metrics.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"metrics[{name!r}] must be a dict, got {type(value).__name__}")
    return value


def _table_rows(group: dict) -> list[tuple[str, dict, str | None]]:
    """(key, {column: value}, verdict) per metric of a group such as metrics["generation"], known keys first."""
    columns = {c: dict(group[c]) if isinstance(group.get(c), dict) else {} for c in COLUMNS}
    folded = False
    for variant in VARIANTS:  # evaluation.py reports the originals' accuracy beside each variant's
        if "classifier_accuracy_real" in columns[variant] and "classifier_accuracy" in columns[variant]:
            columns["real"].setdefault("classifier_accuracy", columns[variant]["classifier_accuracy_real"])
            folded = True
    keys = list(dict.fromkeys(k for c in COLUMNS for k in columns[c]))
    keys = [k for k in METRICS if k in keys] + [k for k in keys if k not in METRICS]
    if folded:
        keys.remove("classifier_accuracy_real")
    rows = []
    for key in keys:
        values = {c: columns[c].get(key) for c in COLUMNS}
        rows.append((key, values, better_variant(key, values)))
    return rows


def _labels(keys: list[str]) -> str:
    return ", ".join(METRICS[k].label if k in METRICS else k for k in keys)


def _tally(group: dict) -> tuple[list[str], dict[str, list[str]], list[str]]:
    """(judged keys, {variant: keys it wins}, tied keys) of a metric group."""
    judged, wins, ties = [], {v: [] for v in VARIANTS}, []
    for key, _, verdict in _table_rows(group):
        if verdict is not None:
            judged.append(key)
            (ties if verdict == "tie" else wins[verdict]).append(key)
    return judged, wins, ties


def summarize(metrics: dict) -> str:
    """One paragraph (with Markdown **bold**) saying which tokenizer gave better samples, and the largest gap."""
    generation = _section(metrics, "generation")
    judged, wins, ties = _tally(generation)
    count = _section(metrics, "settings").get("num_eval_samples")
    judged_on = f"their {count:,} generated samples each" if isinstance(count, int) else "their generated samples"
    if not judged:
        return ("No generation metric with a direction was recorded for both tokenizers, so this report cannot "
                "say which gave better samples.")
    a, b = (len(wins[v]) for v in VARIANTS)
    if a == b:
        text = (f"Judged by {judged_on}, neither tokenizer is ahead: VQ-VAE and VQGAN each lead on {a} of "
                f"{len(judged)} generation metrics with a direction")
    else:
        winner, loser = ("vqvae", "vqgan") if a > b else ("vqgan", "vqvae")
        verdict = "gave the better samples" if 2 * len(wins[winner]) > len(judged) else "is narrowly ahead"
        text = (f"Judged by {judged_on}, **{COLUMN_NAMES[winner]}** {verdict}: it leads on "
                f"{len(wins[winner])} of {len(judged)} generation metrics with a direction ({_labels(wins[winner])})")
        text += f", {COLUMN_NAMES[loser]} on {len(wins[loser])}"
        text += f" ({_labels(wins[loser])})" if wins[loser] else ""
    text += f", with {len(ties)} tied within {TIE_TOLERANCE:.0%} ({_labels(ties)})." if ties else "."

    gaps = []
    for key, values, verdict in _table_rows(generation):
        if verdict in VARIANTS:
            a_value, b_value = values["vqvae"], values["vqgan"]
            scale = max(abs(a_value), abs(b_value))
            gaps.append((abs(a_value - b_value) / scale if scale else 0.0, key, values, verdict))
    if gaps:
        gap, key, values, verdict = max(gaps, key=lambda item: item[0])
        metric, other = METRICS[key], "vqgan" if verdict == "vqvae" else "vqvae"
        goal = (f"closer to the real data's {format_value(values['real'], metric.unit)} is better"
                if metric.direction == "closer" else f"{metric.direction} is better")
        text += (f" The largest relative difference is in {metric.label}: {format_value(values[verdict], metric.unit)}"
                 f" for {COLUMN_NAMES[verdict]} against {format_value(values[other], metric.unit)} for "
                 f"{COLUMN_NAMES[other]} ({gap:.0%} apart; {goal}).")
    rec_judged, rec_wins, _ = _tally(_section(metrics, "reconstruction"))
    if rec_judged:
        text += (f" On reconstruction of the test split VQ-VAE leads on {len(rec_wins['vqvae'])} and VQGAN on "
                 f"{len(rec_wins['vqgan'])} of {len(rec_judged)} metrics; reconstruction and sample quality "
                 "need not agree.")
    return text + gan_health_sentence(metrics.get("gan_health"))


def gan_health_sentence(health) -> str:
    """A sentence on whether VQGAN's discriminator separated real from reconstructed images ('' without data)."""
    if not isinstance(health, dict) or not _is_number(health.get("disc_loss")):
        return ""
    accuracy = (f", accuracy {health.get('disc_acc_real', float('nan')):.0%} on real and "
                f"{health.get('disc_acc_fake', float('nan')):.0%} on reconstructed patches"
                if _is_number(health.get("disc_acc_real")) else "")
    figures = (f"hinge loss {health['disc_loss']:.3f}{accuracy} over the last quarter of its steps; "
               "1.0 and 50% are chance")
    if health.get("separated"):
        return f" VQGAN's discriminator separated real from reconstructed images ({figures})."
    return (f" **VQGAN's discriminator never separated real from reconstructed images** ({figures}), so its "
            "adversarial term carried no signal: read the VQGAN column as an L1 + perceptual autoencoder, not as "
            "a working GAN (see GAN health under Training curves).")


# ----------------------------------------------------------------------------------------------------
# Inputs: logs and figures
# ----------------------------------------------------------------------------------------------------


def _read_log(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl, sorted by step, last row per step kept; unreadable lines (a killed run) skipped."""
    rows: dict[int, dict] = {}
    if not path.is_file():
        return []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and _is_number(row.get("step")):
            rows[int(row["step"])] = row
    return [rows[step] for step in sorted(rows)]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(int(r["step"]), float(r[key])) for r in rows if _is_number(r.get(key)) and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


class _Figures:
    """Loads figure files as PNG bytes once each and records a note for each one that cannot be shown."""

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
        self.cache: dict[str, bytes | None] = {}
        self.notes: dict[str, str] = {}

    def png(self, path, label: str) -> bytes | None:
        key = str(path)
        if key not in self.cache:
            self.cache[key] = self._load(path, label)
        return self.cache[key]

    def _load(self, path, label: str) -> bytes | None:
        file = self.output_dir / str(path)  # an absolute path stays absolute
        if not file.is_file():
            self.notes[str(path)] = f"{label}: {path} is missing, so it is not shown."
            return None
        data = file.read_bytes()
        if data.startswith(PNG_MAGIC):
            return data
        try:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as image:
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                return buffer.getvalue()
        except Exception as error:  # any undecodable file becomes a note, never a broken <img>
            self.notes[str(path)] = f"{label}: {path} is not a readable image ({type(error).__name__})."
            return None

    def link(self, path) -> str:
        """The figure's path relative to the output folder, URL-quoted for a Markdown link."""
        file = Path(str(path))
        if file.is_absolute():
            try:
                file = file.relative_to(self.output_dir)
            except ValueError:
                pass
        return quote(file.as_posix())


# ----------------------------------------------------------------------------------------------------
# Training curves (matplotlib, written to figures/ for the Markdown and embedded in the HTML)
# ----------------------------------------------------------------------------------------------------


def _plot(axis, steps: list[int], values: list[float], variant: str, label: str) -> None:
    color = COLORS[variant]
    window = max(1, len(values) // 40)
    if window > 1:  # noisy per-step losses: raw in faint, a running mean on top
        axis.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        cumulative = [0.0]
        for value in values:
            cumulative.append(cumulative[-1] + value)
        half = window // 2  # a centred window, so the mean does not lag behind the raw curve
        bounds = [(max(0, i - half), min(len(values), i + half + 1)) for i in range(len(values))]
        smooth = [(cumulative[hi] - cumulative[lo]) / (hi - lo) for lo, hi in bounds]
        axis.plot(steps, smooth, color=color, linewidth=1.8, label=label)
    else:
        axis.plot(steps, values, color=color, linewidth=1.8, marker="o" if len(values) < 30 else None,
                  markersize=3, label=label)


def _curve_figure(panels: list[tuple[str, str, dict[str, tuple[list[int], list[float]]]]],
                  log_scale: tuple[str, ...] = (), disc_start: int | None = None):
    """A row of panels (title, y label, {variant: series}); None when no panel has data."""
    from matplotlib.figure import Figure

    panels = [p for p in panels if any(steps for steps, _ in p[2].values())]
    if not panels:
        return None
    figure = Figure(figsize=(5.4 * len(panels), 3.4), layout="constrained")
    for axis, (title, ylabel, series) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        for variant, (steps, values) in series.items():
            if steps:
                _plot(axis, steps, values, variant, COLUMN_NAMES[variant])
        values = [v for _, vs in series.values() for v in vs]
        if title in log_scale and values and min(values) > 0 and max(values) / min(values) > 20:
            axis.set_yscale("log")
        if disc_start is not None:
            axis.axvline(disc_start, color=COLORS["vqgan"], linestyle=":", linewidth=1.2)
        axis.set_title(title, fontsize=11)
        axis.set_xlabel("step")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        axis.legend(frameon=False)
    return figure


HEALTH_COLORS = {"real": "#1a7f37", "fake": "#d95f02"}


def _gan_health_figure(rows: list[dict]):
    """VQGAN's discriminator over its steps: hinge loss, mean logits and accuracy on real and fake, GAN weight."""
    from matplotlib.figure import Figure

    loss_steps, loss = _series(rows, "disc_loss")
    if not loss_steps:
        return None
    weight_key = "adaptive_weight" if _series(rows, "adaptive_weight")[0] else "gan_weight"
    panels = [
        ("discriminator hinge loss (1.0 = chance)", {"hinge loss": (loss_steps, loss)}, 1.0),
        ("mean logit", {"real": _series(rows, "logits_real"), "fake": _series(rows, "logits_fake")}, 0.0),
        ("share of patches classified right", {"real": _series(rows, "disc_acc_real"),
                                               "fake": _series(rows, "disc_acc_fake")}, 0.5),
        (f"GAN weight ({weight_key})", {weight_key: _series(rows, weight_key)}, None),
    ]
    figure = Figure(figsize=(5.0 * len(panels), 3.3), layout="constrained")
    for axis, (title, series, chance) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        for label, (steps, values) in series.items():
            if steps:
                axis.plot(steps, values, color=HEALTH_COLORS.get(label, COLORS["vqgan"]), linewidth=1.4, label=label)
        if chance is not None:
            axis.axhline(chance, color="#59636e", linestyle=":", linewidth=1.0)
        axis.set_title(title, fontsize=11)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if sum(bool(steps) for steps, _ in series.values()) > 1:
            axis.legend(frameon=False)
    return figure


def write_training_plots(output_dir: Path) -> list[tuple[str, str]]:
    """Draw the stage-1 and stage-2 curves into output_dir/figures; returns (title, relative path) per plot."""
    stage1 = {v: _read_log(output_dir / "tokenizers" / v / "metrics.jsonl") for v in VARIANTS}
    stage2 = {v: _read_log(output_dir / "pipelines" / v / "metrics.jsonl") for v in VARIANTS}
    series = lambda logs, key: {v: _series(rows, key) for v, rows in logs.items()}
    disc_steps, _ = _series(stage1["vqgan"], "disc_loss")  # logged once VQGAN's discriminator is on
    disc_start = disc_steps[0] if disc_steps else None
    plots = {
        "curves_tokenizer_loss.png": ("Stage 1: tokenizer losses", _curve_figure(
            [("reconstruction loss (rec_loss)", "rec_loss", series(stage1, "rec_loss")),
             ("total loss (VQGAN's includes its GAN terms)", "loss", series(stage1, "loss"))],
            log_scale=("reconstruction loss (rec_loss)",), disc_start=disc_start)),
        "curves_codebook_usage.png": ("Stage 1: codebook usage", _curve_figure(
            [("codebook usage over a window of batches", "codes used (%)", series(stage1, "codebook_usage")),
             ("code perplexity", "perplexity", series(stage1, "perplexity"))], disc_start=disc_start)),
        "curves_gan_health.png": ("Stage 1: GAN health (VQGAN's discriminator)", _gan_health_figure(stage1["vqgan"])),
        "curves_prior.png": ("Stage 2: prior bits per code", _curve_figure(
            [("validation bits per code", "bits / code", series(stage2, "val_bits_per_code")),
             ("training bits per code", "bits / code", series(stage2, "bits_per_code"))])),
    }
    written = []
    for name, (title, figure) in plots.items():
        if figure is not None:
            (output_dir / "figures").mkdir(parents=True, exist_ok=True)
            figure.savefig(output_dir / "figures" / name, format="png", dpi=100)
            written.append((title, f"figures/{name}"))
    return written


# ----------------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------------

CSS = """
:root { --fg: #1f2328; --muted: #59636e; --border: #d1d9e0; --soft: #f6f8fa; --accent: #0969da; --good: #1a7f37; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
       font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 28px 20px 56px; }
h1 { font-size: 1.75rem; margin: 0 0 2px; line-height: 1.25; }
h2 { font-size: 1.3rem; margin: 2.2rem 0 .8rem; padding-bottom: .3rem; border-bottom: 1px solid var(--border); }
h3 { font-size: 1.05rem; margin: 1.4rem 0 .5rem; }
.subtitle { color: var(--muted); margin: 0 0 1rem; }
nav { font-size: .9rem; margin: 0 0 1rem; display: flex; flex-wrap: wrap; gap: .2rem 1rem; }
nav a { color: var(--accent); text-decoration: none; white-space: nowrap; }
.summary { font-size: 1.05rem; background: var(--soft); border-left: 4px solid var(--accent);
           padding: 14px 18px; margin: 0; border-radius: 0 6px 6px 0; }
.cols { display: grid; grid-template-columns: repeat(3, minmax(0, 1fr)); gap: 18px; align-items: start; }
@media (max-width: 760px) { .cols { grid-template-columns: minmax(0, 1fr); } main { padding: 16px 12px 40px; } }
figure { margin: 0; min-width: 0; }
figure img { display: block; width: 100%; height: auto; border: 1px solid var(--border); border-radius: 4px; }
figure.plot img { width: auto; max-width: 100%; margin: 0 auto; border: 0; }
figure.plot { margin-bottom: 1.2rem; }
img.pixelated { image-rendering: pixelated; }
figcaption { font-weight: 600; margin: 0 0 6px; }
figure.plot figcaption { text-align: left; }
.caption { color: var(--muted); font-size: .9rem; margin: .3rem 0 1rem; }
.missing { color: #9a6700; background: #fff8c5; border: 1px dashed #d4a72c; border-radius: 4px; padding: 10px 12px;
           font-size: .9rem; margin: 0; overflow-wrap: anywhere; }
.table-wrap { overflow-x: auto; margin: 0 0 1rem; border: 1px solid var(--border); border-radius: 6px; }
table { border-collapse: collapse; width: 100%; font-size: .93rem; }
th, td { padding: 7px 12px; text-align: left; vertical-align: top; border-bottom: 1px solid var(--border); }
tr:last-child td { border-bottom: 0; }
thead th { background: var(--soft); font-weight: 600; white-space: nowrap; }
td.num, th.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
td.better { color: var(--good); }
td.goal { white-space: nowrap; color: var(--muted); }
td.desc, th.desc { min-width: 16em; width: 100%; }
td.desc { color: var(--muted); }
td.key { white-space: nowrap; }
td.key code { display: block; font-size: .78rem; color: var(--muted); }
.settings td:first-child { white-space: nowrap; width: 16em; }
.facts { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); grid-auto-flow: row dense;
         border: 1px solid var(--border); border-radius: 6px; overflow: hidden; margin-bottom: .8rem; }
.facts > div { padding: 8px 12px; min-width: 0; box-shadow: 1px 0 0 var(--border), 0 1px 0 var(--border); }
.facts > div.wide { grid-column: span 2; }
@media (max-width: 400px) { .facts > div.wide { grid-column: auto; } }
.facts .k { display: block; font-size: .78rem; color: var(--muted); }
.facts .v { display: block; overflow-wrap: anywhere; }
details summary { cursor: pointer; color: var(--accent); margin: .2rem 0 .6rem; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; overflow-wrap: anywhere; }
.dot { display: inline-block; width: .7em; height: .7em; border-radius: 50%; margin-right: .35em; }
.dot-vqvae { background: #1f77b4; } .dot-vqgan { background: #d95f02; } .dot-real { background: #8c959f; }
ol.texts { margin: 0; padding-left: 1.8em; }
ol.texts li { white-space: pre-wrap; overflow-wrap: anywhere; font: 13px/1.45 ui-monospace, SFMono-Regular, Menlo,
              Consolas, monospace; padding: 5px 0; border-bottom: 1px solid var(--soft); }
ul.notes li { margin: .25rem 0; overflow-wrap: anywhere; }
footer { color: var(--muted); font-size: .85rem; margin-top: 2.5rem; }
"""


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _img(data: bytes, alt: str, pixelated: bool = True) -> str:
    width, height = struct.unpack(">II", data[16:24])  # the PNG IHDR chunk
    # small grids are scaled up to the column width with sharp pixels, but at most 4x (a 2x2 grid stays small)
    extra = f' class="pixelated" style="max-width: {4 * width}px"' if pixelated and width <= PIXELATED_MAX_WIDTH else ""
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img src="data:image/png;base64,{encoded}" alt="{_esc(alt)}" width="{width}" height="{height}"{extra}>'


def _cell(column: str, body: str) -> str:
    """One column of a VQ-VAE | VQGAN | real row: a coloured caption over an image, texts or a note."""
    name = _esc(COLUMN_NAMES.get(column, column))
    return f'<figure><figcaption><span class="dot dot-{_esc(column)}"></span>{name}</figcaption>{body}</figure>'


def _figure_row(figures: _Figures, paths: dict, what: str) -> str:
    cells = []
    for column in [c for c in COLUMNS if c in paths] + [c for c in paths if c not in COLUMNS]:
        alt = f"{COLUMN_NAMES.get(column, column)} {what}"
        data = figures.png(paths[column], alt)
        note = figures.notes.get(str(paths[column]), "")
        cells.append(_cell(column, _img(data, alt) if data else f'<p class="missing">{_esc(note)}</p>'))
    return f'<div class="cols">{"".join(cells)}</div>'


def _table_layout(rows: list) -> tuple[list[str], bool]:
    """The value columns to show (real only when some row has a baseline) and whether any row has a goal."""
    show_real = any(values["real"] is not None for _, values, _ in rows)
    show_goal = any(key in METRICS and METRICS[key].direction for key, _, _ in rows)
    return [c for c in COLUMNS if c != "real" or show_real], show_goal


def _metric_table_html(name: str, group: dict) -> str:
    rows = _table_rows(group)
    if not rows:
        return ""
    columns, show_goal = _table_layout(rows)
    head = "".join(f'<th class="num"><span class="dot dot-{c}"></span>{COLUMN_NAMES[c]}</th>' for c in columns)
    body = []
    for key, values, verdict in rows:
        metric = METRICS.get(key, Metric(key, None, ""))
        cells = [f'<td class="key">{_esc(metric.label)}' + (f"<code>{_esc(key)}</code>" if key in METRICS else "")
                 + "</td>"]
        for column in columns:
            text = _esc(format_value(values[column], metric.unit))
            if column == verdict:
                cells.append(f'<td class="num better" data-variant="{column}"><strong>{text}</strong> ▲</td>')
            else:
                cells.append(f'<td class="num" data-variant="{column}">{text}</td>')
        if show_goal:
            cells.append(f'<td class="goal">{GOALS[metric.direction]}</td>')
        cells.append(f'<td class="desc">{_esc(metric.description)}</td>')
        body.append(f'<tr data-table="{_esc(name)}" data-metric="{_esc(key)}">{"".join(cells)}</tr>')
    goal = "<th>Goal</th>" if show_goal else ""
    return (f'<div class="table-wrap"><table class="metrics"><thead><tr><th>Metric</th>{head}{goal}'
            f'<th class="desc">What it measures</th></tr></thead><tbody>{"".join(body)}</tbody></table></div>')


def _settings_rows(metrics: dict) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(main, more) rows of (label, formatted value): the run's settings and key classifier facts, then the rest."""
    main, more = [], []
    for key, value in _section(metrics, "settings").items():
        main.append((SETTING_LABELS.get(key, key.replace("_", " ").capitalize()),
                     format_value(value, SETTING_UNITS.get(key, ""))))
    classifier = _section(metrics, "classifier")
    for key, value in classifier.items():
        if isinstance(value, (dict, list)):  # its config and class names are in metrics.json
            continue
        text = format_value(value, SETTING_UNITS.get(key, ""))
        if key in CLASSIFIER_LABELS:
            main.append((CLASSIFIER_LABELS[key], text))
        else:
            more.append((f"Classifier {key.replace('_', ' ')}", text))
    return main, more


def _text_groups(text_samples: dict) -> list[tuple[str | None, dict[str, list[str]]]]:
    """[(class name or None, {column: texts})]: lists and per-class dicts both accepted."""
    per_column: dict[str, dict] = {}
    for column, value in text_samples.items():
        if isinstance(value, (list, tuple)):
            per_column[column] = {None: [str(t) for t in value]}
        elif isinstance(value, dict):
            per_column[column] = {str(k): [str(t) for t in v] for k, v in value.items() if isinstance(v, (list, tuple))}
    order = [c for c in COLUMNS if c in per_column] + [c for c in per_column if c not in COLUMNS]
    groups = list(dict.fromkeys(g for c in order for g in per_column[c]))
    return [(g, {c: per_column[c].get(g) for c in order}) for g in groups]


def _clip(text: str) -> str:
    return text if len(text) <= MAX_TEXT_CHARS else text[:MAX_TEXT_CHARS] + "…"


def _text_samples_html(text_samples: dict) -> str:
    parts = []
    for group, columns in _text_groups(text_samples):
        if group is not None:
            parts.append(f"<h3>Class: {_esc(group)}</h3>")
        cells = []
        for column, texts in columns.items():
            if texts:
                items = "".join(f"<li>{_esc(_clip(t))}</li>" for t in texts[:MAX_TEXT_SAMPLES])
                body = f'<ol class="texts">{items}</ol>'
                if len(texts) > MAX_TEXT_SAMPLES:
                    body += f'<p class="caption">{len(texts) - MAX_TEXT_SAMPLES} more not shown</p>'
            else:
                body = '<p class="missing">No samples.</p>'
            cells.append(_cell(column, body))
        parts.append(f'<div class="cols">{"".join(cells)}</div>')
    return "".join(parts)


def _title(metrics: dict) -> tuple[str, str]:
    settings = _section(metrics, "settings")
    title = "VQ-VAE vs VQGAN tokenizers" + (f" on {settings['dataset']}" if settings.get("dataset") else "")
    facts = [f"{settings[k]} {label}".strip() for k, label in
             (("modality", "modality"), ("budget", "budget")) if settings.get(k)]
    if settings.get("seed") is not None:
        facts.append(f"seed {settings['seed']}")
    return title, " · ".join(["vqgen compare"] + facts)


def _render_html(metrics: dict, figures: _Figures, plots: list[tuple[str, str]], notes: list[str]) -> str:
    title, subtitle = _title(metrics)
    summary = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", _esc(summarize(metrics)))
    sections = [("summary", "Summary", f'<p class="summary">{summary}</p>')]
    settings, more = _settings_rows(metrics)
    if settings or more:
        cells = "".join(f'<div class="{"wide" if len(v) > 28 else "fact"}"><span class="k">{_esc(k)}</span>'
                        f'<span class="v">{_esc(v)}</span></div>' for k, v in settings)
        content = f'<div class="facts">{cells}</div>' if settings else ""
        if more:
            rows = "".join(f"<tr><td>{_esc(k)}</td><td><code>{_esc(v)}</code></td></tr>" for k, v in more)
            content += (f"<details><summary>All evaluation-classifier fields</summary><div class=\"table-wrap\">"
                        f'<table class="settings"><tbody>{rows}</tbody></table></div></details>')
        sections.append(("settings", "Settings", content))

    paths = _section(metrics, "figures")
    samples = []
    if isinstance(paths.get("samples"), dict) and paths["samples"]:
        samples.append(_figure_row(figures, paths["samples"], "samples"))
        if _section(metrics, "settings").get("class_conditional"):
            samples.append('<p class="caption">Class-conditional samples: one row per class, in class order.</p>')
    for class_name, class_paths in (paths.get("samples_per_class") or {}).items():
        if isinstance(class_paths, dict):
            samples.append(f"<h3>Class: {_esc(class_name)}</h3>" + _figure_row(figures, class_paths,
                                                                                f"samples of {class_name}"))
    if isinstance(metrics.get("text_samples"), dict) and metrics["text_samples"]:
        samples.append(_text_samples_html(metrics["text_samples"]))
    if samples:
        sections.append(("samples", "Generated samples", "".join(samples)))
    if isinstance(paths.get("reconstructions"), dict) and paths["reconstructions"]:
        spectrum = figures.png(paths["spectrum"], "power spectrum") if paths.get("spectrum") else None
        sections.append(("reconstructions", "Reconstructions",
                         _figure_row(figures, paths["reconstructions"], "reconstructions")
                         + '<p class="caption">Test images (top row) and their reconstructions (bottom row).</p>'
                         + (f'<figure class="plot"><figcaption>Power spectra of real images, reconstructions '
                            f'(solid) and samples (dashed)</figcaption>{_img(spectrum, "power spectrum", False)}'
                            "</figure>" if spectrum else "")))

    tables = []
    for name, heading in TABLES.items():
        table = _metric_table_html(name, _section(metrics, name))
        if table:
            tables.append(f'<h3 id="table-{name}">{heading}</h3>{table}')
    if tables:
        sections.append(("metrics", "Metrics",
                         '<p class="caption">▲ and bold mark the better tokenizer on metrics with a goal; '
                         "“≈ real” means closer to the real-data column is better.</p>" + "".join(tables)))

    plot_html = []
    for plot_title, path in plots:
        data = figures.png(path, plot_title)
        if data:
            plot_html.append(f'<figure class="plot"><figcaption>{_esc(plot_title)}</figcaption>'
                             f"{_img(data, plot_title, pixelated=False)}</figure>")
    if plot_html:
        caption = ('<p class="caption">Faint lines are raw logged values, solid lines a running mean; where shown, '
                   "the dotted line marks where VQGAN's discriminator switched on.</p>")
        sections.append(("curves", "Training curves", caption + "".join(plot_html)))
    all_notes = notes + list(figures.notes.values())
    if all_notes:
        items = "".join(f"<li>{_esc(n)}</li>" for n in all_notes)
        sections.append(("notes", "Notes", f'<ul class="notes">{items}</ul>'))

    nav = "".join(f'<a href="#{key}">{_esc(heading)}</a>' for key, heading, _ in sections)
    body = "".join(f'<section id="{key}"><h2>{_esc(heading)}</h2>{content}</section>'
                   for key, heading, content in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_esc(title)}</title><style>{CSS}</style></head><body><main>"
            f'<header><h1>{_esc(title)}</h1><p class="subtitle">{_esc(subtitle)}</p><nav>{nav}</nav></header>'
            f"{body}<footer>Written by <code>vqgen compare</code>; every number is also in metrics.json."
            "</footer></main></body></html>\n")


# ----------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------


def _md_cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_figures(figures: _Figures, paths: dict, what: str) -> list[str]:
    columns = [c for c in COLUMNS if c in paths] + [c for c in paths if c not in COLUMNS]
    names = [COLUMN_NAMES.get(c, str(c)) for c in columns]
    cells = []
    for column, name in zip(columns, names):
        if figures.png(paths[column], f"{name} {what}"):
            cells.append(f"![{name} {what}]({figures.link(paths[column])})")
        else:
            cells.append(f"*missing: {_md_cell(paths[column])}*")
    return ["| " + " | ".join(names) + " |", "|" + "---|" * len(names), "| " + " | ".join(cells) + " |", ""]


def _metric_table_md(group: dict) -> list[str]:
    rows = _table_rows(group)
    if not rows:
        return []
    columns, show_goal = _table_layout(rows)
    lines = ["| Metric | " + " | ".join(COLUMN_NAMES[c] for c in columns) + (" | Goal" if show_goal else "")
             + " | What it measures |", "|---|" + "---:|" * len(columns) + "---|" * (2 if show_goal else 1)]
    for key, values, verdict in rows:
        metric = METRICS.get(key, Metric(key, None, ""))
        cells = [f"{metric.label} (`{key}`)" if key in METRICS else f"`{key}`"]
        for column in columns:
            text = format_value(values[column], metric.unit)
            cells.append(f"**{text}** ▲" if column == verdict else text)
        cells += [GOALS[metric.direction], metric.description] if show_goal else [metric.description]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return lines + [""]


def _md_text_block(texts: list[str]) -> list[str]:
    body = [_clip(t).replace("\n", " ⏎ ") for t in texts[:MAX_TEXT_SAMPLES]]
    longest = max((len(run) for t in body for run in re.findall(r"`+", t)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + "text", *body, fence, ""]


def _render_markdown(metrics: dict, figures: _Figures, plots: list[tuple[str, str]], notes: list[str]) -> str:
    title, subtitle = _title(metrics)
    lines = [f"# {title}", "", f"*{subtitle}*", "", "## Summary", "", summarize(metrics), ""]
    settings, more = _settings_rows(metrics)
    if settings or more:
        lines += ["## Settings", "", "| Setting | Value |", "|---|---|"]
        lines += [f"| {_md_cell(k)} | {_md_cell(v)} |" for k, v in settings + more] + [""]
    paths = _section(metrics, "figures")
    text_samples = metrics.get("text_samples") if isinstance(metrics.get("text_samples"), dict) else {}
    if paths.get("samples") or paths.get("samples_per_class") or text_samples:
        lines += ["## Generated samples", ""]
    if isinstance(paths.get("samples"), dict) and paths["samples"]:
        lines += _md_figures(figures, paths["samples"], "samples")
    for class_name, class_paths in (paths.get("samples_per_class") or {}).items():
        if isinstance(class_paths, dict):
            lines += [f"### Class: {class_name}", ""] + _md_figures(figures, class_paths, f"samples of {class_name}")
    for group, columns in _text_groups(text_samples):
        if group is not None:
            lines += [f"### Class: {group}", ""]
        for column, texts in columns.items():
            lines += [f"**{COLUMN_NAMES.get(column, column)}**", ""] + (_md_text_block(texts) if texts else
                                                                          ["*no samples*", ""])
    if isinstance(paths.get("reconstructions"), dict) and paths["reconstructions"]:
        lines += ["## Reconstructions", "", "Test images (top row) and their reconstructions (bottom row).", ""]
        lines += _md_figures(figures, paths["reconstructions"], "reconstructions")
        if paths.get("spectrum"):
            lines += ["Power spectra of real images, reconstructions (solid) and samples (dashed):", "",
                      f"![power spectrum]({figures.link(paths['spectrum'])})", ""]
    tables = []
    for name, heading in TABLES.items():
        table = _metric_table_md(_section(metrics, name))
        if table:
            tables += [f"### {heading}", ""] + table
    if tables:
        lines += ["## Metrics", "", "▲ and bold mark the better tokenizer on metrics with a goal; "
                                    "“≈ real” means closer to the real-data column is better.", ""] + tables
    if plots:
        lines += ["## Training curves", ""]
        for plot_title, path in plots:
            lines += [f"### {plot_title}", "", f"![{plot_title}]({figures.link(path)})", ""]
    all_notes = notes + list(figures.notes.values())
    if all_notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in all_notes] + [""]
    return "\n".join(lines)


def write_report(output_dir: Path, metrics: dict) -> tuple[Path, Path]:
    """Write output_dir/report.html (self-contained) and output_dir/report.md; returns their paths.

    `metrics` is the dict `vqgen compare` saves as metrics.json; any part of it may be missing. Training
    curves are read from output_dir/{tokenizers,pipelines}/<variant>/metrics.jsonl and also saved as
    output_dir/figures/curves_*.png so the Markdown can link them.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise ValueError(f"output_dir={str(output_dir)!r} is not an existing folder")
    if not isinstance(metrics, dict):
        raise TypeError(f"metrics must be a dict (the contents of metrics.json), got {type(metrics).__name__}")
    raw_notes = metrics.get("notes") or []
    notes = list(dict.fromkeys([raw_notes] if isinstance(raw_notes, str) else map(str, raw_notes)))
    plots = write_training_plots(output_dir)
    if not plots:
        notes.append("No training logs were found (tokenizers/*/metrics.jsonl, pipelines/*/metrics.jsonl), "
                     "so there are no training curves.")
    figures = _Figures(output_dir)
    html_text = _render_html(metrics, figures, plots, notes)
    markdown = _render_markdown(metrics, figures, plots, notes)
    html_path, md_path = output_dir / "report.html", output_dir / "report.md"
    html_path.write_text(html_text, encoding="utf-8")
    md_path.write_text(markdown, encoding="utf-8")
    return html_path, md_path
