"""True FID (torchmetrics' InceptionV3), computed only when its weights are already on disk: nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch

FID_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's InceptionV3 (torchmetrics FID)


def _hub_checkpoint(filename: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def optional_pretrained_metrics(real_images: torch.Tensor, fake_images: torch.Tensor,
                                batch_size: int = 64) -> tuple[dict[str, float], list[str]]:
    """True FID of (N, C, R, R) images in [-1, 1], only if torch-fidelity and its InceptionV3 weights are present.

    Returns (metrics, notes): metrics holds "fid" when computed, notes say why it was skipped. The torch hub
    cache is checked for the weight file first.
    """
    fid_file = _hub_checkpoint(FID_WEIGHTS_FILE)
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics' FID feature extractor)
    except ImportError:
        return {}, ["fid skipped: torch-fidelity is not installed (pip install torch-fidelity)"]
    if not fid_file.exists():
        return {}, [f"fid skipped: InceptionV3 weights not in the torch hub cache ({fid_file}); nothing is downloaded"]

    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=2048, normalize=True)  # normalize: float images in [0, 1]
    for images, real in ((real_images, True), (fake_images, False)):
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].float().clamp(-1, 1)
            fid.update(((batch + 1) / 2).expand(-1, 3, -1, -1), real=real)  # (B, 3, R, R) in [0, 1]
    return {"fid": float(fid.compute())}, []
