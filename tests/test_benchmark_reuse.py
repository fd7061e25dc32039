"""The studies in benchmarks/ reuse a finished run folder only if it was trained with today's resolved arguments."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _common  # noqa: E402

from stage1_tokenizer.arguments import TokenizerTrainingArguments, parse_arguments, save_arguments  # noqa: E402
from stage2_prior.arguments import PriorTrainingArguments  # noqa: E402


def stage1_command(folder: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "stage1_tokenizer.train", "--dataset", "digits", "--variant", "vqvae", "--preset",
            "small", "--max-steps", "1200", "--output-dir", str(folder), *extra]


def finished(folder: Path, arguments, seconds: float | None = 42.0) -> Path:
    """A folder as a finished run leaves it: its model, the resolved arguments, and the study's timing."""
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"")
    save_arguments(arguments.resolved(), folder)
    if seconds is not None:
        (folder / _common.STUDY_SECONDS).write_text(json.dumps({"seconds": seconds}))
    return folder


@pytest.fixture
def runs(monkeypatch) -> list[list[str]]:
    """Commands the helper would have run (nothing is trained here)."""
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: calls.append(command))
    return calls


def test_a_folder_trained_with_todays_arguments_is_reused(tmp_path, runs):
    command = stage1_command(tmp_path / "run", "--seed", "1")
    folder = finished(tmp_path / "run", parse_arguments(TokenizerTrainingArguments, command[3:]))
    assert _common.run_or_reuse(command, folder, "model.safetensors") == 42.0
    assert runs == []


def test_a_folder_trained_under_an_older_default_is_refused(tmp_path, runs):
    """The flags are the same, but the run resolved another default (the VQ-VAE's betas before they changed)."""
    command = stage1_command(tmp_path / "run")
    old = parse_arguments(TokenizerTrainingArguments, command[3:] + ["--adam-beta1", "0.5", "--adam-beta2", "0.9"])
    folder = finished(tmp_path / "run", old)
    with pytest.raises(SystemExit, match=r"run was trained with other arguments .*adam_beta1, adam_beta2"):
        _common.run_or_reuse(command, folder, "model.safetensors")
    assert runs == []
    assert _common.run_or_reuse(command, folder, "model.safetensors", force=True) is not None  # --force retrains
    assert runs == [command]


def test_a_finished_folder_without_its_arguments_is_refused(tmp_path, runs):
    command = stage1_command(tmp_path / "run")
    folder = finished(tmp_path / "run", parse_arguments(TokenizerTrainingArguments, command[3:]))
    (folder / "training_args.json").unlink()
    with pytest.raises(SystemExit, match="no training_args.json"):
        _common.run_or_reuse(command, folder, "model.safetensors")


def test_an_unfinished_folder_is_trained_and_timed(tmp_path, runs):
    command = stage1_command(tmp_path / "run")
    (tmp_path / "run").mkdir()
    seconds = _common.run_or_reuse(command, tmp_path / "run", "model.safetensors")
    assert runs == [command]
    assert json.loads((tmp_path / "run" / _common.STUDY_SECONDS).read_text()) == {"seconds": seconds}


def test_a_prior_folder_is_checked_against_stage_2s_arguments(tmp_path, runs):
    folder = tmp_path / "prior"
    command = [sys.executable, "-m", "stage2_prior.train", "--tokenizer", "tok", "--dataset", "digits", "--preset",
               "small", "--max-steps", "3000", "--output-dir", str(folder)]
    arguments = parse_arguments(PriorTrainingArguments, command[3:])
    finished(folder, arguments, seconds=None)
    with pytest.raises(SystemExit, match="has no study_seconds.json"):  # a study that plots minutes needs them
        _common.run_or_reuse(command, folder, "model.safetensors")
    assert _common.run_or_reuse(command, folder, "model.safetensors", untimed_ok=True) is None  # reused, untimed
    with pytest.raises(SystemExit, match="max_steps"):
        _common.run_or_reuse(command[:-3] + ["6000", "--output-dir", str(folder)], folder, "model.safetensors",
                             untimed_ok=True)
    assert runs == []


def test_tokenizer_study_folders_differ_by_seed():
    """Another seed of one setting trains its own run: sharing seed 0's folder would stop the study as stale."""
    import tokenizer_training

    def folder(*flags: str) -> Path:
        args = tokenizer_training.parse_args(["--output-dir", "runs", "--batch-size", "8", *flags])
        return tokenizer_training.run_folder(args, "vqgan", "cooldown", None, {"num_res_blocks": 2})

    assert folder().name == "tokenizer_vqgan_2400_cooldown_batch8_num_res_blocks2_ema0.999"  # seed 0's names as before
    assert folder("--seed", "1").name == "tokenizer_vqgan_2400_cooldown_batch8_num_res_blocks2_seed1_ema0.999"
    assert folder("--seed", "1") != folder("--seed", "2")
