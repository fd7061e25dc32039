"""README.md model card for a saved pipeline folder (Hub YAML metadata + what it is + how to load it)."""

from __future__ import annotations

import json
from pathlib import Path

VARIANT_NAMES = {"vqvae": "VQ-VAE (van den Oord et al., 2017)", "vqgan": "VQGAN (Esser et al., 2021)"}


def _metric_rows(metrics: dict, prefix: str = "") -> list[str]:
    """Markdown table rows `| group | metric | value |`, flattening nested groups (e.g. evaluation -> generation)."""
    rows = []
    for key, value in metrics.items():
        if isinstance(value, dict):
            rows += _metric_rows(value, f"{prefix}{key.removesuffix('_metrics')} / ")
        elif _is_number(value):
            rows.append(f"| {prefix.rstrip(' /') or '-'} | {key} | {_fmt(value)} |")
    return rows


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_model_card(root: Path, config, layout, class_names: list[str] | None, metadata: dict) -> Path:
    """Write root/README.md for a pipeline folder: its tokenizer `config` (a VQConfig), token `layout`, data, metrics
    and sample grid."""
    meta = metadata
    dataset = meta.get("dataset")
    tags = ["vqgen", "vector-quantization", config.variant, "autoregressive-prior", f"{config.modality}-generation"]
    yaml = ["---", "library_name: vqgen", "tags:"] + [f"- {t}" for t in tags]
    if dataset and "/" in str(dataset) and not str(dataset).startswith((".", "/")):
        yaml += ["datasets:", f"- {dataset}"]
    yaml += ["license: apache-2.0", "---", ""]

    grid = root / "sample_grid.png"
    shape = "x".join(map(str, config.latent_shape))
    lines = yaml + [
        f"# vqgen pipeline: {VARIANT_NAMES[config.variant]} tokenizer + GPT prior",
        "",
        f"A two-stage {config.modality} generator trained with vqgen: a {VARIANT_NAMES[config.variant]} tokenizer "
        f"turns each sample into a {shape} grid of codes from a {config.codebook_size}-entry codebook, and a "
        f"Llama-style transformer prior generates those codes autoregressively"
        + (f", conditioned on {layout.num_classes} classes (classifier-free guidance supported)." if layout.conditional
           else " (unconditional)."),
        "",
        f"- Tokenizer variant: `{config.variant}`",
        f"- Data set: `{dataset or 'unknown'}`",
        f"- Codebook: {config.codebook_size} codes of dimension {config.codebook_dim}"
        + (", l2-normalised" if config.l2_normalize else ""),
        f"- Prior vocabulary: {layout.vocab_size} tokens ({layout.codebook_size} codes + {layout.num_classes} classes "
        "+ null class + bos)",
    ]
    if class_names:
        lines.append(f"- Classes: {', '.join(map(str, class_names))}")
    lines += ["", "## Usage", "", "```python", "from pipelines import VQPipeline", "",
              'pipe = VQPipeline.from_pretrained("<this repo id or folder>")']
    if layout.conditional:
        lines.append("out = pipe.generate(num_samples=8, class_labels=[0] * 8, guidance_scale=2.0, seed=0)")
    else:
        lines.append("out = pipe.generate(num_samples=8, seed=0)")
    lines += ["out.images[0].save('sample.png')" if config.modality == "image" else "print(out.texts[0])", "```", ""]
    if grid.is_file():
        lines += ["## Samples", "", "![samples](sample_grid.png)", ""]
    metrics = {k: v for k, v in meta.items() if k.endswith("metrics") and isinstance(v, dict)}
    rows = _metric_rows(metrics)
    lines += ["## Metrics", ""]
    if rows:
        lines += ["| group | metric | value |", "|---|---|---|"] + rows
    else:
        lines.append("No metrics recorded yet (run `vqgen evaluate` on this folder).")
    lines += ["", "## Training", "", "```json", json.dumps({k: v for k, v in meta.items() if k not in metrics},
                                                          indent=2, default=str), "```", ""]
    path = root / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
