"""Crash safety: SIGKILL mid-run then --resume, a corrupt newest checkpoint, a crash during a save."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stage1_tokenizer.train import cli as stage1_cli
from stage1_tokenizer.train_utils import list_checkpoints, verify_checkpoint

RUN = ["--dataset", "digits", "--variant", "vqgan", "--preset", "tiny", "--batch-size", "8", "--disc-start", "2",
       "--checkpoint-every", "2", "--keep-checkpoints", "3", "--log-every", "2", "--max-eval-items", "16"]


def _same_weights(a: Path, b: Path) -> bool:
    left, right = load_file(str(a)), load_file(str(b))
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


@pytest.mark.timeout(600)
def test_sigkill_then_resume_is_bit_identical(tmp_path, fresh_accelerate_state, offline_env):
    """A run killed with SIGKILL after a checkpoint, resumed, ends with the weights of an uninterrupted run."""
    steps = "24"
    fresh_accelerate_state()
    stage1_cli([*RUN, "--max-steps", steps, "--output-dir", str(tmp_path / "straight")])

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "stage1_tokenizer.train", *RUN, "--max-steps", steps, "--output-dir", str(killed)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=offline_env)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step_4").is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "model.safetensors").exists()

    fresh_accelerate_state()
    stage1_cli([*RUN, "--max-steps", steps, "--output-dir", str(killed), "--resume"])
    assert _same_weights(killed / "model.safetensors", tmp_path / "straight" / "model.safetensors")


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, fresh_accelerate_state, capsys):
    fresh_accelerate_state()
    run = tmp_path / "run"
    stage1_cli([*RUN, "--max-steps", "6", "--output-dir", str(run)])
    newest = list_checkpoints(run / "checkpoints")[-1]
    assert newest.name == "step_6" and verify_checkpoint(newest) is None
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated, as by a full disk
    assert "truncated" in verify_checkpoint(newest)

    fresh_accelerate_state()
    stage1_cli([*RUN, "--max-steps", "8", "--output-dir", str(run), "--resume"])
    out = capsys.readouterr().out
    assert "skipping checkpoint step_6" in out and "resumed from step 4" in out


def test_every_checkpoint_corrupt_is_a_clear_error(tmp_path, fresh_accelerate_state, capsys):
    fresh_accelerate_state()
    run = tmp_path / "run"
    stage1_cli([*RUN, "--max-steps", "2", "--output-dir", str(run)])
    for checkpoint in list_checkpoints(run / "checkpoints"):
        (checkpoint / "manifest.json").unlink()
    fresh_accelerate_state()
    with pytest.raises(SystemExit) as stop:
        stage1_cli([*RUN, "--max-steps", "4", "--output-dir", str(run), "--resume"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and error.startswith("error: every checkpoint") and "corrupt" in error


def test_crash_during_a_save_leaves_the_previous_checkpoint(tmp_path, fresh_accelerate_state, monkeypatch):
    """A save that dies half-way (here: the disk fills while writing) never replaces the last good checkpoint."""
    from accelerate import Accelerator

    fresh_accelerate_state()
    run = tmp_path / "run"
    stage1_cli([*RUN, "--max-steps", "2", "--output-dir", str(run)])
    good = run / "checkpoints" / "step_2"
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    def failing_save(self, output_dir=None, **kwargs):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Accelerator, "save_state", failing_save)
    fresh_accelerate_state()
    with pytest.raises(OSError):
        stage1_cli([*RUN, "--max-steps", "4", "--output-dir", str(run), "--resume"])
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_2"]
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert verify_checkpoint(good) is None
    assert (run / "model.safetensors").is_file()  # the last good final model is untouched too
