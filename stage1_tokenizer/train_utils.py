"""Helpers both stages' training scripts share: atomic checkpoints, metric logging, precision, allocator."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from .precision import bf16_is_fast

CHECKPOINT_PREFIX = "step_"


class CheckpointError(RuntimeError):
    """No usable checkpoint to resume from."""


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run saved a checkpoint and stopped."""


# Errors caused by the user's input or data: reported in one line, never as a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, CheckpointError)


def run_cli(main, args) -> None:
    """Run a training `main(args)`: bad input exits 2 and a non-finite stop exits 1, each with one `error:` line."""
    try:
        main(args)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)

MANIFEST = "manifest.json"


def tune_allocator() -> None:
    """Stop glibc from returning large activations to the kernel every step (worth up to 1.5x on CPU)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameter ids from <malloc.h>
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS once: with tune_allocator's settings glibc keeps it, e.g. the
    ~0.5 GB of VGG16 classifier weights that building the random-VGG perceptual net allocates and drops."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return


def check_compile_available() -> None:
    """Raise ValueError when torch.compile cannot build kernels here (e.g. no C++ compiler for inductor on CPU)."""
    try:
        probe = torch.compile(lambda x: torch.sin(x) * 2 + 1)
        probe(torch.ones(4))
    except Exception as error:  # inductor raises BackendCompilerFailed, CalledProcessError, ... at first call
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(f"--compile: torch.compile cannot build kernels on this machine ({type(error).__name__}: "
                         f"{reason[:300]}); install a C++ compiler (e.g. apt-get install g++) or drop --compile") from error


def mixed_precision_mode(requested: str) -> str:
    """Resolve --mixed-precision 'auto': bf16 where it is faster (measured on CPU), fp16 on older GPUs, else 'no'."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if bf16_is_fast("cpu") else "no"


