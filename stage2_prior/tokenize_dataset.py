"""Encode a data set once with a trained tokenizer into a cached `datasets.Dataset` of code sequences."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import datasets
import torch

from stage1_tokenizer.data import ImageDataset, load_split, text_dataset
from stage1_tokenizer.modeling import VQModel
from stage1_tokenizer.modeling_text import codes_up_to_end
from stage1_tokenizer.precision import fast_autocast

DEFAULT_CACHE = Path(os.environ.get("VQGEN_CACHE", Path.home() / ".cache" / "vqgen")) / "codes"


def tokenizer_fingerprint(tokenizer: VQModel) -> str:
    """sha256 over the tokenizer's config and every tensor of its state dict."""
    hasher = hashlib.sha256(tokenizer.config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(tokenizer.state_dict().items()):
        hasher.update(name.encode())
        hasher.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()[:16]


def source_dataset(tokenizer: VQModel, dataset: str, split: str, window_offsets: int = 1):
    """The stage-1 dataset a split is encoded from (images, or text records / windows). Unlabelled text gets its
    windows cut `window_offsets` times, one cut after another: that many times as many distinct training sequences
    from the same text (labelled text keeps one sequence per record). Cut k starts k * seq_len / window_offsets
    bytes in, plus k modulo the bytes per code, so that the cuts also pair the bytes into codes differently."""
    config = tokenizer.config
    data = load_split(dataset, split, config.modality)
    if config.modality == "image":
        return data, ImageDataset(data, config.resolution, config.in_channels)
    if data.class_names is not None or window_offsets == 1:
        return data, text_dataset(data, config.seq_len)
    if window_offsets > config.seq_len:
        raise ValueError(f"window_offsets={window_offsets} exceeds the tokenizer's seq_len={config.seq_len}")
    step, per_code = config.seq_len / window_offsets, config.seq_len // config.latent_shape[-1]
    starts = sorted({(int(k * step) + k % per_code) % config.seq_len for k in range(window_offsets)})
    return data, text_dataset(data, config.seq_len, offsets=starts)


def build_code_cache(
    tokenizer: VQModel,
    dataset: str,
    split: str,
    cache_dir: Path | None = None,
    batch_size: int = 256,
    window_offsets: int = 1,
) -> tuple[datasets.Dataset, list[str] | None, bool]:
    """Codes for every record of a split: returns (Dataset with 'codes' and 'label', class names, cache_hit).

    Text also gets 'length': the codes up to the text's end (`codes_up_to_end`); the prior's loss ignores the rest.
    Unlabelled text is cut at `window_offsets` starting bytes (`source_dataset`).
    """
    if window_offsets < 1:
        raise ValueError(f"window_offsets must be >= 1, got {window_offsets}")
    data, source = source_dataset(tokenizer, dataset, split, window_offsets)
    text = tokenizer.config.modality == "text"
    key = f"{data.fingerprint}-{tokenizer_fingerprint(tokenizer)}" + ("-length" if text else "")
    if text and window_offsets > 1 and data.class_names is None:
        key += f"-offsets{window_offsets}"
    path = Path(cache_dir or DEFAULT_CACHE) / key.replace("/", "_")
    if (path / "dataset_info.json").is_file():
        return datasets.load_from_disk(str(path)), data.class_names, True

    device = tokenizer.quantizer.embedding.weight.device
    tokenizer.eval()

    def encode_batch(batch: dict) -> dict:
        items = [source[i] for i in batch["index"]]
        inputs = torch.stack([item[0] for item in items]).to(device)
        with fast_autocast(device):
            codes = tokenizer.encode(inputs).flatten(1)  # (B, h*w) raster order, or (B, n)
        columns = {"codes": codes.cpu().tolist(), "label": [int(item[1]) for item in items]}
        if text:
            columns["length"] = codes_up_to_end(inputs, codes.shape[1]).cpu().tolist()
        return columns

    indices = datasets.Dataset.from_dict({"index": list(range(len(source)))})
    encoded = indices.map(
        encode_batch, batched=True, batch_size=batch_size, remove_columns=["index"],
        new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:32], desc=f"encoding {data.name} ({split})",
        keep_in_memory=True,
    )
    staging = path.with_name(path.name + ".tmp")
    encoded.save_to_disk(str(staging))
    if path.exists():
        shutil.rmtree(path)
    os.replace(staging, path)
    return datasets.load_from_disk(str(path)), data.class_names, False


def codes_tensor(encoded: datasets.Dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(N, num_codes) long codes, (N,) labels (-1 where unlabelled) and, for text, (N,) codes up to the text's end
    (None for images: every code counts) from a cached split."""
    columns = encoded.with_format("torch")[:]  # one batch of every row: {'codes': (N, n), 'label': (N,)}
    lengths = columns["length"].long() if "length" in columns else None
    return columns["codes"].long(), columns["label"].long(), lengths
