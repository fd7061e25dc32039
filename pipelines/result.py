"""The typed result of `vqgen compare`, saved as metrics.json; the report only formats it.

Metric groups ("reconstruction", "generation", "prior", "training") map a column ("vqvae", "vqgan", "real") to
{metric: value}, each value the mean over seeds. `spread` holds the seeds' standard deviations (2+ seeds),
`intervals` the [low, high] the verdict compares (see pipelines.uncertainty.combine_seeds), `per_seed` every
seed's own groups, and `verdict` who is clearly better on what (see pipelines.verdict).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .uncertainty import combine_seeds
from .verdict import COLUMNS, gan_health, verdict

GROUPS = ("reconstruction", "generation", "prior", "training")


@dataclass
class CompareResult:
    settings: dict
    classifier: dict = field(default_factory=dict)
    reconstruction: dict = field(default_factory=dict)
    generation: dict = field(default_factory=dict)
    prior: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    spread: dict = field(default_factory=dict)
    intervals: dict = field(default_factory=dict)
    per_seed: list = field(default_factory=list)
    gan_health: dict | None = None
    figures: dict = field(default_factory=dict)
    guidance_sweep: dict = field(default_factory=dict)  # image, class-conditional: samples per guidance scale
    text_samples: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    verdict: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> Path:
        """Write metrics.json atomically (a failed write leaves the previous file)."""
        path = Path(path)
        staging = path.with_name(f".tmp-{path.name}")
        staging.write_text(json.dumps(self.to_dict(), indent=2, default=float))
        os.replace(staging, path)
        return path

    @classmethod
    def load(cls, path: Path) -> "CompareResult":
        data = json.loads(Path(path).read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def read_gan_health(log_path: Path) -> dict | None:
    """GAN health of a VQGAN run folder's metrics.jsonl (None without one or without discriminator rows)."""
    if not log_path.is_file():
        return None
    return gan_health([json.loads(line) for line in log_path.read_text().splitlines() if line.strip()])


def aggregate(settings: dict, runs: list[dict], seeds: list[int]) -> CompareResult:
    """One CompareResult from each seed's evaluation (`runs[i]` holds the groups, "intervals", "gan_health", ...).

    The first seed's figures, guidance sweep, text samples, classifier facts and GAN health are the ones shown.
    """
    first = runs[0]
    result = CompareResult(settings=settings, classifier=first.get("classifier", {}), figures=first.get("figures", {}),
                           guidance_sweep=first.get("guidance_sweep", {}),
                           text_samples=first.get("text_samples", {}), gan_health=first.get("gan_health"),
                           notes=list(dict.fromkeys(n for run in runs for n in run.get("notes", []))))
    for group in GROUPS:
        means, spreads, intervals = {}, {}, {}
        for column in COLUMNS:
            per_seed = [run.get(group, {}).get(column) for run in runs]
            if not all(isinstance(values, dict) for values in per_seed):
                continue
            bootstrapped = [run.get("intervals", {}).get(group, {}).get(column, {}) for run in runs]
            means[column], spread, interval = combine_seeds(per_seed, bootstrapped)
            if spread:
                spreads[column] = spread
            if interval:
                intervals[column] = interval
        setattr(result, group, means)
        if spreads:
            result.spread[group] = spreads
        if intervals:
            result.intervals[group] = intervals
    result.per_seed = [{"seed": seed, **{g: run.get(g, {}) for g in GROUPS}, "gan_health": run.get("gan_health")}
                       for seed, run in zip(seeds, runs)]
    result.verdict = verdict({"generation": result.generation, "reconstruction": result.reconstruction},
                             result.intervals, seeds, settings.get("num_eval_samples"), result.gan_health,
                             inputs="text" if settings.get("modality") == "text" else "images")
    return result
