"""Data sets for both stages: Hub names or local folders via `datasets.load_dataset`, plus offline built-ins."""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGE_COLUMNS = ("image", "img")
TEXT_COLUMNS = ("text", "sentence")
LABEL_COLUMN = "label"
BUILTIN_DATASETS = ("digits", "python-docs")
EVAL_SPLITS = ("test", "validation")


class DataError(ValueError):
    """A data set that cannot be used as asked (missing, wrong columns, corrupt records)."""


@dataclass
class Split:
    """One split of a data set, reduced to the column we need."""

    records: object  # a datasets.Dataset, or a list for built-ins
    column: str
    class_names: list[str] | None
    fingerprint: str  # stable id of the data (for caches)
    name: str

    def __len__(self) -> int:
        return len(self.records)


def _digits_split(split: str) -> Split:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # (1797, 8, 8), 17 grey levels
    train_idx, test_idx = train_test_split(
        np.arange(len(images)), test_size=0.2, random_state=0, stratify=digits.target
    )
    chosen = train_idx if split == "train" else test_idx
    records = [{"image": images[i], "label": int(digits.target[i])} for i in sorted(chosen)]
    digest = hashlib.sha256(images[sorted(chosen)].tobytes()).hexdigest()[:16]
    return Split(records, "image", [str(d) for d in range(10)], f"digits-{split}-{digest}", "digits")


def _python_docs_split(split: str) -> Split:
    from pydoc_data.topics import topics

    texts = [topics[key].strip() for key in sorted(topics)]
    # Every 10th topic is held out for evaluation.
    chosen = [t for i, t in enumerate(texts) if (i % 10 == 0) == (split != "train")]
    records = [{"text": t} for t in chosen]
    digest = hashlib.sha256("\0".join(chosen).encode()).hexdigest()[:16]
    return Split(records, "text", None, f"python-docs-{split}-{digest}", "python-docs")


def _find_column(columns: list[str], candidates: tuple[str, ...], what: str, dataset: str) -> str:
    for name in candidates:
        if name in columns:
            return name
    raise DataError(
        f"data set {dataset!r} has no {what} column: expected one of {list(candidates)}, found {columns}"
    )


def _class_names(records, dataset: str, split: str) -> list[str] | None:
    """The label column's class names, after checking every label against them.

    A ClassLabel column gives its names; a plain integer column holding 0..K-1 gets the names "0".."K-1"; any
    other label column (strings, floats) is not used for conditioning. Labels outside the names would
    otherwise become the prior's null-class or begin-of-sequence tokens.
    """
    import datasets

    feature = records.features[LABEL_COLUMN]
    labels = records[LABEL_COLUMN]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    elif isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
        names = [str(i) for i in range(max(labels) + 1)] if labels and min(labels) >= 0 else None
        if names is None:
            raise DataError(f"data set {dataset!r} ({split}): integer labels must be 0..K-1, found {min(labels)}")
    else:
        return None
    bad = sorted({label for label in labels if not 0 <= label < len(names)})
    if bad:
        raise DataError(f"data set {dataset!r} ({split}): labels {bad[:5]} are outside its {len(names)} class "
                        f"names {names[:10]} (expected 0..{len(names) - 1})")
    return names


def load_split(dataset: str, split: str, modality: str = "image") -> Split:
    """Load one split ('train', or 'eval' for the test/validation split) of a data set by name or path."""
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}; expected 'train' or 'eval'")
    if dataset == "digits":
        if modality != "image":
            raise DataError("data set 'digits' holds images; use --modality image")
        return _digits_split(split)
    if dataset == "python-docs":
        if modality != "text":
            raise DataError("data set 'python-docs' holds text; use --modality text")
        return _python_docs_split(split)

    import datasets

    path = os.path.expanduser(dataset)
    # A Hub id is "name" or "owner/name"; anything else that is not on disk is a missing local path.
    looks_local = dataset.startswith((".", "/", "~")) or dataset.count("/") > 1
    if not os.path.exists(path) and looks_local:
        raise DataError(f"data set path {dataset!r} does not exist")
    if os.path.isdir(path) and not os.listdir(path):
        raise DataError(f"data set folder {dataset!r} is empty")
    try:
        splits = datasets.load_dataset(path)
    except Exception as error:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
        raise DataError(f"could not load data set {dataset!r}: {type(error).__name__}: {error}") from error
    if split == "train":
        if "train" not in splits:
            raise DataError(f"data set {dataset!r} has no 'train' split; found {list(splits)}")
        records = splits["train"]
    else:
        found = [s for s in EVAL_SPLITS if s in splits]
        if not found:
            raise DataError(f"data set {dataset!r} has no evaluation split {list(EVAL_SPLITS)}; found {list(splits)}")
        records = splits[found[0]]
    if len(records) == 0:
        raise DataError(f"split {split!r} of data set {dataset!r} is empty")
    columns = list(records.column_names)
    candidates = IMAGE_COLUMNS if modality == "image" else TEXT_COLUMNS
    column = _find_column(columns, candidates, modality, dataset)
    if modality == "image" and isinstance(records.features[column], datasets.Image):
        records = records.cast_column(column, datasets.Image(decode=False))  # we decode, to name bad records
    class_names = _class_names(records, dataset, split) if LABEL_COLUMN in columns else None
    name = os.path.basename(os.path.normpath(path))
    return Split(records, column, class_names, f"{name}-{split}-{records._fingerprint}", name)


