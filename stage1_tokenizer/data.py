"""Data sets for both stages: Hub names or local folders via `datasets.load_dataset`, plus offline built-ins."""

from __future__ import annotations

import hashlib
import io
import os
import sys
from collections.abc import Sequence
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

    A ClassLabel column gives its names (a string column was made one by `_encode_string_labels`); a plain
    integer column holding 0..K-1 gets the names "0".."K-1"; any other label column (floats, bools, lists) is
    refused, since conditioning on it would be a guess. Labels outside the names would otherwise become the
    prior's null-class or begin-of-sequence tokens; missing (None) labels are refused.
    """
    import datasets

    feature = records.features[LABEL_COLUMN]
    labels = records[LABEL_COLUMN]
    if isinstance(feature, datasets.ClassLabel):
        _check_no_missing_labels(labels, dataset, split)
        names = list(feature.names)
    elif isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
        _check_no_missing_labels(labels, dataset, split)
        names = [str(i) for i in range(max(labels) + 1)] if labels and min(labels) >= 0 else None
        if names is None:
            raise DataError(f"data set {dataset!r} ({split}): integer labels must be 0..K-1, found {min(labels)}")
    else:
        kind = feature.dtype if isinstance(feature, datasets.Value) else type(feature).__name__
        raise DataError(f"data set {dataset!r} ({split}): the {LABEL_COLUMN!r} column holds {kind} values, which "
                        f"are not classes; cast it to integers or strings, or to ClassLabel "
                        f"(dataset.cast_column({LABEL_COLUMN!r}, ClassLabel(names=[...]))), or rename the column "
                        f"to train without labels")
    bad = sorted({label for label in labels if not 0 <= label < len(names)})
    if bad:
        raise DataError(f"data set {dataset!r} ({split}): labels {bad[:5]} are outside its {len(names)} class "
                        f"names {names[:10]} (expected 0..{len(names) - 1})")
    return names


def load_split(dataset: str, split: str, modality: str = "image") -> Split:
    """Load one split ('train', or 'eval' for the test/validation split) of a data set by name or path.

    A string label column ('neg'/'pos') is used as classes: its sorted distinct values over all splits become
    the class names (stored in the trained models), in the order `datasets`' class_encode_column gives."""
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
    return split_from_records(records, split, modality, dataset, all_splits=list(splits.values()))


def split_from_records(records, split: str, modality: str, dataset: str, all_splits: list | None = None) -> Split:
    """A Split of a `datasets.Dataset` (loaded, or built in memory): finds the image or text column, checks it
    and the labels. `all_splits` (default: just `records`) fixes the class names of a string label column."""
    import datasets

    columns = list(records.column_names)
    candidates = IMAGE_COLUMNS if modality == "image" else TEXT_COLUMNS
    column = _find_column(columns, candidates, modality, dataset)
    if modality == "image" and isinstance(records.features[column], datasets.Image):
        records = records.cast_column(column, datasets.Image(decode=False))  # we decode, to name bad records
    if modality == "text":
        _check_text_column(records, column, dataset, split)
    if LABEL_COLUMN in columns:
        records = _encode_string_labels(records, all_splits or [records], dataset, split)
    class_names = _class_names(records, dataset, split) if LABEL_COLUMN in columns else None
    name = os.path.basename(os.path.normpath(os.path.expanduser(dataset)))
    return Split(records, column, class_names, f"{name}-{split}-{records._fingerprint}", name)


STRING_DTYPES = ("string", "large_string")


def _check_text_column(records, column: str, dataset: str, split: str) -> None:
    """Refuse a text column whose type is not a string (bytes, numbers, lists), from its schema alone."""
    import datasets

    feature = records.features[column]
    where = f"data set {dataset!r} ({split}): text column {column!r}"
    if not (isinstance(feature, datasets.Value) and feature.dtype in STRING_DTYPES):
        if isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary"):
            raise DataError(f"{where} holds bytes, not strings; decode them first, e.g. "
                            f"dataset.map(lambda r: {{{column!r}: r[{column!r}].decode('utf-8')}})")
        kind = feature.dtype if isinstance(feature, datasets.Value) else type(feature).__name__
        if kind == "null":
            raise DataError(f"{where} holds no text: all {len(records)} records are missing (None)")
        raise DataError(f"{where} holds {kind} values, not strings; cast it first, e.g. "
                        f"dataset.cast_column({column!r}, datasets.Value('string'))")


def _encode_string_labels(records, all_splits: list, dataset: str, split: str):
    """A string label column ('neg'/'pos') becomes a ClassLabel whose names are the sorted distinct labels of
    every split (as `datasets`' class_encode_column sorts them), so train and eval agree on the indices."""
    import datasets

    feature = records.features[LABEL_COLUMN]
    if not (isinstance(feature, datasets.Value) and feature.dtype in STRING_DTYPES):
        return records
    names = set()
    for part in all_splits:
        part_feature = part.features.get(LABEL_COLUMN)
        if isinstance(part_feature, datasets.Value) and part_feature.dtype in STRING_DTYPES:
            names.update(label for label in part[LABEL_COLUMN] if label is not None)
    _check_no_missing_labels(records[LABEL_COLUMN], dataset, split)
    return records.cast_column(LABEL_COLUMN, datasets.ClassLabel(names=sorted(names)))


