"""Helpers both stages' training scripts share: atomic checkpoints, metric logging, precision, allocator, the
output folder's checks and lock, Ctrl-C handling and one-line errors (run_cli)."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch.optim.swa_utils import AveragedModel

from .precision import bf16_is_fast

CHECKPOINT_PREFIX = "step_"


class CheckpointError(RuntimeError):
    """No usable checkpoint to resume from."""


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run saved a checkpoint and stopped."""


class OutputDirError(ValueError):
    """An --output-dir that cannot hold a run: a file, not writable, or in use by another run."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped the training loop after saving a checkpoint; `exit_code` is 128 + the signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# Errors caused by the user's input or data: reported in one line, never as a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, CheckpointError)
OUR_PACKAGES = tuple(str(Path(__file__).resolve().parents[1] / name) + os.sep
                     for name in ("stage1_tokenizer", "stage2_prior", "pipelines"))
RESUME_FLAG = "--resume"
_RUN_SCOPES: list[contextlib.ExitStack] = []  # the running run_cli calls' cleanups (output lock, signal handlers)


def _raised_by_our_checks(error: BaseException) -> bool:
    """True for our own error classes, and for a ValueError/FileNotFoundError raised in vqgen's code; one raised
    inside a library (torch, transformers, ...) is a bug until proven otherwise, and keeps its traceback."""
    from .data import DataError

    if isinstance(error, (DataError, CheckpointError, OutputDirError)):
        return True
    traceback = error.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    return traceback is not None and os.path.realpath(traceback.tb_frame.f_code.co_filename).startswith(OUR_PACKAGES)


def enter_for_run(context):
    """Enter a context manager for the rest of the current run: run_cli exits it when the run ends, however it
    ends (outside run_cli, at interpreter exit). Returns what its __enter__ returns."""
    if _RUN_SCOPES:
        return _RUN_SCOPES[-1].enter_context(context)
    entered = context.__enter__()
    atexit.register(context.__exit__, None, None, None)
    return entered


def run_cli(main, args) -> None:
    """Run a training `main(args)`, turning its endings into one line on stderr and an exit status: bad input 2
    (`error: ...`), a non-finite stop 1, Ctrl-C / SIGTERM 130 / 143 (where the checkpoint is, how to resume).

    ValueError / FileNotFoundError raised by a library rather than by our checks keep their traceback. The
    run's output lock and signal handlers are released whichever way it ends.
    """
    with contextlib.ExitStack() as scope:
        _RUN_SCOPES.append(scope)
        try:
            main(args)
        except TrainingInterrupted as stop:
            _print_last_line(str(stop))
            sys.exit(stop.exit_code)
        except KeyboardInterrupt:
            _print_last_line(_interrupted_message(getattr(args, "output_dir", None)))
            sys.exit(130)
        except USER_ERRORS as error:
            if not _raised_by_our_checks(error):
                raise
            _print_last_line(f"error: {error}")
            sys.exit(2)
        except NonFiniteLossError as error:
            _print_last_line(f"error: {error}")
            sys.exit(1)
        finally:
            _RUN_SCOPES.pop()


def _print_last_line(message: str) -> None:
    """Close the progress bars a run left open (so the message starts its own line), then print it to stderr."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    print(message, file=sys.stderr)


def _interrupted_message(output_dir) -> str:
    """The line for a Ctrl-C outside the training loop (setup, final save or evaluation): what is kept."""
    saved = list_checkpoints(Path(output_dir) / "checkpoints") if output_dir else []
    if not saved:
        return "interrupted before the first checkpoint; nothing to resume from"
    return (f"interrupted; the newest checkpoint is {saved[-1]}: rerun the same command with {RESUME_FLAG} "
            "to continue from it")


def check_output_dir(output_dir: Path) -> None:
    """--output-dir must be a folder this process can write in (created when missing): checked before any data
    is loaded or step run, so a typo or a read-only disk fails at once, not after an hour of training."""
    path = Path(output_dir)
    shown = str(output_dir)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"--output-dir {shown!r} is an existing file, not a folder; choose another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        raise OutputDirError(f"--output-dir {shown!r} cannot be created: {blocking or 'a parent'} is a file, "
                             "not a folder") from None
    except OSError as error:
        raise OutputDirError(f"--output-dir {shown!r} cannot be created ({error.strerror or error})") from None
    for folder in (path, path / "checkpoints", path / "samples"):
        if not folder.is_dir():
            continue
        try:
            handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
            os.close(handle)
            os.unlink(probe)
        except OSError as error:
            raise OutputDirError(f"--output-dir {shown!r} is not writable: {folder} ({error.strerror or error}); "
                                 "fix its permissions or choose another folder") from None


