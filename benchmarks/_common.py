"""Shared helpers of the benchmark scripts: environment record, timing, peak memory, matmul peak, tables, JSON."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"  # ../shared/data next to the checkout, when present

if str(REPO_ROOT) not in sys.path:  # runnable as `python benchmarks/bench_x.py` without an install
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402


def apply_run_options(args, quick: dict, full: dict):
    """Fill the options the user left unset from the --quick or the full defaults, then apply --threads."""
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def pick_device(requested: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    return torch.device(requested)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """What the numbers depend on: versions, device, threads, and how busy the machine was."""
    import transformers

    info = {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "device": str(device), "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


class Timer:
    """Wall-clock and process CPU seconds of a block (CUDA-synchronised)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> "Timer":
        synchronize(self.device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB.

    Linux: VmHWM from /proc/self/status (ru_maxrss would carry the parent's peak across fork + exec);
    elsewhere ru_maxrss (bytes on macOS).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 5) -> float:
    """Achieved FLOP/s of a large square matmul (the practical peak to compare a workload against)."""
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        with Timer(device) as timer:
            a @ b
        times.append(timer.wall)
    return 2 * size**3 / min(times)  # the best run: the machine's capability, not its contention


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # nan
            return "-"
        return f"{value:,.{digits}f}"
    return str(value)


def print_table(title: str, columns: list[tuple[str, str]], rows: list[dict], digits: dict | None = None) -> str:
    """Print (and return) a Markdown table: columns are (key, header) pairs."""
    digits = digits or {}
    lines = [f"\n### {title}\n", "| " + " | ".join(h for _, h in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(k), digits.get(k, 2)) for k, _ in columns) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(path: Path, payload: dict) -> Path:
    """Write the results file (creating its folder) and say where it went."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(os, "getloadavg"):
        payload.setdefault("environment", {})["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    path.write_text(json.dumps(payload, indent=2))
    print(f"\nresults written to {path}")
    return path


def held_out_dataset(dataset: str, holdout: int, root: Path) -> Path:
    """A copy of `dataset` whose eval split is held-out training data: its validation split if it has one, else
    the last `holdout` train records (then left out of training). Written once as parquet under `root`."""
    folder = root / "_held_out_data"
    if (folder / "test.parquet").is_file():
        return folder
    import datasets  # only the scripts that hold data out need it

    splits = datasets.load_dataset(dataset)
    train = splits["train"]
    if "validation" in splits:
        evaluation = splits["validation"]
    else:
        if not 0 < holdout < len(train):
            raise SystemExit(f"error: --holdout must lie in 1..{len(train) - 1}, got {holdout}")
        train, evaluation = train.select(range(len(train) - holdout)), train.select(range(len(train) - holdout,
                                                                                             len(train)))
        if "label" in train.column_names and set(evaluation["label"]) != set(train["label"]):
            raise SystemExit(f"error: the last {holdout} train records of {dataset} hold only the labels "
                             f"{sorted(set(evaluation['label']))}: its train split is stored sorted, so they are no "
                             f"held-out sample of it")
    folder.mkdir(parents=True, exist_ok=True)
    train.to_parquet(folder / "train.parquet")
    evaluation.to_parquet(folder / "test.parquet")
    return folder


STUDY_SECONDS = "study_seconds.json"


def run_or_reuse(command: list[str], folder: Path, done: str, force: bool = False,
                 untimed_ok: bool = False) -> float | None:
    """Run a training command (`python -m stage1_tokenizer.train ...` or `stage2_prior.train ...`) unless
    `folder/done` exists; the run's wall-clock seconds (read back when reused). A reused folder this helper did not
    time stops the study, unless `untimed_ok` (then None).

    Studies name their folders by the settings they give, not by the training scripts' defaults, so a finished
    folder is reused only if its training_args.json equals what `command` resolves to today (defaults filled in
    as the training script fills them). A stale folder, trained before a default changed, stops the study with a
    message naming it instead of passing for a run of today's settings; `force` retrains it.
    """
    import dataclasses
    import subprocess

    from stage1_tokenizer.arguments import TRAINING_ARGS, TokenizerTrainingArguments, parse_arguments
    from stage2_prior.arguments import PriorTrainingArguments

    stamp = folder / STUDY_SECONDS
    if (folder / done).is_file() and not force:
        module = command[command.index("-m") + 1]
        kinds = {"stage1_tokenizer.train": TokenizerTrainingArguments, "stage2_prior.train": PriorTrainingArguments}
        flags = command[command.index("-m") + 2:]
        expected = json.loads(json.dumps(dataclasses.asdict(parse_arguments(kinds[module], flags).resolved())))
        path = folder / TRAINING_ARGS
        saved = json.loads(path.read_text()) if path.is_file() else None
        if saved != expected:
            differ = [f"no {TRAINING_ARGS}"] if saved is None else \
                sorted(key for key in expected.keys() | saved.keys() if saved.get(key) != expected.get(key))
            raise SystemExit(f"error: {folder} was trained with other arguments than this command resolves to today "
                             f"({', '.join(differ)}: a default changed since?); delete it, pass another output "
                             f"folder, or --force")
        if not stamp.is_file() and not untimed_ok:
            raise SystemExit(f"error: {folder} has no {STUDY_SECONDS} (not trained by this study?); delete it")
        print(f"reusing {folder}")
        return json.loads(stamp.read_text())["seconds"] if stamp.is_file() else None
    print(f"$ {' '.join(command)}", flush=True)
    start = time.time()
    subprocess.run(command, cwd=REPO_ROOT, check=True)
    seconds = time.time() - start
    stamp.write_text(json.dumps({"seconds": seconds}))
    return seconds
