"""The report's figures, drawn with matplotlib: training curves, GAN health, power spectra and the guidance sweep."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .verdict import COLUMN_NAMES, VARIANTS, is_number

COLORS = {"vqvae": "#1f77b4", "vqgan": "#d95f02"}  # the same colours in the tables and the plots


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
        if isinstance(row, dict) and is_number(row.get("step")):
            rows[int(row["step"])] = row
    return [rows[step] for step in sorted(rows)]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(int(r["step"]), float(r[key])) for r in rows if is_number(r.get(key)) and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


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


HEALTH_COLORS = {"real": "#1a7f37", "fake": "#d95f02", "separation AUC": "#6f42c1"}


def _gan_health_figure(rows: list[dict]):
    """VQGAN's discriminator over its steps: hinge loss, mean logits, accuracy on real and fake and the
    threshold-free separation AUC, GAN weight."""
    from matplotlib.figure import Figure

    loss_steps, loss = _series(rows, "disc_loss")
    if not loss_steps:
        return None
    weight_key = "adaptive_weight" if _series(rows, "adaptive_weight")[0] else "gan_weight"
    panels = [
        ("discriminator hinge loss (1.0 = chance)", {"hinge loss": (loss_steps, loss)}, 1.0),
        ("mean logit", {"real": _series(rows, "logits_real"), "fake": _series(rows, "logits_fake")}, 0.0),
        ("share of patches classified right", {"real": _series(rows, "disc_acc_real"),
                                               "fake": _series(rows, "disc_acc_fake"),
                                               "separation AUC": _series(rows, "disc_auc")}, 0.5),
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


def spectrum_figure(spectra: dict):
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


def guidance_sweep_figure(sweep: dict, real_fd: float | None):
    """Sample FD-classifier and class-conditional accuracy against the guidance scale, one line per variant."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10.0, 3.4), layout="constrained")
    fd_axis, accuracy_axis = figure.subplots(1, 2)
    for variant, rows in sweep.items():
        scales = [row["guidance_scale"] for row in rows]
        style = dict(color=COLORS.get(variant), marker="o", linewidth=1.5, label=COLUMN_NAMES.get(variant, variant))
        fd_axis.plot(scales, [row["fd_classifier"] for row in rows], **style)
        accuracy_axis.plot(scales, [100 * row["class_accuracy"] for row in rows], **style)
    if is_number(real_fd):
        fd_axis.axhline(real_fd, color="#1f2328", linestyle=":", linewidth=1.0, label="real images (same N)")
    fd_axis.set(xlabel="guidance scale", ylabel="FD-classifier (lower is better)")
    fd_axis.set_title("Samples against training images", fontsize=11)
    accuracy_axis.set(xlabel="guidance scale", ylabel="class-conditional accuracy (%)")
    accuracy_axis.set_title("Samples classified as their requested class", fontsize=11)
    for axis in (fd_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.legend(frameon=False, fontsize=8)
    return figure
