"""The evaluation's feature classifier: a small CNN trained (seeded) on a data set's train split, cached on disk.

Its penultimate features feed FD-classifier, KID and precision/recall, its logits the Inception Score and
class accuracy (see `image_metrics`). It is never used in a training loss. Images are (N, C, R, R) in [-1, 1].
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from stage1_tokenizer.data import ImageDataset, Split, evaluation_subset, load_split, to_square
from stage1_tokenizer.precision import fast_autocast

CLASSIFIER_VERSION = 1  # bump when the architecture or the training recipe changes: it is part of the cache key
DEFAULT_CACHE_DIR = Path(os.environ.get("VQGEN_CACHE", "~/.cache/vqgen")) / "classifiers"  # as the code cache
# Training length: EPOCHS passes over the train split, at least MIN_STEPS (small sets such as `digits`
# need more than a few passes), at most `max_steps`.
CLASSIFIER_EPOCHS = 3
CLASSIFIER_MIN_STEPS = 200
CLASSIFIER_BATCH_SIZE = 128


class FeatureClassifier(nn.Module):
    """A small seeded CNN over (C, R, R) images in [-1, 1]: `.features` for FD/KID/PR, logits for IS/accuracy."""

    def __init__(self, in_channels: int, resolution: int, num_classes: int, width: int = 32, feature_dim: int = 128):
        super().__init__()
        if resolution < 8:
            raise ValueError(f"resolution={resolution} must be >= 8 for the feature classifier")
        self.in_channels, self.resolution, self.num_classes = in_channels, resolution, num_classes
        self.width, self.feature_dim = width, feature_dim

        def block(cin: int, cout: int, pool: bool) -> list[nn.Module]:
            # Pooling before norm and activation: a quarter of the elementwise work at full resolution.
            conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
            return [conv, *([nn.MaxPool2d(2)] if pool else []), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *block(in_channels, width, pool=True),  # (B, w, R/2, R/2)
            *block(width, 2 * width, pool=True),  # (B, 2w, R/4, R/4)
            *block(2 * width, 4 * width, pool=False), nn.AdaptiveAvgPool2d(2),  # (B, 4w, 2, 2)
            nn.Flatten(),
            nn.Linear(16 * width, feature_dim), nn.ReLU(inplace=True),  # (B, F)
        )
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def config(self) -> dict:
        """Constructor arguments (saved in info.json next to the weights)."""
        return dict(in_channels=self.in_channels, resolution=self.resolution, num_classes=self.num_classes,
                    width=self.width, feature_dim=self.feature_dim)

    def check_images(self, images: torch.Tensor) -> None:
        """Raise ValueError unless `images` is (B, C, R, R) for this classifier."""
        expected = (self.in_channels, self.resolution, self.resolution)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must have shape (B, {', '.join(map(str, expected))}), got {tuple(images.shape)}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, F)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes)."""
        return self.head(self.body(x))


