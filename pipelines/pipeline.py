"""VQPipeline: sample codes from the prior and decode them with the tokenizer (inference only)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import LlamaForCausalLM, PreTrainedModel

from stage1_tokenizer.loading import load_strict
from stage1_tokenizer.modeling import VQModel
from stage2_prior.modeling import TokenLayout
from stage2_prior.folder import PIPELINE_CONFIG, SAMPLE_GRID, folder_config, grid_labels, save_metadata, save_weights
from stage2_prior.sampling import sample_codes

OUTPUT_TYPES = ("pil", "pt", "np")


# One call's ceiling: 100k 32x32 samples are ~100M code tokens; far larger requests are typos (10**12).
MAX_NUM_SAMPLES = 1_000_000
DEFAULT_BATCH_SIZE = 256  # samples drawn per forward pass when `batch_size` is not given


def _is_int(value) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass
class VQPipelineOutput:
    """What `VQPipeline.generate` returns."""

    codes: torch.Tensor  # (N, h, w) or (N, n)
    images: list[Image.Image] | torch.Tensor | np.ndarray | None = None
    texts: list[str] | None = None
    class_labels: list[int] | None = None

    def grid(self, nrow: int | None = None) -> Image.Image:
        """All images in one PIL grid (`nrow` per row; default: about square)."""
        from torchvision.utils import make_grid

        if self.images is None:
            raise ValueError("grid() needs an image pipeline's output")
        tensor = _as_tensor(self.images)
        nrow = nrow or max(1, int(np.ceil(np.sqrt(len(tensor)))))
        grid = make_grid(tensor, nrow=nrow, padding=2, pad_value=1.0)  # (C, H, W) in [0, 1]
        return Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))

    def save(self, path: str | Path, nrow: int | None = None) -> Path:
        """Write a PNG grid (images) or a UTF-8 text file (texts, one sample per block)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.images is not None:
            self.grid(nrow).save(path)
            return path
        path = path.with_suffix(".txt")
        labels = self.class_labels or [None] * len(self.texts)
        path.write_text("".join(f"[{'sample' if l is None else f'class {l}'}] {t}\n\n" for t, l in zip(self.texts, labels)),
                        encoding="utf-8")
        return path


def _as_tensor(images) -> torch.Tensor:
    """PIL list / (N, C, H, W) tensor / (N, H, W, C) array -> (N, C, H, W) float tensor in [0, 1]."""
    if isinstance(images, torch.Tensor):
        return images.float()
    if isinstance(images, np.ndarray):
        return torch.from_numpy(images).permute(0, 3, 1, 2).float()
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


