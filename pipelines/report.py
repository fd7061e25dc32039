"""`vqgen compare`'s report: report.html (self-contained) and report.md, rendered by jinja2 templates.

Both come from one CompareResult through one view (`build_view`): the report decides nothing. The verdict, the
intervals and the winners are the result's; this module formats numbers, loads figures and draws the training
curves. Templates live in pipelines/templates/.
"""

from __future__ import annotations

import base64
import io
import math
import numbers
import re
import struct
from pathlib import Path
from urllib.parse import quote

from markupsafe import Markup, escape

from .plots import write_training_plots
from .result import CompareResult
from .verdict import COLUMN_NAMES, COLUMNS, METRICS, Metric

TEMPLATES = Path(__file__).parent / "templates"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PIXELATED_MAX_WIDTH = 420  # grids narrower than a column get scaled up, so keep their pixels sharp
MAX_TEXT_SAMPLES = 16
MAX_TEXT_CHARS = 600
GOALS = {"lower": "↓ lower", "higher": "↑ higher", "closer": "≈ real", None: ""}
TABLES = {"generation": "Generated samples", "reconstruction": "Reconstruction of the test split",
          "prior": "Prior (stage 2)", "training": "Training time"}
SETTING_UNITS = {"elapsed_seconds": "seconds", "train_seconds": "seconds", "test_accuracy": "fraction",
                 "train_accuracy": "fraction", "sentiment_test_accuracy": "fraction"}
SETTING_LABELS = {
    "dataset": "Data set", "modality": "Modality", "budget": "Budget", "seeds": "Seeds", "overrides": "Overrides",
    "class_conditional": "Class-conditional", "tokenizer_preset": "Tokenizer preset", "prior_preset": "Prior preset",
    "tokenizer_steps": "Tokenizer steps", "prior_steps": "Prior steps", "tokenizer_batch": "Tokenizer batch size",
    "prior_batch": "Prior batch size", "disc_start": "Discriminator start step",
    "num_eval_samples": "Evaluation samples (N)", "guidance_scale": "Guidance scale",
    "perceptual_backend": "Perceptual loss network", "elapsed_seconds": "Elapsed",
    "library_versions": "Library versions", "class_names": "Classes",
    "train_minutes": "Training time target (min)", "budget_fit": "Steps fitted to the machine",
    "sampling_precision": "Sampling precision", "jobs": "Training runs at once",
}
CLASSIFIER_LABELS = {  # the evaluation classifier's facts shown up front; the rest go under "all fields"
    "test_accuracy": "Classifier test accuracy", "sentiment_test_accuracy": "Sentiment classifier test accuracy",
    "train_accuracy": "Classifier train accuracy", "num_steps": "Classifier training steps",
    "weights_sha256": "Classifier weights SHA-256",
}


# ----------------------------------------------------------------------------------------------------
# Numbers
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


def format_value(value, unit: str = "", digits: int = 4) -> str:
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
            return f"{_significant(value * 100, digits)}%"
        if unit == "percent":
            return f"{_significant(value, digits)}%"
        if unit == "seconds":
            return _duration(value)
        return _significant(value, digits) + (" dB" if unit == "dB" else "")
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return str(value)


def format_interval(interval, unit: str = "") -> str:
    """"[low, high]" with 3 significant digits; "" without an interval."""
    if not (isinstance(interval, (list, tuple)) and len(interval) == 2 and all(map(_is_number, interval))):
        return ""
    return f"[{format_value(float(interval[0]), unit, 3)}, {format_value(float(interval[1]), unit, 3)}]"


# ----------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------


class FigureFiles:
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

    def figure(self, path, alt: str, pixelated: bool = True) -> dict:
        """What a template needs to show one figure: src (data URI) and size, link, or the note why not."""
        data = self.png(path, alt)
        shown = {"alt": alt, "path": str(path), "src": None, "width": None, "height": None, "link": self.link(path),
                 "pixelated": False, "note": self.notes.get(str(path), "")}
        if data is not None:
            width, height = struct.unpack(">II", data[16:24])  # the PNG IHDR chunk
            shown.update(src="data:image/png;base64," + base64.b64encode(data).decode("ascii"), width=width,
                         height=height, pixelated=pixelated and width <= PIXELATED_MAX_WIDTH)
        return shown


