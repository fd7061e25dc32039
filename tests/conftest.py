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
