"""Multi-process CPU training: `accelerate launch --multi_gpu --num_processes 2 ... --cpu` (gloo, two ranks)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(num_processes: int, module: str, *args: str) -> subprocess.CompletedProcess:
    """Run a training module under `accelerate launch` with `num_processes` CPU ranks."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    if num_processes > 1:
        # On a machine without GPUs this starts torchrun with the gloo backend: real CPU processes.
        launcher += ["--multi_gpu", "--num_processes", str(num_processes)]
    else:
        launcher += ["--cpu", "--num_processes", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([*launcher, "-m", module, "--cpu", *args], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.mark.timeout(900)
def test_two_processes_match_one_process(tmp_path):
    """Two ranks with half the global batch each end with the same weights as one rank with all of it."""
    common = ["--dataset", "digits", "--variant", "vqvae", "--preset", "tiny", "--max-steps", "4",
              "--batch-size", "16", "--mixed-precision", "no", "--log-every", "2", "--max-eval-items", "32"]
    single = _launch(1, "stage1_tokenizer.train", *common, "--output-dir", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr[-2000:]
    double = _launch(2, "stage1_tokenizer.train", *common, "--output-dir", str(tmp_path / "two"))
    assert double.returncode == 0, double.stderr[-2000:]

    one = load_file(tmp_path / "one" / "model.safetensors")
    two = load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys()
    for name in one:  # synchronised gradients: equal up to float reduction order
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    # Only the main process writes: one row per log step, one checkpoint with both ranks' RNG states.
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4]
    single_rows = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    # Logged losses are averaged over ranks, so they match the one-process run's global-batch loss.
    assert rows[-1]["loss"] == pytest.approx(single_rows[-1]["loss"], rel=1e-4)
    checkpoint = tmp_path / "two" / "checkpoints" / "step_4"
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in checkpoint.iterdir()}


@pytest.mark.timeout(900)
def test_two_process_prior_training_writes_a_pipeline(tmp_path):
    """Stage 2 under two ranks trains and writes one loadable pipeline folder."""
    tokenizer = tmp_path / "tok"
    first = _launch(1, "stage1_tokenizer.train", "--dataset", "digits", "--variant", "vqvae", "--preset", "tiny",
                    "--max-steps", "2", "--max-eval-items", "16", "--output-dir", str(tokenizer))
    assert first.returncode == 0, first.stderr[-2000:]
    result = _launch(2, "stage2_prior.train", "--tokenizer", str(tokenizer), "--dataset", "digits", "--preset", "tiny",
                     "--max-steps", "4", "--batch-size", "8", "--class-conditional", "--max-eval-items", "16",
                     "--cache-dir", str(tmp_path / "codes"), "--output-dir", str(tmp_path / "pipe"))
    assert result.returncode == 0, result.stderr[-2000:]
    from pipelines import VQPipeline

    pipe = VQPipeline.from_pretrained(tmp_path / "pipe")
    out = pipe.generate(num_samples=2, class_labels=[1, 2], seed=0)
    assert out.codes.shape == (2, 8, 8)
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {
        p.name for p in (tmp_path / "pipe" / "checkpoints" / "step_4").iterdir()}