# ----------------------------------------------------------------------------------------------------
# The view: everything both templates show, formatted once
# ----------------------------------------------------------------------------------------------------


def _metric_tables(result: CompareResult) -> list[dict]:
    """Per metric group: its rows (label, key, goal, description, one cell per column) and whether a real column."""
    winners = {(group, e["key"]): e for group, entries in result.verdict.get("metrics", {}).items() for e in entries}
    tables = []
    for group, heading in TABLES.items():
        columns_data = getattr(result, group) or {}
        keys = list(dict.fromkeys(k for c in COLUMNS for k in (columns_data.get(c) or {})))
        keys = [k for k in METRICS if k in keys] + [k for k in keys if k not in METRICS]
        if not keys:
            continue
        show_real = any(k in (columns_data.get("real") or {}) for k in keys)
        columns = [c for c in COLUMNS if c != "real" or show_real]
        rows = []
        for key in keys:
            metric = METRICS.get(key, Metric(key, None, ""))
            judged = winners.get((group, key), {})
            cells = []
            for column in columns:
                value = (columns_data.get(column) or {}).get(key)
                spread = ((result.spread.get(group) or {}).get(column) or {}).get(key)
                interval = ((result.intervals.get(group) or {}).get(column) or {}).get(key)
                cells.append({"column": column, "text": format_value(value, metric.unit),
                              "spread": f"± {format_value(spread, metric.unit, 2)}" if _is_number(spread) else "",
                              "interval": format_interval(interval, metric.unit),
                              "winner": judged.get("winner") == column})
            rows.append({"key": key, "known": key in METRICS, "label": metric.label, "goal": GOALS[metric.direction],
                         "description": metric.description, "cells": cells, "outcome": judged.get("outcome", "")})
        tables.append({"name": group, "heading": heading, "columns": columns, "rows": rows,
                       "show_goal": any(METRICS[k].direction for k in keys if k in METRICS)})
    return tables


def _settings(result: CompareResult) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(main, more) rows of (label, formatted value): the run's settings and key classifier facts, then the rest."""
    main, more = [], []
    for key, value in result.settings.items():
        main.append((SETTING_LABELS.get(key, key.replace("_", " ").capitalize()),
                     format_value(value, SETTING_UNITS.get(key, "")) if value != {} else "none"))
    for key, value in result.classifier.items():
        if isinstance(value, (dict, list)):  # its config and class names are in metrics.json
            continue
        text = format_value(value, SETTING_UNITS.get(key, ""))
        if key in CLASSIFIER_LABELS:
            main.append((CLASSIFIER_LABELS[key], text))
        else:
            more.append((f"Classifier {key.replace('_', ' ')}", text))
    return main, more


def _ordered(paths: dict) -> list[str]:
    return [c for c in COLUMNS if c in paths] + [c for c in paths if c not in COLUMNS]


def _figure_row(figures: FigureFiles, paths, what: str) -> list[dict]:
    if not isinstance(paths, dict):
        return []
    return [{"column": c, "name": COLUMN_NAMES.get(c, c),
             **figures.figure(paths[c], f"{COLUMN_NAMES.get(c, c)} {what}")} for c in _ordered(paths)]


def _clip(text: str) -> str:
    return text if len(text) <= MAX_TEXT_CHARS else text[:MAX_TEXT_CHARS] + "…"


def _text_groups(text_samples: dict) -> list[dict]:
    """[{"name": class name or None, "columns": [{"column", "name", "texts", "more"}]}]."""
    per_column: dict[str, dict] = {}
    for column, value in (text_samples or {}).items():
        if isinstance(value, (list, tuple)):
            per_column[column] = {None: [str(t) for t in value]}
        elif isinstance(value, dict):
            per_column[column] = {str(k): [str(t) for t in v] for k, v in value.items() if isinstance(v, (list, tuple))}
    order = _ordered(per_column)
    groups = list(dict.fromkeys(g for c in order for g in per_column[c]))
    return [{"name": group, "columns": [
        {"column": c, "name": COLUMN_NAMES.get(c, c), "texts": [_clip(t) for t in (per_column[c].get(group) or [])
                                                                  ][:MAX_TEXT_SAMPLES],
         "more": max(0, len(per_column[c].get(group) or []) - MAX_TEXT_SAMPLES)} for c in order]} for group in groups]


