"""Shared pytest fixtures: thread limits, seeding, the shared data sets, and a clean accelerate state."""

from __future__ import annotations

import os

# Tests run on small shared CPUs: one BLAS/OpenMP thread, also for subprocesses (set before torch loads).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# The repository is cloned next to `shared/` (CI and the dev machines): ../shared/data from the repo root.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)


@pytest.fixture
def shared_dataset():
    """Factory: `shared_dataset("fashion_mnist")` -> path of ../shared/data/NAME, or skip the test."""

    def locate(name: str) -> Path:
        path = SHARED_DATA / name
        if not path.is_dir():
            pytest.skip(f"shared data set {name!r} not found at {path}")
        return path

    return locate


@pytest.fixture
def fresh_accelerate_state():
    """A reset() for accelerate's process-wide singletons, so in-process training runs (one test may do
    several) start clean and may differ in precision; called before the test and after it."""
    from accelerate.state import AcceleratorState, GradientState

    def reset() -> None:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    reset()
    yield reset
    reset()


@pytest.fixture
def offline_env(monkeypatch) -> dict[str, str]:
    """Environment for subprocesses that must never touch the network (Hub and data sets offline)."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    return dict(os.environ)


# ------------------------------------------------- stage 2 and pipelines (test_stage2 / test_pipeline / test_cli)
def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def code_cache_dir(tmp_path_factory) -> Path:
    """One on-disk code cache for the session's stage-2 training runs (never ~/.cache/vqgen)."""
    return tmp_path_factory.mktemp("code-cache")


@pytest.fixture(scope="session")
def pipeline_tokenizer_dir(tmp_path_factory) -> Path:
    """A tiny VQ-VAE tokenizer on digits (2 in-process training steps), built once per session; read-only."""
    from stage1_tokenizer.train import cli

    out = tmp_path_factory.mktemp("stage2-tokenizer") / "tokenizer"
    _reset_accelerate()
    cli(["--dataset", "digits", "--variant", "vqvae", "--preset", "tiny", "--max-steps", "2", "--output-dir", str(out)])
    _reset_accelerate()
    return out


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory, pipeline_tokenizer_dir, code_cache_dir) -> Path:
    """A class-conditional pipeline folder written by `stage2_prior.train.cli` (tiny preset, 6 steps); read-only."""
    from stage2_prior.train import cli

    out = tmp_path_factory.mktemp("stage2-pipeline") / "pipeline"
    _reset_accelerate()
    cli(["--tokenizer", str(pipeline_tokenizer_dir), "--dataset", "digits", "--preset", "tiny", "--max-steps", "6",
         "--batch-size", "16", "--class-conditional", "--output-dir", str(out), "--cache-dir", str(code_cache_dir),
         "--max-eval-items", "64"])
    _reset_accelerate()
    return out
