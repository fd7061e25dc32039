"""Loading weights safely: safetensors only (a pickle is never unpickled) and strictly (every tensor accounted for).

Used for every folder vqgen reads weights from: a pipeline's tokenizer/ and prior/, and stage 2's --tokenizer.
"""

from __future__ import annotations

from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_weights(folder: Path, what: str) -> None:
    """Refuse folders whose weights are missing or pickle-only; never unpickle anything."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {folder} is missing")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{what} folder {folder} has no config.json")
    if not (folder / "model.safetensors").is_file():
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise ValueError(
                f"{what} folder {folder} holds only pickle weights {pickles}; vqgen loads safetensors only "
                "(pickles can run code). Convert them with safetensors.torch.save_file in a trusted environment."
            )
        raise FileNotFoundError(f"{what} folder {folder} has no model.safetensors")


def load_strict(cls, folder: Path, what: str):
    """`cls.from_pretrained(folder)` from safetensors only, refusing missing, unexpected or mismatched tensors."""
    from safetensors import SafetensorError

    check_weights(folder, what)
    try:
        model, info = cls.from_pretrained(str(folder), use_safetensors=True, output_loading_info=True)
    except (OSError, RuntimeError, ValueError, SafetensorError) as error:
        if "mismatch" in str(error).lower():  # transformers' shape check: weights and config.json disagree
            raise ValueError(f"{what} weights in {folder} do not fit the shapes its config.json describes (was the "
                             "config edited, or the weights copied from another model?)") from error
        raise ValueError(f"{what} weights in {folder} could not be loaded ({type(error).__name__}: {error}); "
                         "the file may be truncated or corrupt") from error
    # Loading is strict: a layer left at its fresh initialisation would generate quietly wrong samples.
    problems = {kind: sorted(info.get(f"{kind}_keys") or []) for kind in ("missing", "unexpected", "mismatched")}
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:
        listed = "; ".join(f"{kind}: {', '.join(map(str, keys[:6]))}{' ...' if len(keys) > 6 else ''}"
                           for kind, keys in problems.items())
        raise ValueError(f"{what} weights in {folder} do not match its config.json ({listed})")
    return model