class VQPipeline:
    """Tokenizer + prior: `generate()` samples code grids and decodes them into images or texts."""

    def __init__(self, tokenizer: VQModel, prior: PreTrainedModel, layout: TokenLayout | None = None,
                 class_names: list[str] | None = None, metadata: dict[str, Any] | None = None):
        if layout is None:
            num_codes = int(np.prod(tokenizer.config.latent_shape))
            layout = TokenLayout(tokenizer.config.codebook_size, len(class_names or []), num_codes)
        if layout.codebook_size != tokenizer.config.codebook_size:
            raise ValueError(f"token layout has codebook_size={layout.codebook_size} but the tokenizer's codebook "
                             f"has {tokenizer.config.codebook_size} codes")
        if layout.num_codes != int(np.prod(tokenizer.config.latent_shape)):
            raise ValueError(f"token layout has num_codes={layout.num_codes} but the tokenizer makes "
                             f"{int(np.prod(tokenizer.config.latent_shape))} codes per sample")
        if prior.config.vocab_size != layout.vocab_size:
            raise ValueError(
                f"prior vocabulary ({prior.config.vocab_size} tokens) does not match the tokenizer: codebook of "
                f"{layout.codebook_size} + {layout.num_classes} classes + null + bos = {layout.vocab_size}"
            )
        if class_names is not None and len(class_names) != layout.num_classes:
            raise ValueError(f"{len(class_names)} class names for a layout with {layout.num_classes} classes")
        self.tokenizer = tokenizer
        self.prior = prior
        self.layout = layout
        self.class_names = class_names
        self.metadata = dict(metadata or {})
        self.sample_grid: Image.Image | None = None  # the grid of the folder it was loaded from, if any; kept on save

    @property
    def modality(self) -> str:
        return self.tokenizer.config.modality

    @property
    def device(self) -> torch.device:
        return next(self.prior.parameters()).device

    def to(self, device: str | torch.device) -> "VQPipeline":
        """Move both models to `device`."""
        self.tokenizer.to(device)
        self.prior.to(device)
        return self

    # ----------------------------------------------------------------- generation
    def _check_generate_args(self, num_samples, class_labels, guidance_scale, temperature, top_k, top_p,
                             batch_size, output_type, seed=None) -> list[int] | None:
        if not _is_int(num_samples) or not 1 <= num_samples <= MAX_NUM_SAMPLES:
            raise ValueError(f"num_samples={num_samples!r} must be an integer in 1..{MAX_NUM_SAMPLES:,} "
                             "(generate larger sets in several calls with different seeds)")
        if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
            raise ValueError(f"seed={seed!r} must be None or an integer in 0..2**63 - 1")
        for name, value in (("temperature", temperature), ("guidance_scale", guidance_scale)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}={value!r} must be a finite number")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r} must be > 0")
        if top_k is not None and (not _is_int(top_k) or top_k < 1):
            raise ValueError(f"top_k={top_k!r} must be None or an integer >= 1")
        if top_p is not None and not (isinstance(top_p, (int, float)) and not isinstance(top_p, bool)
                                      and 0 < top_p <= 1):
            raise ValueError(f"top_p={top_p!r} must be None or in (0, 1]")
        if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
            raise ValueError(f"batch_size={batch_size!r} must be None or an integer >= 1")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}; expected one of {list(OUTPUT_TYPES)}")
        if not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
            raise ValueError(f"guidance_scale={guidance_scale!r} must be a number >= 0")
        if not self.layout.conditional:
            if class_labels is not None:
                raise ValueError("class_labels were given but this prior is unconditional")
            if guidance_scale != 1.0:
                raise ValueError(f"guidance_scale={guidance_scale} needs a class-conditional prior; "
                                 "this one is unconditional (use 1.0)")
            return None
        if class_labels is None:
            return None
        if _is_int(class_labels):
            class_labels = [class_labels] * num_samples
        if isinstance(class_labels, torch.Tensor):
            class_labels = class_labels.tolist()
        not_ints = [c for c in class_labels if not _is_int(c)]
        if not_ints:
            raise ValueError(f"class_labels must be integer class indices (0..{self.layout.num_classes - 1}); "
                             f"got {not_ints[:5]!r}")
        labels = [int(c) for c in class_labels]
        if len(labels) != num_samples:
            raise ValueError(f"class_labels has {len(labels)} entries but num_samples={num_samples}")
        bad = sorted({c for c in labels if not 0 <= c < self.layout.num_classes})
        if bad:
            raise ValueError(f"class_labels {bad} out of range: this prior knows classes 0..{self.layout.num_classes - 1}")
        return labels

    @torch.no_grad()
    def generate(
        self,
        num_samples: int = 16,
        class_labels: list[int] | int | None = None,
        guidance_scale: float = 1.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        batch_size: int | None = None,
        output_type: str = "pil",
        use_cache: bool = True,
        static_cache: bool = False,
        precision: str = "auto",
    ) -> VQPipelineOutput:
        """Sample `num_samples` code grids from the prior and decode them.

        class_labels: one label per sample (or one int for all); None samples the null class
        (unconditional) on a conditional prior. guidance_scale: classifier-free guidance
        strength (1.0 = off). seed: equal seeds give equal samples. batch_size: samples per forward pass
        (default 256, so memory stays bounded for any num_samples). use_cache (on by default) decodes with a KV
        cache, through vqgen's own decode step for plain Llama priors; static_cache=True, or use_cache=False, runs
        transformers' forward instead (with its preallocated StaticCache, or with no cache). All three give the
        same codes for a seed at precision "fp32". precision "auto" (the default) lets vqgen's decode step run its
        matmuls with bf16 weights where that is faster (4+ rows on a CPU with native bf16; the cache and attention
        stay float32), which can change a draw where two codes' probabilities differ by less than its rounding:
        see stage2_prior.sampling.
        """
        labels = self._check_generate_args(num_samples, class_labels, guidance_scale, temperature, top_k, top_p,
                                           batch_size, output_type, seed)
        generator = torch.Generator().manual_seed(seed if seed is not None else int(torch.seed() % 2**63))
        self.prior.eval()
        self.tokenizer.eval()
        batch_size = batch_size or min(num_samples, DEFAULT_BATCH_SIZE)  # memory bounded for any num_samples
        codes = []
        for start in range(0, num_samples, batch_size):
            count = min(batch_size, num_samples - start)
            if self.layout.conditional:
                chunk = torch.tensor(labels[start : start + count]) if labels is not None else torch.full((count,), -1)
            else:
                chunk = None
            codes.append(sample_codes(self.prior, self.layout, count, chunk, guidance_scale, temperature, top_k,
                                      top_p, generator, use_cache=use_cache, static_cache=static_cache,
                                      precision=precision))
        codes = torch.cat(codes).view(num_samples, *self.tokenizer.config.latent_shape)
        output = VQPipelineOutput(codes=codes.cpu(), class_labels=labels)
        decoded = [self.tokenizer.decode(codes[i : i + batch_size]) for i in range(0, num_samples, batch_size)]
        if self.modality == "text":
            output.texts = [t for chunk in decoded for t in _bytes_to_texts(chunk)]
            return output
        images = (torch.cat(decoded).float().cpu() + 1) / 2  # (N, C, H, W) in [0, 1]
        if output_type == "pt":
            output.images = images
        elif output_type == "np":
            output.images = images.permute(0, 2, 3, 1).numpy()
        else:
            arrays = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
            output.images = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]
        return output

    # ----------------------------------------------------------------- persistence
    def config_dict(self) -> dict:
        """Contents of pipeline_config.json."""
        return folder_config(self.tokenizer, self.layout, self.class_names, self.metadata)

    def save_pretrained(self, save_directory: str | os.PathLike, sample_grid: Image.Image | None = None) -> Path:
        """Write pipeline_config.json, tokenizer/, prior/ and the README.md model card; nothing is sampled.

        `sample_grid` (e.g. `pipe.generate(...).grid()`), when given, is saved as sample_grid.png and shown in the card;
        otherwise the grid of the folder this pipeline was loaded from, if it had one.
        """
        root = Path(save_directory)
        save_weights(root, self.tokenizer, self.prior)
        sample_grid = sample_grid if sample_grid is not None else self.sample_grid
        if sample_grid is not None:
            sample_grid.save(root / SAMPLE_GRID)
        self.save_metadata(root)
        return root

    def save_metadata(self, save_directory: str | os.PathLike) -> None:
        """Rewrite pipeline_config.json and the README.md model card (e.g. after evaluation added metrics)."""
        save_metadata(Path(save_directory), self.tokenizer, self.layout, self.class_names, self.metadata)

    def class_grid_labels(self, per_class: int = 8) -> list[int] | None:
        """Labels for a grid with one row of `per_class` samples per class (None when unconditional)."""
        return grid_labels(self.layout, per_class)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, revision: str | None = None,
                        token: str | None = None, cache_dir: str | None = None,
                        device: str | torch.device | None = None) -> "VQPipeline":
        """Load from a local folder or a Hub repo id (downloaded with huggingface_hub.snapshot_download)."""
        root = Path(path_or_repo_id)
        if not root.is_dir():
            root = _download(str(path_or_repo_id), revision, token, cache_dir)
        config_path = root / PIPELINE_CONFIG
        if not config_path.is_file():
            raise FileNotFoundError(f"{root} has no {PIPELINE_CONFIG}; is it a vqgen pipeline folder?")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_path} is not valid JSON: {error}") from error
        tokenizer = load_strict(VQModel, root / "tokenizer", "tokenizer")
        prior = load_strict(LlamaForCausalLM, root / "prior", "prior")
        layout = TokenLayout.from_dict(config["token_layout"])
        pipeline = cls(tokenizer, prior, layout=layout, class_names=config.get("class_names"),
                       metadata=config.get("metadata"))
        if (root / SAMPLE_GRID).is_file():
            with Image.open(root / SAMPLE_GRID) as grid:
                pipeline.sample_grid = grid.copy()
        if device is not None:
            pipeline.to(device)
        return pipeline

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None,
                    commit_message: str = "Upload vqgen pipeline", revision: str | None = None) -> str:
        """Save to a temporary folder and upload it to the Hub (create_repo + upload_folder); returns the commit URL."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            info = api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message=commit_message,
                                     revision=revision, repo_type="model")
        return str(info)


def _bytes_to_texts(logits: torch.Tensor) -> list[str]:
    from stage1_tokenizer.modeling_text import bytes_to_strings

    return bytes_to_strings(logits.argmax(dim=1).cpu())


def _download(repo_id: str, revision: str | None, token: str | None, cache_dir: str | None) -> Path:
    """snapshot_download of the files a pipeline needs (never pickles)."""
    from huggingface_hub import snapshot_download

    if repo_id.startswith((".", "/", "~")) or repo_id.count("/") > 1:
        raise FileNotFoundError(f"pipeline folder {repo_id!r} does not exist")
    try:
        path = snapshot_download(repo_id, revision=revision, token=token, cache_dir=cache_dir,
                                 allow_patterns=["*.json", "*.safetensors", "*.md", "*.png"])
    except OSError as error:  # RepositoryNotFoundError, RevisionNotFoundError, offline, ... (all OSErrors)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise FileNotFoundError(f"{repo_id!r} is not a local pipeline folder and could not be downloaded from the "
                                f"Hub ({type(error).__name__}: {reason})") from error
    return Path(path)