def decode_image(value, index: int) -> Image.Image:
    """A record's image value (PIL, {'bytes', 'path'} dict, or array) -> PIL image; names the record on failure."""
    try:
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, dict):
            if value.get("bytes") is not None:
                image = Image.open(io.BytesIO(value["bytes"]))
            elif value.get("path"):
                image = Image.open(value["path"])
            else:
                raise ValueError("record holds neither bytes nor a path")
            image.load()
            return image
        return Image.fromarray(np.asarray(value))
    except Exception as error:
        raise DataError(f"record {index}: image could not be decoded ({type(error).__name__}: {error})") from error


def to_square(image: Image.Image, resolution: int, channels: int) -> torch.Tensor:
    """PIL image -> (C, R, R) float tensor in [-1, 1]: pad when a few pixels short (28 -> 32), else resize + crop."""
    image = image.convert("L" if channels == 1 else "RGB")
    width, height = image.size
    if width <= resolution and height <= resolution and resolution - max(width, height) <= resolution // 8:
        canvas = Image.new(image.mode, (resolution, resolution), 0)
        canvas.paste(image, ((resolution - width) // 2, (resolution - height) // 2))
        image = canvas
    else:
        scale = resolution / min(width, height)
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        image = image.resize(size, Image.BICUBIC)
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    array = array.unsqueeze(0) if array.dim() == 2 else array.permute(2, 0, 1)
    return array.float().div(127.5).sub(1.0)


class ImageDataset(torch.utils.data.Dataset):
    """(image in [-1, 1] as (C, R, R), label or -1) pairs; corrupt records raise, or are skipped and counted."""

    def __init__(self, split: Split, resolution: int, channels: int, skip_corrupt: bool = False):
        self.split = split
        self.resolution = resolution
        self.channels = channels
        self.has_labels = split.class_names is not None
        self.indices = list(range(len(split)))
        self.num_skipped = 0
        if skip_corrupt:
            good = []
            for index in self.indices:
                try:
                    decode_image(split.records[index][split.column], index)
                    good.append(index)
                except DataError:
                    self.num_skipped += 1
            if not good:
                raise DataError(f"every record of data set {split.name!r} is corrupt")
            self.indices = good

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        index = self.indices[position]
        record = self.split.records[index]
        image = to_square(decode_image(record[self.split.column], index), self.resolution, self.channels)
        label = int(record[LABEL_COLUMN]) if self.has_labels else -1
        return image, label


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields this process's index batches from `start_step` on: epoch e uses randperm seeded by (seed, e).

    The order depends only on (seed, step), so a resumed run sees the same batches an uninterrupted
    run would, and each of `world_size` processes takes its own slice of every global batch.
    """

    def __init__(self, num_items: int, global_batch: int, seed: int, start_step: int = 0,
                 rank: int = 0, world_size: int = 1):
        if global_batch > num_items:
            raise DataError(f"batch size {global_batch} is larger than the data set ({num_items} records)")
        if global_batch % world_size:
            raise ValueError(f"batch size {global_batch} must be divisible by the number of processes {world_size}")
        self.num_items, self.global_batch, self.seed = num_items, global_batch, seed
        self.start_step, self.rank, self.world_size = start_step, rank, world_size
        self.steps_per_epoch = num_items // global_batch

    def __iter__(self):
        step = self.start_step
        local = self.global_batch // self.world_size
        while True:
            epoch, offset = divmod(step, self.steps_per_epoch)
            order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            start = offset * self.global_batch + self.rank * local
            yield order[start : start + local].tolist()
            step += 1

    def __len__(self) -> int:  # infinite; DataLoader only needs this for len(loader)
        return 2**62


class TextWindowDataset(torch.utils.data.Dataset):
    """Byte windows of `seq_len`: the split's texts joined by newlines and cut ("windows", for training),
    or one padded/truncated window per non-empty record ("records", for evaluation and labelled data)."""

    def __init__(self, split: Split, seq_len: int, mode: str = "windows"):
        from .configuration import PAD_BYTE

        if mode not in ("windows", "records"):
            raise ValueError(f"mode={mode!r}; expected 'windows' or 'records'")
        texts = split.records[split.column] if not isinstance(split.records, list) else [r[split.column] for r in split.records]
        labels = None
        if split.class_names is not None:
            labels = split.records[LABEL_COLUMN] if not isinstance(split.records, list) else [r[LABEL_COLUMN] for r in split.records]
        self.split = split
        self.has_labels = labels is not None
        if mode == "windows":
            data = "\n".join(t for t in texts if t is not None).encode("utf-8")
            usable = len(data) // seq_len * seq_len
            if usable == 0:
                raise DataError(f"data set {split.name!r} holds fewer than seq_len={seq_len} bytes of text")
            self.windows = torch.tensor(list(data[:usable]), dtype=torch.long).view(-1, seq_len)
            self.labels = torch.full((len(self.windows),), -1, dtype=torch.long)
        else:
            keep = [i for i, t in enumerate(texts) if t and t.strip()]
            if not keep:
                raise DataError(f"data set {split.name!r} has no non-empty text records")
            self.windows = torch.full((len(keep), seq_len), PAD_BYTE, dtype=torch.long)
            for row, index in enumerate(keep):
                data = texts[index].encode("utf-8")[:seq_len]
                self.windows[row, : len(data)] = torch.tensor(list(data), dtype=torch.long)
            self.labels = torch.tensor([int(labels[i]) for i in keep] if labels is not None else [-1] * len(keep))

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.windows[index], int(self.labels[index])


def text_dataset(split: Split, seq_len: int) -> TextWindowDataset:
    """The one rule for text everywhere: labelled data one record per sequence (each keeps its label),
    unlabelled data as contiguous windows."""
    return TextWindowDataset(split, seq_len, "records" if split.class_names is not None else "windows")