def _check_no_missing_labels(labels: list, dataset: str, split: str) -> None:
    missing = [index for index, label in enumerate(labels) if label is None]
    if missing:
        raise DataError(f"data set {dataset!r} ({split}): {len(missing)} of {len(labels)} labels are missing (None), "
                        f"e.g. records {missing[:5]}; fill them in or drop those records")


def decode_image(value, index: int) -> Image.Image:
    """A record's image value (PIL, {'bytes', 'path'} dict, or array) -> PIL image in a mode `model_mode` gives
    ('L', 'RGB' or 'I;16'); names the record when it cannot be decoded or converted."""
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict):
            if value.get("bytes") is not None:
                image = Image.open(io.BytesIO(value["bytes"]))
            elif value.get("path"):
                image = Image.open(value["path"])
            else:
                raise ValueError("record holds neither bytes nor a path")
            image.load()
        else:
            image = Image.fromarray(np.asarray(value))
    except Exception as error:
        raise DataError(f"record {index}: image could not be decoded ({type(error).__name__}: {error})") from error
    return model_mode(image, index)


GREY_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _describe(index: int | None) -> str:
    return f"record {index}" if index is not None else "image"


def model_mode(image: Image.Image, index: int | None = None) -> Image.Image:
    """Bring any PIL image to 'L' or 'RGB' (8 bits a channel) or 'I;16' (16-bit grey), scaled by its bit depth.

    - 16-bit grey ('I;16*') stays 16-bit; 'I' (32-bit integers, e.g. a 16-bit PNG read by an older Pillow)
      is read as 16-bit and must hold 0..65535; one whose values all lie in 1..255 is refused as ambiguous
      (8-bit values stored as 32-bit integers would otherwise come out almost black).
    - 'F' (float) must hold values in [0, 1] (refused otherwise: Pillow itself reads floats as 0..255).
    - Transparency ('LA', 'RGBA', 'PA', palette with a transparent colour) is composited over black, the
      colour `to_square` pads with; 'P', 'CMYK', 'YCbCr', 'LAB', 'HSV' are converted to RGB; '1' to 'L'.
    Anything else raises DataError naming the record and the mode.
    """
    mode = image.mode
    if mode in ("L", "RGB", "I;16"):
        return image
    if mode in GREY_16BIT_MODES:
        return Image.fromarray(np.asarray(image).astype(np.uint16))
    if mode in ("I", "F"):
        return _grey_to_16bit(image, index)
    if mode == "1":
        return image.convert("L")
    try:
        if mode in ("LA", "La"):
            image = image.convert("LA")
            background = Image.new("L", image.size, 0)
            background.paste(image.convert("L"), mask=image.getchannel("A"))
            return background
        if mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")
            background = Image.new("RGB", image.size, 0)
            background.paste(image.convert("RGB"), mask=image.getchannel("A"))
            return background
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise DataError(f"{_describe(index)}: images of mode {mode!r} cannot be converted to RGB ({error}); "
                        "store them as 8-bit grey (L), RGB or 16-bit grey (I;16)") from error


def _grey_to_16bit(image: Image.Image, index: int | None) -> Image.Image:
    """'I' (read as 16-bit) or 'F' (in [0, 1]) -> 'I;16', after checking the values fit that reading."""
    array = np.asarray(image)
    where = _describe(index)
    if image.mode == "F":
        if not np.isfinite(array).all():
            raise DataError(f"{where}: float ('F') image holds NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise DataError(f"{where}: float ('F') image values must lie in [0, 1], found {low:g}..{high:g} "
                            "(divide 0..255 data by 255, or store 8-bit images)")
        return Image.fromarray(np.round(array.astype(np.float64) * 65535).astype(np.uint16))
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > 65535:
        raise DataError(f"{where}: 32-bit integer ('I') image values must lie in 0..65535 (16-bit), found "
                        f"{low}..{high}; store 8- or 16-bit images")
    if 0 < high <= 255:
        raise DataError(f"{where}: 32-bit integer ('I') image holds only values {low}..{high}: 8-bit data stored as "
                        "32-bit integers, or a nearly black 16-bit image? Store it as 8-bit (L) or 16-bit (I;16)")
    return Image.fromarray(array.astype(np.uint16))