def weights_sha256(module: nn.Module) -> str:
    """sha256 over a module's state dict (names and raw tensor bytes, in name order)."""
    hasher = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        hasher.update(name.encode())
        hasher.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def load_images(dataset: str | Split, split: str, resolution: int, in_channels: int,
                max_items: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, C, R, R) in [-1, 1] and labels (N,) (-1 when unlabelled) of a split ('train' or 'eval'): all of
    them, or `max_items` drawn across the split (`evaluation_subset`)."""
    data = dataset if isinstance(dataset, Split) else load_split(dataset, split, "image")
    items = ImageDataset(data, resolution, in_channels)
    chosen = evaluation_subset(len(items), max_items)
    images = torch.empty(len(chosen), in_channels, resolution, resolution)
    labels = torch.empty(len(chosen), dtype=torch.long)
    for row, index in enumerate(chosen):
        images[row], labels[row] = items[index]
    return images, labels


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def _from_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.float().div(127.5).sub(1.0)


def _accuracy(classifier: FeatureClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predict_classes(classifier, images) == labels).float().mean())


def _train_classifier(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, resolution: int,
                      in_channels: int, seed: int, max_steps: int) -> tuple[FeatureClassifier, int]:
    """Seeded AdamW + one-cycle training on uint8 images; returns the model (eval mode) and its step count."""
    torch.manual_seed(seed)
    model = FeatureClassifier(in_channels, resolution, num_classes).to(memory_format=torch.channels_last)
    steps_per_epoch = max(1, len(train_x) // CLASSIFIER_BATCH_SIZE)
    num_steps = min(max_steps, max(CLASSIFIER_MIN_STEPS, CLASSIFIER_EPOCHS * steps_per_epoch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=num_steps, pct_start=0.15)
    generator = torch.Generator().manual_seed(seed)
    batch = min(CLASSIFIER_BATCH_SIZE, len(train_x))
    order = torch.randperm(len(train_x), generator=generator)
    cursor = 0
    model.train()
    for _ in range(num_steps):
        if cursor + batch > len(order):
            order, cursor = torch.randperm(len(train_x), generator=generator), 0
        index = order[cursor : cursor + batch]
        cursor += batch
        with fast_autocast("cpu"):
            images = _from_uint8(train_x[index]).contiguous(memory_format=torch.channels_last)  # faster on CPU
            loss = F.cross_entropy(model(images), train_y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval(), num_steps


def load_or_train_classifier(dataset: str, resolution: int, in_channels: int, seed: int = 0,
                             cache_dir: Path | None = None, max_steps: int = 1000) -> tuple[FeatureClassifier, dict]:
    """The data set's feature classifier, trained once (seeded) on its train split and cached on disk."""
    from safetensors.torch import load_file, save_file

    if max_steps < 1:
        raise ValueError(f"max_steps={max_steps!r} must be >= 1")
    dataset = str(dataset)
    train_split = load_split(dataset, "train", "image")
    eval_split = load_split(dataset, "eval", "image")
    if train_split.class_names is None or eval_split.class_names is None:
        raise ValueError(
            f"data set {dataset!r} has no 'label' column: classifier metrics (FD-classifier, KID, IS, "
            "precision/recall, class accuracy) need a labelled data set"
        )
    key_fields = dict(train=train_split.fingerprint, eval=eval_split.fingerprint, resolution=resolution,
                      in_channels=in_channels, seed=seed, max_steps=max_steps, version=CLASSIFIER_VERSION)
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    folder = root / f"{train_split.name}-{resolution}px-c{in_channels}-seed{seed}-{key}"
    weights_path, info_path = folder / "model.safetensors", folder / "info.json"

    if weights_path.exists() and info_path.exists():
        info = json.loads(info_path.read_text())
        classifier = FeatureClassifier(**info["config"])
        classifier.load_state_dict(load_file(str(weights_path)))
        classifier.to(memory_format=torch.channels_last).eval()
        if weights_sha256(classifier) != info["weights_sha256"]:
            raise ValueError(f"cached classifier {folder} does not match its recorded sha256; delete the folder")
        return classifier, {**info, "from_cache": True, "cache_dir": str(folder)}

    start = time.perf_counter()
    train_x, train_y = load_images(train_split, "train", resolution, in_channels)
    test_x, test_y = load_images(eval_split, "eval", resolution, in_channels)
    num_classes = len(train_split.class_names)
    classifier, num_steps = _train_classifier(_to_uint8(train_x), train_y, num_classes, resolution, in_channels,
                                              seed, max_steps)
    info = dict(
        dataset=dataset, train_fingerprint=train_split.fingerprint, eval_fingerprint=eval_split.fingerprint,
        class_names=list(train_split.class_names), config=classifier.config, seed=seed, max_steps=max_steps,
        num_steps=num_steps, batch_size=CLASSIFIER_BATCH_SIZE, num_train=len(train_x), num_test=len(test_x),
        train_accuracy=_accuracy(classifier, train_x[:10000], train_y[:10000]),
        test_accuracy=_accuracy(classifier, test_x, test_y),
        train_seconds=round(time.perf_counter() - start, 2),
        weights_sha256=weights_sha256(classifier), version=CLASSIFIER_VERSION, torch_version=torch.__version__,
        num_threads=torch.get_num_threads(),  # the weights are bit-reproducible for a fixed thread count
    )
    # Write into a temporary sibling, then rename: a concurrent or interrupted run never leaves half a cache.
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=root))
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(staging / "model.safetensors"))
    (staging / "info.json").write_text(json.dumps(info, indent=2))
    try:
        os.replace(staging, folder)
    except OSError:  # another process finished first; its weights are equally valid
        for path in staging.iterdir():
            path.unlink()
        staging.rmdir()
    return classifier, {**info, "from_cache": False, "cache_dir": str(folder)}


def as_images(images, classifier: FeatureClassifier) -> torch.Tensor:
    """A (N, C, R, R) tensor, or a list of PIL images (converted with the data pipeline's `to_square`)."""
    if not isinstance(images, torch.Tensor):
        images = torch.stack([to_square(image, classifier.resolution, classifier.in_channels) for image in images])
    classifier.check_images(images)
    return images


@torch.no_grad()
def predict_classes(classifier: FeatureClassifier, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted class (N,) of each image, computed in fp32 eval mode."""
    classifier.check_images(images)
    classifier.eval()
    device = next(classifier.parameters()).device
    predictions = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device=device, dtype=torch.float32)
        predictions.append(classifier(batch.contiguous(memory_format=torch.channels_last)).argmax(1).cpu())
    return torch.cat(predictions)