def _digest(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record size and sha256 of every file in `folder`, so a truncated checkpoint is caught on resume."""
    files = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _digest(p)}
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps(files, indent=1))


def verify_checkpoint(folder: Path) -> str | None:
    """None when `folder` matches its manifest, else a sentence saying what is wrong."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"{folder} has no {MANIFEST} (the save did not finish)"
    try:
        files = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return f"{manifest} is not valid JSON"
    for name, info in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != info["size"]:
            return f"{path} is truncated ({path.stat().st_size} bytes, expected {info['size']})"
        if _digest(path) != info["sha256"]:
            return f"{path} is corrupt (checksum mismatch)"
    return None


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = [p for p in checkpoint_dir.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def save_checkpoint(accelerator, checkpoint_dir: Path, step: int, keep: int, extra: dict | None = None) -> Path:
    """accelerator.save_state into a temporary folder, then rename into place; keep the newest `keep`."""
    final = checkpoint_dir / f"{CHECKPOINT_PREFIX}{step}"
    staging = checkpoint_dir / f".tmp-{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (staging / "train_state.json").write_text(json.dumps({"step": step, **(extra or {})}))
        write_manifest(staging)
        if final.exists():  # re-saving the same step (e.g. end of a resumed run that did nothing)
            shutil.rmtree(final)
        os.replace(staging, final)
        for old in list_checkpoints(checkpoint_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume_checkpoint(accelerator, checkpoint_dir: Path) -> tuple[int, dict]:
    """Load the newest intact checkpoint; a corrupt newer one is reported and skipped. Returns (step, state)."""
    candidates = list_checkpoints(checkpoint_dir)
    if not candidates:
        raise CheckpointError(f"--resume was given but {checkpoint_dir} holds no checkpoint")
    for folder in reversed(candidates):
        problem = verify_checkpoint(folder)
        if problem is None:
            accelerator.load_state(str(folder))
            state = json.loads((folder / "train_state.json").read_text())
            return int(state["step"]), state
        accelerator.print(f"warning: skipping checkpoint {folder.name}: {problem}")
    raise CheckpointError(f"every checkpoint in {checkpoint_dir} is corrupt; cannot resume")


RUN_IDENTITY = "run_identity.json"


def check_run_identity(output_dir: Path, identity: dict, resume: bool, write: bool) -> None:
    """A resumed run must be the run it resumes: compare `identity` with the one the run was started with.

    A fresh run records it (when `write`, i.e. on the main process); a resume whose settings differ (another
    variant, preset, codebook, data set or tokenizer) is refused with the differing fields named, before any
    checkpoint is loaded or file overwritten.
    """
    path = Path(output_dir) / RUN_IDENTITY
    identity = json.loads(json.dumps(identity))  # tuples -> lists, as they will read back
    if resume and path.is_file():
        started = json.loads(path.read_text())
        keys = sorted(set(started) | set(identity))
        changed = [k for k in keys if started.get(k) != identity.get(k)]
        if changed:
            shown = ", ".join(f"{k}: {started.get(k)!r} -> {identity.get(k)!r}" for k in changed[:4])
            more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
            raise ValueError(f"--resume: {output_dir} was started with other settings ({shown}{more}); resume "
                             "with the original settings, or train into a new --output-dir")
    if write and not (resume and path.is_file()):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(identity, indent=2, sort_keys=True))


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (identifies a trained tokenizer's weights)."""
    return _digest(Path(path))


def save_pretrained_atomic(model, output_dir: Path) -> None:
    """save_pretrained into a staging folder, then move each file over the old one (never half-written)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = output_dir / ".tmp-save"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging))
    for item in staging.iterdir():
        os.replace(item, output_dir / item.name)
    staging.rmdir()


def reduce_logs(accelerator, logs: dict) -> dict:
    """Average tensor-valued metrics over all processes (a collective: every process must call it)."""
    if accelerator.num_processes == 1:
        return logs
    return {k: accelerator.reduce(v.detach().float().reshape(()), reduction="mean") if isinstance(v, torch.Tensor) else v
            for k, v in sorted(logs.items())}


class MetricsLogger:
    """Appends one JSON object per logged step to metrics.jsonl (and tensorboard when installed)."""

    def __init__(self, output_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:
                self.writer = None

    def log(self, step: int, values: dict) -> dict:
        """Convert tensors to floats (one host sync) and write a row."""
        row = {"step": step, "time": time.time()}
        row.update({k: float(v) if isinstance(v, (torch.Tensor, float, int)) else v for k, v in values.items()})
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(row) + "\n")
            if self.writer is not None:
                for key, value in row.items():
                    if isinstance(value, float) and key != "time":
                        self.writer.add_scalar(key, value, step)
        return row

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint so the log matches the restored state."""
        if not (self.enabled and self.path.exists()):
            return
        rows = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in rows if json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class NonFiniteGuard:
    """Counts steps whose loss was not finite; stops the run after `limit` in a row.

    With several processes the verdict is agreed on by all of them (a step is skipped everywhere
    when any process saw a non-finite loss), so DDP never waits on a backward that one rank skipped.
    """

    def __init__(self, limit: int, accelerator=None):
        self.limit = limit
        self.accelerator = accelerator
        self.in_a_row = 0
        self.total = 0

    def check(self, loss: torch.Tensor) -> bool:
        """True when the step may proceed; False when it must be skipped."""
        finite = torch.isfinite(loss.detach()).all().float().reshape(1)
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            finite = self.accelerator.gather(finite).min()
        if bool(finite):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        return False

    @property
    def exhausted(self) -> bool:
        return self.in_a_row >= self.limit

    def stop(self, step: int, hint: str) -> NonFiniteLossError:
        """The error to raise once `exhausted` (after saving a checkpoint)."""
        return NonFiniteLossError(f"{self.in_a_row} non-finite losses in a row at step {step}; stopped and saved "
                                  f"a checkpoint ({hint})")
