"""Reconstruction quality of a tokenizer over an evaluation split: the one evaluator of training and comparison.

Images are (N, C, R, R) tensors in [-1, 1]; text is one byte sequence per item, PAD_BYTE after its end.
An optional feature classifier (any module with `.features(x)` and logits from `forward`) adds the Frechet
distance in its features ("FD-classifier", through torchmetrics) and its accuracy on the reconstructions.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence

import torch
from torch import nn

from .configuration import PAD_BYTE
from .data import ImageDataset, Split, evaluation_subset, load_split, text_dataset
from .modeling import VQModel
from .quantizer import usage_from_counts


class ClassifierFeatures(nn.Module):
    """A classifier as a torchmetrics `feature` extractor: images in [-1, 1] -> float64 features or logits.

    `output="features"` gives the penultimate features (B, F) of `classifier.features(x)`, `"logits"` the
    logits (B, K) of `classifier(x)`. Images reach the classifier as they are, so the metrics that take it
    must keep `normalize=False` (InceptionScore would otherwise turn them into uint8).
    """

    def __init__(self, classifier: nn.Module, image_shape: Sequence[int], output: str = "features"):
        super().__init__()
        if output not in ("features", "logits"):
            raise ValueError(f"output={output!r}; expected 'features' or 'logits'")
        self.classifier, self.output = classifier, output
        # FrechetInceptionDistance reads `num_features` instead of probing with a 299x299 RGB image.
        self.num_features = int(self(torch.zeros(1, *image_shape)).shape[-1])

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, F) features or (B, K) logits in float64 on the CPU, computed in fp32 eval mode."""
        self.classifier.eval()
        device = next(self.classifier.parameters()).device
        images = images.to(device=device, dtype=torch.float32)
        if images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)  # faster convolutions on CPU
        out = self.classifier.features(images) if self.output == "features" else self.classifier(images)
        return out.double().cpu()


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor, max_db: float = 100.0) -> torch.Tensor:
    """Per-image PSNR (B,) in dB of [-1, 1] images (range 2: equal to [0, 1] with range 1), capped at max_db."""
    mse = (reference.float() - reconstruction.float()).pow(2).flatten(1).mean(1)
    floor = 4.0 / 10 ** (max_db / 10)  # identical images give max_db instead of inf
    return 10 * torch.log10(4.0 / mse.clamp_min(floor))


def _ssim_per_image(reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    from torchmetrics.functional.image import structural_similarity_index_measure

    side = min(reference.shape[-2:])
    kernel = min(11, side if side % 2 else side - 1)  # the standard 11x11 window, or the largest that fits
    return structural_similarity_index_measure(
        (reconstruction.float() + 1) / 2, (reference.float() + 1) / 2, data_range=1.0,
        kernel_size=kernel, reduction="none",
    )


def _eval_items(model: VQModel, dataset) -> torch.utils.data.Dataset:
    """A data set name/path or Split -> its evaluation items for the model's modality; Datasets pass through."""
    config = model.config
    if isinstance(dataset, (str, os.PathLike)):
        dataset = load_split(str(dataset), "eval", config.modality)
    if isinstance(dataset, Split):
        if config.modality == "image":
            return ImageDataset(dataset, config.resolution, config.in_channels)
        return text_dataset(dataset, config.seq_len)
    if isinstance(dataset, torch.utils.data.Dataset):
        return dataset
    raise TypeError(f"dataset must be a name/path, a Split or a torch Dataset, got {type(dataset).__name__}")


@torch.no_grad()
def reconstruction_metrics(model: VQModel, dataset, classifier: nn.Module | None = None,
                           batch_size: int = 256, max_items: int | None = None) -> dict[str, float]:
    """Reconstruction quality and codebook usage of a tokenizer over an eval split (or `max_items` drawn across it).

    `dataset` is a name/path (its eval split is used), a Split, or a torch Dataset of (input, label) pairs.
    Images: mse (on [-1, 1]), psnr (dB, per image then averaged, capped at 100), ssim (on [0, 1]), and with a
    classifier fd_classifier (real vs reconstructed) plus, for labelled data, classifier_accuracy
    (reconstructions) and classifier_accuracy_real (originals). Text, one padded record per item:
    byte_accuracy (share of the record's own byte positions, pads beyond the text ignored, decoded
    exactly) and exact_match (share of records with every such byte right). Both: codebook_usage (% of
    codes used over the whole split), perplexity (of that code histogram) and num_items.
    """
    items = _eval_items(model, dataset)
    chosen = evaluation_subset(len(items), max_items)
    count = len(chosen)
    if count == 0:
        raise ValueError("reconstruction_metrics got an empty data set")
    is_image = model.config.modality == "image"
    judged = is_image and classifier is not None
    if judged:
        from torchmetrics.image.fid import FrechetInceptionDistance

        image_shape = tuple(items[0][0].shape)
        frechet = FrechetInceptionDistance(feature=ClassifierFeatures(classifier, image_shape))
        logits = ClassifierFeatures(classifier, image_shape, output="logits")
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(items, chosen), batch_size=batch_size)
    was_training = model.training
    model.eval()
    device = model.quantizer.embedding.weight.device
    counts = torch.zeros(model.config.codebook_size, dtype=torch.long)
    sums = Counter()
    labelled = True
    for inputs, labels in loader:
        indices = model.encode(inputs.to(device))
        counts += torch.bincount(indices.flatten().cpu(), minlength=model.config.codebook_size)
        output = model.decode(indices).float().cpu()
        if is_image:
            sums["squared_error"] += float((output - inputs).pow(2).flatten(1).mean(1).double().sum())
            sums["psnr"] += float(psnr(inputs, output).double().sum())
            sums["ssim"] += float(_ssim_per_image(inputs, output).double().sum())
            if judged:
                frechet.update(inputs, real=True)
                frechet.update(output, real=False)
                labelled = labelled and bool((labels >= 0).all())
                sums["correct"] += int((logits(output).argmax(1) == labels).sum())
                sums["correct_real"] += int((logits(inputs).argmax(1) == labels).sum())
        else:
            predicted = output.argmax(1)  # (B, L) byte ids, PAD_BYTE included
            mask = inputs != PAD_BYTE
            correct = (predicted == inputs) & mask
            sums["bytes"] += int(mask.sum())
            sums["correct_bytes"] += int(correct.sum())
            sums["exact"] += int((correct.sum(1) == mask.sum(1)).sum())
    if was_training:
        model.train()

    metrics: dict[str, float] = {}
    if is_image:
        metrics.update(mse=sums["squared_error"] / count, psnr=sums["psnr"] / count, ssim=sums["ssim"] / count)
        if judged:
            metrics["fd_classifier"] = max(float(frechet.compute()), 0.0)
            if labelled:
                metrics["classifier_accuracy"] = sums["correct"] / count
                metrics["classifier_accuracy_real"] = sums["correct_real"] / count
    else:
        metrics.update(byte_accuracy=sums["correct_bytes"] / max(sums["bytes"], 1), exact_match=sums["exact"] / count)
    metrics.update(usage_from_counts(counts))
    metrics["num_items"] = count
    return metrics