class OutputLock:
    """`output_dir/.lock`, created atomically (O_EXCL) and holding {"pid", "host"}: one run per output folder.

    A lock whose process no longer runs on this host (a run that was killed) is stale: it is taken over with
    a warning. A live one, or one from another host, refuses the run, naming the folder and the PID.
    Released (deleted, when it is still ours) on exit, exceptions included.
    """

    NAME = ".lock"

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / self.NAME
        self.owner = {"pid": os.getpid(), "host": socket.gethostname()}
        self.held = False

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock is removed, then the atomic create retried
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._remove_if_stale()
                continue
            with os.fdopen(handle, "w") as file:
                json.dump({**self.owner, "started": time.strftime("%Y-%m-%d %H:%M:%S")}, file)
            self.held = True
            return self
        raise OutputDirError(f"--output-dir {str(self.path.parent)!r}: could not take its lock {self.path}")

    def _remove_if_stale(self) -> None:
        """Delete the lock when its run is gone; raise OutputDirError when it may still be running."""
        try:
            holder = json.loads(self.path.read_text())
            pid, host = int(holder["pid"]), str(holder["host"])
        except FileNotFoundError:
            return  # released meanwhile: retry
        except (ValueError, KeyError, TypeError):
            holder, pid, host = {}, None, None  # unreadable (e.g. being written): treat as held
        folder = str(self.path.parent)
        if pid is None:
            raise OutputDirError(f"--output-dir {folder!r} is in use by another training run (its lock {self.path} "
                                 "is unreadable); wait for it, or delete the lock if no run is using the folder")
        if host != self.owner["host"]:
            raise OutputDirError(f"--output-dir {folder!r} is in use by training process {pid} on host {host!r}; "
                                 f"wait for it, or delete {self.path} if that run is gone")
        if _process_running(pid):
            raise OutputDirError(f"--output-dir {folder!r} is in use by another training run (process {pid}, "
                                 f"started {holder.get('started', '?')}); wait for it to finish or choose another "
                                 "--output-dir")
        print(f"warning: taking over the stale lock {self.path} of process {pid}, which is no longer running",
              file=sys.stderr)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def __exit__(self, *exc_info) -> None:
        if not self.held:
            return
        self.held = False
        try:  # only our own lock: never one another run took over meanwhile
            if json.loads(self.path.read_text()).get("pid") == self.owner["pid"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass


def _process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def claim_output_dir(output_dir: Path, accelerator) -> None:
    """Before any training work: check --output-dir (check_output_dir) and, on the main process, hold its
    OutputLock until the run ends."""
    check_output_dir(output_dir)
    if accelerator.is_main_process:
        enter_for_run(OutputLock(output_dir))


class InterruptHandler:
    """Ctrl-C (SIGINT) or SIGTERM during the training loop: finish the step, save a checkpoint, stop.

    The first signal only sets a flag that `check(step)` reads after each step (agreed on by all processes);
    a second one interrupts at once. Raises TrainingInterrupted, whose one line says where the checkpoint is
    and how to resume. After the last step the previous handlers are back, so Ctrl-C then interrupts the final
    save or evaluation at once (the checkpoints saved so far are kept).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, accelerator, checkpoint_dir: Path, keep: int, max_steps: int):
        self.accelerator, self.checkpoint_dir, self.keep, self.max_steps = accelerator, checkpoint_dir, keep, max_steps
        self.received: int | None = None
        self.previous: dict = {}
        self.started = time.time()

    def __enter__(self) -> InterruptHandler:
        if threading.current_thread() is threading.main_thread():  # a signal ignored (nohup, `cmd &`) stays so
            self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS
                             if signal.getsignal(sig) is not signal.SIG_IGN}
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # the second one: stop now
            self.__exit__()
            raise KeyboardInterrupt
        self.received = signum

    def check(self, step: int) -> None:
        """After each step: when a signal came, save a checkpoint (unless this step's is saved) and stop."""
        received = self.received
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([float(received or 0)], device=self.accelerator.device)
            received = int(self.accelerator.gather(flag).max()) or None
        if received is None:
            if step >= self.max_steps:
                self.__exit__()
            return
        checkpoint = self.checkpoint_dir / f"{CHECKPOINT_PREFIX}{step}"
        saved_step, saved_at = _LAST_SAVE.get(self.checkpoint_dir, (None, 0.0))
        if not (saved_step == step and saved_at >= self.started):  # this run has not saved this step yet
            checkpoint = save_checkpoint(self.accelerator, self.checkpoint_dir, step, self.keep)
        self.__exit__()
        name = signal.Signals(received).name
        raise TrainingInterrupted(f"interrupted ({name}) at step {step}: saved {checkpoint}; to continue, rerun the "
                                  f"same command with {RESUME_FLAG}", 128 + received)


def catch_interrupts(accelerator, checkpoint_dir: Path, keep: int, max_steps: int) -> InterruptHandler:
    """An InterruptHandler, installed for the rest of the run; call its `check(step)` after every step."""
    return enter_for_run(InterruptHandler(accelerator, checkpoint_dir, keep, max_steps))


MANIFEST = "manifest.json"
# (step, time) of each checkpoint folder's latest save in this process, the same on every rank: an interrupt
# right after a periodic save does not save that step again.
_LAST_SAVE: dict[Path, tuple[int, float]] = {}


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


def fused_optimizer(device: torch.device) -> dict:
    """Adam(W) keyword arguments: torch's fused kernel where it has one (CPU, CUDA), one pass over all tensors
    instead of a loop of small ops per tensor. 2 CPU cores: the `small` tokenizer's Adam step 0.9 against 4.9 ms,
    the `small` prior's AdamW 2.6 against 7.1 ms (README, Performance)."""
    return {"fused": True} if device.type in ("cpu", "cuda") else {}


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
        # Re-saving the same step (e.g. the end of a resumed run that did nothing): the old folder is moved
        # aside, not deleted, until the new one is in place.
        previous = checkpoint_dir / f".old-{CHECKPOINT_PREFIX}{step}"
        moved_aside = final.exists()
        if moved_aside:
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(final, previous)
        try:
            os.replace(staging, final)
        except OSError:
            if moved_aside:
                os.replace(previous, final)
            raise
        shutil.rmtree(previous, ignore_errors=True)
        for old in list_checkpoints(checkpoint_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    _LAST_SAVE[checkpoint_dir] = (step, time.time())
    return final


# What accelerate.save_state writes besides safetensors model weights: optimizer, scheduler, sampler and RNG
# states, which accelerate reads back with torch's weights_only loader. Anything else that is not safetensors
# (pickled model weights, custom pickled objects) vqgen never wrote, and never loads.
STATE_FILE_PATTERNS = ("optimizer*.bin", "scheduler*.bin", "sampler*.bin", "random_states_*.pkl")


def pickled_files(folder: Path) -> list[str]:
    """Files in a checkpoint folder that would be unpickled but are not one of accelerate's state files."""
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix not in (".safetensors", ".json")
                  and not any(p.match(pattern) for pattern in STATE_FILE_PATTERNS))


def resume_checkpoint(accelerator, checkpoint_dir: Path) -> tuple[int, dict]:
    """Load the newest intact checkpoint; a corrupt newer one is reported and skipped. Returns (step, state)."""
    candidates = list_checkpoints(checkpoint_dir)
    if not candidates:
        raise CheckpointError(f"--resume was given but {checkpoint_dir} holds no checkpoint")
    for folder in reversed(candidates):
        problem = verify_checkpoint(folder)
        if problem is None:
            refused = pickled_files(folder)
            if refused:
                raise CheckpointError(f"checkpoint {folder} holds files vqgen does not load: {refused} (model weights "
                                      "must be safetensors; pickles are never unpickled); vqgen did not write it")
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


def weight_ema(model: torch.nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of `model`'s parameters (torch's AveragedModel; call `update_parameters(model)`
    after each optimizer step). After n updates the decay is min(decay, (1 + n) / (10 + n)), as in timm and
    diffusers, so the random initial weights have faded after a few dozen steps instead of ~1 / (1 - decay)."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], updates: torch.Tensor) -> None:
        n = float(updates)
        torch._foreach_lerp_(averaged, current, 1.0 - min(decay, (1.0 + n) / (10.0 + n)))

    average = AveragedModel(model, multi_avg_fn=update, use_buffers=False)
    average.requires_grad_(False)
    return average


def checkpoint_module(accelerator, module: torch.nn.Module, name: str) -> None:
    """Keep `module` (e.g. a weight EMA) in every checkpoint `accelerator.save_state` writes, as `<name>.safetensors`,
    and read it back in `load_state`; a checkpoint without it is refused by name."""
    filename = f"{name}.safetensors"

    def save(models, weights, output_dir) -> None:
        if accelerator.is_main_process:
            save_model(module, str(Path(output_dir) / filename))

    def load(models, input_dir) -> None:
        path = Path(input_dir) / filename
        if not path.is_file():
            raise CheckpointError(f"checkpoint {input_dir} has no {filename}: it was saved by a run without {name}; "
                                  f"resume with the settings it was started with")
        load_model(module, str(path), device=str(next(module.parameters()).device))

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


class LogWindow:
    """Running means of a step's tensor logs between two log rows, so a row describes its whole window (as
    transformers' Trainer logs its loss), not the one batch that happened to fall on the log step.

    A key is averaged over the steps that logged it (the discriminator's, for instance, only once it trains);
    non-tensor values keep their latest value. Sums stay on the device until `mean()`, so no step waits on them.
    """

    def __init__(self):
        self.sums, self.counts, self.latest = {}, {}, {}

    def add(self, logs: dict) -> None:
        for key, value in logs.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().float().reshape(())
                self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
                self.counts[key] = self.counts.get(key, 0) + 1
            else:
                self.latest[key] = value

    def __len__(self) -> int:
        """How many keys hold tensor values (0: nothing was logged since the last row)."""
        return len(self.sums)

    def mean(self) -> dict:
        """The window's means (tensors) and latest plain values; empties the window."""
        means = {**self.latest, **{key: total / self.counts[key] for key, total in self.sums.items()}}
        self.sums, self.counts, self.latest = {}, {}, {}
        return means


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