def to_square(image: Image.Image, resolution: int, channels: int) -> torch.Tensor:
    """PIL image -> (C, R, R) float tensor in [-1, 1]: pad when a few pixels short (28 -> 32), else resize + crop.

    Any mode `model_mode` accepts: 16-bit grey keeps its precision (resized as floats on the 0..255 scale)."""
    image = model_mode(image)
    if image.mode == "I;16":
        image = Image.fromarray(np.asarray(image).astype(np.float32) / 257.0)  # 'F', 65535 -> 255
    else:
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
    if image.mode == "F":  # bicubic overshoots; 8-bit modes clip the same way
        array = torch.from_numpy(np.clip(np.asarray(image, dtype=np.float32), 0.0, 255.0))
        array = array.unsqueeze(0).expand(channels, -1, -1)
    else:
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


def evaluation_subset(length: int, count: int | None) -> list[int]:
    """Which of `length` items an evaluation capped at `count` uses: all of them when they fit, else a fixed random
    draw of `count` (seed 0, kept in order). Never the first `count`: splits stored sorted by label (MNIST's are)
    would be judged on their first classes only."""
    if count is None or count >= length:
        return list(range(length))
    return torch.randperm(length, generator=torch.Generator().manual_seed(0))[:count].sort().values.tolist()


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


def _check_texts(texts: list, name: str, column: str) -> None:
    """Every value a string or None, and some record holds text: joined, empty records would train the model
    on nothing but the newlines between them."""
    wrong = next((i for i, t in enumerate(texts) if t is not None and not isinstance(t, str)), None)
    if wrong is not None:
        raise DataError(f"data set {name!r}: text column {column!r} holds {type(texts[wrong]).__name__} values, not "
                        f"strings (record {wrong}); decode or convert them to str first")
    if not any(t and not t.isspace() for t in texts):
        raise DataError(f"data set {name!r}: text column {column!r} holds no text: all {len(texts)} records are empty, "
                        "whitespace or missing")


def _warn(message: str) -> None:
    """One `warning:` line on stderr, from the first process of a node only (accelerate sets LOCAL_RANK)."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr)


class TextWindowDataset(torch.utils.data.Dataset):
    """Byte windows of `seq_len`: the split's texts joined by newlines and cut ("windows", for training; one cut
    per starting byte in `offsets`, one after another), or one padded/truncated window per non-empty record
    ("records", for evaluation and labelled data)."""

    def __init__(self, split: Split, seq_len: int, mode: str = "windows", offsets: Sequence[int] = (0,)):
        from .configuration import PAD_BYTE

        if mode not in ("windows", "records"):
            raise ValueError(f"mode={mode!r}; expected 'windows' or 'records'")
        if tuple(offsets) != (0,) and mode != "windows":
            raise ValueError(f"offsets={tuple(offsets)} apply to mode='windows' only")
        texts = split.records[split.column] if not isinstance(split.records, list) else [r[split.column] for r in split.records]
        labels = None
        if split.class_names is not None:
            labels = split.records[LABEL_COLUMN] if not isinstance(split.records, list) else [r[LABEL_COLUMN] for r in split.records]
        self.split = split
        self.has_labels = labels is not None
        _check_texts(texts, split.name, split.column)
        missing = sum(t is None for t in texts)
        if mode == "windows":
            if missing:
                _warn(f"data set {split.name!r}: skipped {missing} of {len(texts)} text records that are missing (None)")
            data = torch.tensor(list("\n".join(t for t in texts if t is not None).encode("utf-8")), dtype=torch.long)
            if len(data) < seq_len:
                raise DataError(f"data set {split.name!r} holds fewer than seq_len={seq_len} bytes of text")
            cuts = [data[offset:][: (len(data) - offset) // seq_len * seq_len].view(-1, seq_len) for offset in offsets]
            self.windows = torch.cat(cuts)
            self.labels = torch.full((len(self.windows),), -1, dtype=torch.long)
        else:
            keep = [i for i, t in enumerate(texts) if t and t.strip()]
            if len(keep) < len(texts):
                _warn(f"data set {split.name!r}: skipped {len(texts) - len(keep)} of {len(texts)} text records that are "
                      f"empty, whitespace or missing ({missing} missing)")
            self.windows = torch.full((len(keep), seq_len), PAD_BYTE, dtype=torch.long)
            for row, index in enumerate(keep):
                data = texts[index].encode("utf-8")[:seq_len]
                self.windows[row, : len(data)] = torch.tensor(list(data), dtype=torch.long)
            self.labels = torch.tensor([int(labels[i]) for i in keep] if labels is not None else [-1] * len(keep))

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.windows[index], int(self.labels[index])


def text_dataset(split: Split, seq_len: int, offsets: Sequence[int] = (0,)) -> TextWindowDataset:
    """The one rule for text everywhere: labelled data one record per sequence (each keeps its label),
    unlabelled data as contiguous windows (cut once from each of `offsets` bytes in)."""
    if split.class_names is not None:
        return TextWindowDataset(split, seq_len, "records")
    return TextWindowDataset(split, seq_len, "windows", offsets)