def _guidance_sweep_view(figures: FigureFiles, paths: dict, result: CompareResult) -> dict | None:
    """The sweep's figure and a caption that says what it was scored against."""
    sweep = result.guidance_sweep or {}
    if not paths.get("guidance_sweep") or not sweep.get("rows"):
        return None
    budget_scale = result.settings.get("guidance_scale")
    caption = (f"Samples at each guidance scale ({sweep.get('num_samples')} per point, the same class histogram as the "
               f"training images they are scored against; the test split is not used). The report's samples use "
               f"the budget's scale, {budget_scale}. Higher scales follow the label more closely and cover less of "
               f"each class.")
    return {**figures.figure(paths["guidance_sweep"], "guidance sweep", False), "caption": caption}


def build_view(result: CompareResult, figures: FigureFiles, plots: list[tuple[str, str]], notes: list[str]) -> dict:
    """Everything the templates show, already formatted."""
    settings = result.settings
    title = "VQ-VAE vs VQGAN tokenizers" + (f" on {settings['dataset']}" if settings.get("dataset") else "")
    facts = [f"{settings[k]} {label}" for k, label in (("modality", "modality"), ("budget", "budget"))
             if settings.get(k)]
    seeds = settings.get("seeds") or []
    if seeds:
        facts.append(f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}")
    main, more = _settings(result)
    paths = result.figures or {}
    view = {
        "title": title, "subtitle": " · ".join(["vqgen compare", *facts]), "column_names": COLUMN_NAMES,
        "summary": result.verdict.get("summary") or "No verdict was recorded.",
        "settings": main, "more_settings": more, "tables": _metric_tables(result),
        "samples": _figure_row(figures, paths.get("samples"), "samples"),
        "class_conditional": bool(settings.get("class_conditional")),
        "text_groups": _text_groups(result.text_samples),
        "reconstructions": _figure_row(figures, paths.get("reconstructions"), "reconstructions"),
        "spectrum": figures.figure(paths["spectrum"], "power spectrum", False) if paths.get("spectrum") else None,
        "guidance_sweep": _guidance_sweep_view(figures, paths, result),
        "plots": [{"title": t, **figures.figure(p, t, False)} for t, p in plots],
    }
    view["notes"] = list(dict.fromkeys([*notes, *figures.notes.values()]))
    return view


# ----------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------


def _bold_html(text) -> Markup:
    """Escape, then turn Markdown **bold** into <strong>."""
    return Markup(re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", str(escape(text))))


def _md_cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_fence(texts: list[str]) -> str:
    longest = max((len(run) for t in texts for run in re.findall(r"`+", t)), default=0)
    return "`" * max(3, longest + 1)


def _environment():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    environment = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html.j2"]),
                              undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    environment.filters.update(bold_html=_bold_html, md=_md_cell, fence=_md_fence,
                               oneline=lambda text: str(text).replace("\n", " ⏎ "))
    return environment


def write_report(output_dir: Path, result: CompareResult) -> tuple[Path, Path]:
    """Write output_dir/report.html (self-contained) and output_dir/report.md; returns their paths.

    Training curves are read from output_dir/{tokenizers,pipelines}/<variant>/metrics.jsonl and saved as
    output_dir/figures/curves_*.png, embedded in the HTML and linked from the Markdown.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise ValueError(f"output_dir={str(output_dir)!r} is not an existing folder")
    if not isinstance(result, CompareResult):
        raise TypeError(f"result must be a CompareResult (see CompareResult.load), got {type(result).__name__}")
    notes = [str(n) for n in result.notes]
    plots = write_training_plots(output_dir)
    if not plots:
        notes.append("No training logs were found (tokenizers/*/metrics.jsonl, pipelines/*/metrics.jsonl), "
                     "so there are no training curves.")
    view = build_view(result, FigureFiles(output_dir), plots, notes)
    environment = _environment()
    html_path, md_path = output_dir / "report.html", output_dir / "report.md"
    html_path.write_text(environment.get_template("report.html.j2").render(view=view), encoding="utf-8")
    md_path.write_text(environment.get_template("report.md.j2").render(view=view), encoding="utf-8")
    return html_path, md_path
