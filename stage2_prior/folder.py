"""The pipeline folder: what a prior training writes and `pipelines.VQPipeline` reads.

Layout: `pipeline_config.json` (modality, class names, token layout, library versions, metadata), `tokenizer/`
and `prior/` (each `config.json` + `model.safetensors`), an optional `sample_grid.png` and the `README.md` model
card. It lives in stage 2 so that training can write a complete folder without importing the layer above it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
from pathlib import Path

import torch
from PIL import Image
from transformers import PreTrainedModel

from stage1_tokenizer.modeling import VQModel

from .model_card import write_model_card
from .modeling import TokenLayout
from .sampling import sample_codes

PIPELINE_CONFIG = "pipeline_config.json"
SAMPLE_GRID = "sample_grid.png"
VERSIONED_PACKAGES = ("vqgen", "torch", "transformers", "accelerate", "safetensors", "huggingface_hub")


def library_versions() -> dict[str, str | None]:
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def folder_config(tokenizer: VQModel, layout: TokenLayout, class_names: list[str] | None, metadata: dict) -> dict:
    """Contents of pipeline_config.json."""
    return {
        "_class_name": "VQPipeline",
        "modality": tokenizer.config.modality,
        "tokenizer_variant": tokenizer.config.variant,
        "class_conditional": layout.conditional,
        "class_names": class_names,
        "token_layout": layout.to_dict(),
        "latent_shape": list(tokenizer.config.latent_shape),
        "metadata": metadata,
        "library_versions": library_versions(),
    }


def save_weights(root: Path, tokenizer: VQModel, prior: PreTrainedModel) -> None:
    """Write tokenizer/ and prior/ as safetensors; the old folder is replaced only once the new one is complete."""
    root.mkdir(parents=True, exist_ok=True)
    for name, model in (("tokenizer", tokenizer), ("prior", prior)):
        staging = root / f".tmp-{name}"
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(str(staging), safe_serialization=True)
        retired = root / f".old-{name}"  # moved aside first: never a moment without weights
        shutil.rmtree(retired, ignore_errors=True)
        if (root / name).exists():
            os.replace(root / name, retired)
        os.replace(staging, root / name)
        shutil.rmtree(retired, ignore_errors=True)


def save_metadata(root: Path, tokenizer: VQModel, layout: TokenLayout, class_names: list[str] | None,
                  metadata: dict) -> None:
    """(Re)write pipeline_config.json atomically and the README.md model card."""
    staging = root / f".tmp-{PIPELINE_CONFIG}"
    staging.write_text(json.dumps(folder_config(tokenizer, layout, class_names, metadata), indent=2, default=float))
    os.replace(staging, root / PIPELINE_CONFIG)
    write_model_card(root, tokenizer.config, layout, class_names, metadata)


def grid_labels(layout: TokenLayout, per_class: int = 8) -> list[int] | None:
    """Labels for a grid with one row of `per_class` samples per class (None when unconditional)."""
    if not layout.conditional:
        return None
    return [c for c in range(layout.num_classes) for _ in range(per_class)]


@torch.no_grad()
def sample_preview(tokenizer: VQModel, prior: PreTrainedModel, layout: TokenLayout, path: Path, seed: int,
                   per_class: int = 8, guidance_scale: float = 1.0) -> Path:
    """Sample a few codes and decode them: a PNG grid (one row per class when conditional) or a text file."""
    from torchvision.utils import make_grid

    from stage1_tokenizer.modeling_text import bytes_to_strings

    labels = grid_labels(layout, per_class)
    count = len(labels) if labels else (16 if tokenizer.config.modality == "text" else 64)
    was_training = prior.training
    prior.eval()
    codes = sample_codes(prior, layout, count, torch.tensor(labels) if labels else None, guidance_scale,
                         generator=torch.Generator().manual_seed(seed))
    prior.train(was_training)
    decoded = tokenizer.decode(codes.view(count, *tokenizer.config.latent_shape))
    path.parent.mkdir(parents=True, exist_ok=True)
    if tokenizer.config.modality == "text":
        texts = bytes_to_strings(decoded.argmax(dim=1).cpu())
        path = path.with_suffix(".txt")
        tags = [f"class {label}" for label in labels] if labels else ["sample"] * count
        path.write_text("".join(f"[{tag}] {text}\n\n" for tag, text in zip(tags, texts)), encoding="utf-8")
        return path
    images = (decoded.float().clamp(-1, 1).cpu() + 1) / 2
    grid = make_grid(images, nrow=per_class if labels else 8, padding=2, pad_value=1.0)
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8").squeeze()).save(path)
    return path
