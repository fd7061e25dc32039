"""End-to-end runs of `stage1_tokenizer.train`: the files a run writes and that they load, the shared
Fashion-MNIST folder, `accelerate launch`, bit-exact resume, and one-line errors for bad input."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from stage1_tokenizer import TOKENIZER_PRESETS, VQModel
from stage1_tokenizer.arguments import TokenizerTrainingArguments
from stage1_tokenizer.train import cli, learning_rate_factor
from stage1_tokenizer.train_utils import LogWindow

DIGITS_TEST_SIZE = 360  # 20% of scikit-learn's 1797 digits
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def train(fresh_accelerate_state):
    """Run the training command line in this process: train(output_dir, "--variant", "vqgan", ...)."""

    def run(output_dir: Path, *argv: str, steps: int = 2) -> Path:
        fresh_accelerate_state()
        cli(["--preset", "tiny", "--max-steps", str(steps), "--output-dir", str(output_dir), *map(str, argv)])
        return output_dir

    return run


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(path_a: Path, path_b: Path) -> None:
    a, b = load_file(str(path_a)), load_file(str(path_b))
    assert a.keys() == b.keys()
    differing = [name for name in a if not torch.equal(a[name], b[name])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"


GAN_KEYS = {"disc_loss", "gan_loss", "gan_weight", "logits_real", "logits_fake", "disc_acc_real", "disc_acc_fake"}

RUNS = {
    "vqvae": ("digits", "image", "vqvae"),
    "vqgan": ("digits", "image", "vqgan"),
    "text-vqgan": ("python-docs", "text", "vqgan"),
}


@pytest.mark.parametrize("dataset, modality, variant", RUNS.values(), ids=RUNS.keys())
def test_two_step_run_writes_its_files_and_they_load(train, tmp_path, dataset, modality, variant):
    out = train(tmp_path / "run", "--dataset", dataset, "--modality", modality, "--variant", variant,
                "--log-every", 1, "--sample-every", 1)

    rows = read_metrics(out)
    assert [row["step"] for row in rows] == [1, 2]
    assert all(math.isfinite(row["loss"]) and 0 <= row["codebook_usage"] <= 100 for row in rows)
    assert (GAN_KEYS <= set(rows[-1])) == (variant == "vqgan")
    assert ("perceptual_loss" in rows[-1]) == (variant == "vqgan" and modality == "image")

    samples = sorted(p.name for p in (out / "samples").iterdir())
    if modality == "image":
        assert samples == ["step_0000001.png", "step_0000002.png"]
        with Image.open(out / "samples" / "step_0000002.png") as grid:
            assert grid.size == (8 * 18 + 2, 2 * 18 + 2)  # 8 originals over 8 reconstructions, 16 px + padding
    else:
        assert samples == ["step_0000001.txt", "step_0000002.txt"]
        assert "REAL:" in (out / "samples" / "step_0000002.txt").read_text()

    checkpoint = out / "checkpoints" / "step_2"
    assert json.loads((checkpoint / "train_state.json").read_text())["step"] == 2
    assert (checkpoint / "manifest.json").is_file()

    ran_with = json.loads((out / "training_args.json").read_text())  # what ran: the preset's defaults filled in
    assert ran_with["max_steps"] == 2 and ran_with["batch_size"] == TOKENIZER_PRESETS["tiny"]["train"]["batch_size"]

    results = json.loads((out / "eval_results.json").read_text())
    assert 0 < results["test_codebook_usage"] <= 100 and results["test_perplexity"] >= 1
    if modality == "image":
        assert results["num_examples"] == DIGITS_TEST_SIZE and math.isfinite(results["test_psnr"])
        assert set(results) == {"num_examples", "test_mse", "test_psnr", "test_ssim", "test_codebook_usage",
                                "test_perplexity"}
    else:
        assert 0 <= results["test_byte_accuracy"] <= 1 and 0 <= results["test_exact_match"] <= 1

    model = VQModel.from_pretrained(out)
    assert (model.config.variant, model.config.modality) == (variant, modality)
    # The exported model is the trained one: the same weights as the last checkpoint's.
    saved, checkpointed = load_file(str(out / "model.safetensors")), load_file(str(checkpoint / "model.safetensors"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]) and torch.equal(tensor, checkpointed[name]), name
    if modality == "image":
        assert model.config.class_names == [str(d) for d in range(10)] and model.config.in_channels == 1
        assert model.encode(torch.zeros(2, 1, 16, 16)).shape == (2, 8, 8)
    else:
        assert model.encode(["def f(x):", "héllo"]).shape == (2, model.config.seq_len // 2)


def _write_padded_reviews(folder: Path) -> Path:
    """A labelled text data set whose records are all shorter than the tiny preset's seq_len (so they end in pads)."""
    import datasets

    texts = ["a warm , funny film", "the cast is wonderful", "a dull , lifeless mess", "the plot is flat"]
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    folder.mkdir()
    for split, repeats in (("train", 8), ("validation", 2)):
        rows = {"sentence": texts * repeats, "label": [1, 1, 0, 0] * repeats}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / f"{split}.parquet"))
    return folder


def test_eval_results_byte_accuracy_is_the_compare_evaluators_and_ignores_pads(train, tmp_path):
    from stage1_tokenizer.configuration import PAD_BYTE
    from stage1_tokenizer.data import load_split, text_dataset
    from stage1_tokenizer.evaluation import reconstruction_metrics

    data = _write_padded_reviews(tmp_path / "reviews")
    out = train(tmp_path / "run", "--dataset", data, "--modality", "text", "--variant", "vqvae", steps=150)
    results = json.loads((out / "eval_results.json").read_text())
    model = VQModel.from_pretrained(out).eval()
    compared = reconstruction_metrics(model, str(data))  # what `vqgen compare` reports for this tokenizer
    assert results["test_byte_accuracy"] == compared["byte_accuracy"]
    assert results["test_exact_match"] == compared["exact_match"]
    assert results["num_examples"] == compared["num_items"] == 8

    records = text_dataset(load_split(str(data), "eval", "text"), model.config.seq_len).windows
    pads = records == PAD_BYTE
    assert pads.any(1).all()  # every record is padded
    with torch.no_grad():
        predicted = model.decode(model.encode(records)).argmax(1)
    correct = predicted == records
    assert results["test_byte_accuracy"] == pytest.approx(float(correct[~pads].double().mean()))
    assert results["test_byte_accuracy"] != pytest.approx(float(correct.double().mean()))  # pads counted


@pytest.mark.parametrize("variant", ["vqvae", "vqgan"])
def test_fashion_mnist_from_the_shared_folder(train, tmp_path, shared_dataset, variant):
    out = train(tmp_path / "run", "--dataset", shared_dataset("fashion_mnist"), "--variant", variant)
    model = VQModel.from_pretrained(out)
    assert len(model.config.class_names) == 10 and model.config.in_channels == 1
    assert model.config.resolution == TOKENIZER_PRESETS["tiny"]["model"]["resolution"]
    results = json.loads((out / "eval_results.json").read_text())
    assert results["num_examples"] == 10000
    assert math.isfinite(results["test_psnr"]) and results["test_codebook_usage"] > 0


def test_accelerate_launch(tmp_path, offline_env):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
               "-m", "stage1_tokenizer.train", "--dataset", "digits", "--variant", "vqvae", "--preset", "tiny",
               "--max-steps", "2", "--output-dir", str(out)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=offline_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert json.loads((out / "eval_results.json").read_text())["num_examples"] == DIGITS_TEST_SIZE
    assert VQModel.from_pretrained(out).config.variant == "vqvae"


# Resume: a run interrupted after 4 steps and resumed to 8 must equal an uninterrupted 8-step run bit for bit.
# bf16 autocast on CPU is deterministic too (checked here); the second case also restarts dead codes every
# few batches (global RNG) and starts with k-means, so the checkpointed RNG state is exercised.
RESUME_CASES = {
    "vqgan-bf16-hflip-weight-ema-cosine": (["--variant", "vqgan", "--mixed-precision", "bf16", "--hflip",
                                            "--weight-ema", 0.9, "--lr-schedule", "cosine", "--warmup-steps", 2,
                                            "--decay-steps", 8],  # both runs decay over the same 8 steps
                                           None),
    "vqvae-ema-restarts-no-amp": (["--variant", "vqvae", "--mixed-precision", "no"],
                                  dict(ema_decay=0.99, kmeans_init=True, dead_code_threshold=4.0, usage_window=2)),
}


@pytest.mark.parametrize("argv, config_fields", RESUME_CASES.values(), ids=RESUME_CASES.keys())
def test_resume_equals_an_uninterrupted_run(train, tmp_path, argv, config_fields):
    argv = ["--dataset", "digits", "--log-every", 1, "--cpu", *argv]
    if config_fields is not None:
        config = tmp_path / "config.json"
        config.write_text(json.dumps({**TOKENIZER_PRESETS["tiny"]["model"], **config_fields}))
        argv += ["--config", config]

    straight = train(tmp_path / "straight", *argv, steps=8)
    resumed = train(tmp_path / "resumed", *argv, steps=4)
    train(resumed, *argv, "--resume", steps=8)

    assert_same_weights(straight / "model.safetensors", resumed / "model.safetensors")
    assert_same_weights(straight / "checkpoints" / "step_8" / "model.safetensors",
                        resumed / "checkpoints" / "step_8" / "model.safetensors")
    if "vqgan" in argv:  # the discriminator, saved as accelerate's second model
        assert_same_weights(straight / "checkpoints" / "step_8" / "model_1.safetensors",
                            resumed / "checkpoints" / "step_8" / "model_1.safetensors")
    timeless = lambda rows: [{k: v for k, v in row.items() if k not in ("time", "step_time")} for row in rows]
    assert [row["step"] for row in read_metrics(resumed)] == list(range(1, 9))
    assert timeless(read_metrics(resumed)) == timeless(read_metrics(straight))
    if config_fields is not None:
        restarted_at = load_file(str(straight / "model.safetensors"))["quantizer.restarted_at"]
        assert restarted_at.max() > 4, "dead codes must have been restarted after the resume point"


def test_cosine_schedule_warms_up_then_decays_to_zero():
    constant = [learning_rate_factor(step, "constant", 2, 6) for step in range(8)]
    cosine = [learning_rate_factor(step, "cosine", 2, 6) for step in range(8)]
    assert constant == [1.0] * 8
    # Warm-up: the first update already moves (1/2), then the half cosine over steps 2..6, and 0 after it.
    expected = [0.5, 1.0, 1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 - math.cos(math.pi / 4)) / 2, 0.0, 0.0]
    assert cosine == pytest.approx(expected, abs=1e-12)
    assert learning_rate_factor(0, "cosine", 0, 1) == 1.0


def test_cooldown_schedule_holds_then_falls_linearly_to_zero():
    # 10 steps, the last 4 cooling down: 1 through step 5, then 4/4 ... 1/4 of the peak, 0 from step 10 on.
    assert [learning_rate_factor(step, "cooldown", 0, 10, 4) for step in range(12)] == pytest.approx(
        [1.0] * 7 + [0.75, 0.5, 0.25, 0.0, 0.0], abs=1e-12)
    # The default cooldown is the last fifth; a warm-up comes first as for the cosine.
    assert [learning_rate_factor(step, "cooldown", 2, 10) for step in (0, 1, 7, 8, 9)] == pytest.approx(
        [0.5, 1.0, 1.0, 1.0, 0.5], abs=1e-12)


def test_cooldown_steps_are_checked():
    with pytest.raises(ValueError, match="--cooldown-steps must be >= 1, got 0"):
        TokenizerTrainingArguments(max_steps=4, output_dir="unused", cooldown_steps=0)


def test_the_schedules_learning_rate_is_the_one_the_optimizer_uses(train, tmp_path):
    argv = ["--dataset", "digits", "--variant", "vqvae", "--cpu", "--mixed-precision", "no", "--log-every", 1]
    cosine = train(tmp_path / "cosine", *argv, "--learning-rate", 2e-4, "--lr-schedule", "cosine",
                   "--warmup-steps", 2, steps=6)
    peak = 2e-4
    assert [row["lr"] for row in read_metrics(cosine)] == pytest.approx(
        [peak * learning_rate_factor(step, "cosine", 2, 6) for step in range(6)], rel=1e-12)
    # One warm-up update at half the peak equals one constant update at half the learning rate (Adam's first
    # step is lr * sign-like, so the weights match exactly): the logged rate is the applied one.
    warm = train(tmp_path / "warm", *argv, "--learning-rate", peak, "--lr-schedule", "cosine", "--warmup-steps", 2,
                 steps=1)
    half = train(tmp_path / "half", *argv, "--learning-rate", peak / 2, steps=1)
    full = train(tmp_path / "full", *argv, "--learning-rate", peak, steps=1)
    assert_same_weights(warm / "model.safetensors", half / "model.safetensors")
    with pytest.raises(AssertionError):
        assert_same_weights(warm / "model.safetensors", full / "model.safetensors")


def test_adam_betas_reach_the_autoencoders_optimizer(train, tmp_path):
    argv = ["--dataset", "digits", "--variant", "vqvae", "--cpu", "--mixed-precision", "no"]
    default = train(tmp_path / "default", *argv)
    spelled_out = train(tmp_path / "spelled_out", *argv, "--adam-beta1", 0.5, "--adam-beta2", 0.9)
    changed = train(tmp_path / "changed", *argv, "--adam-beta1", 0.9, "--adam-beta2", 0.95)
    assert_same_weights(default / "model.safetensors", spelled_out / "model.safetensors")
    with pytest.raises(AssertionError):  # Adam's second step depends on the betas (its first does not)
        assert_same_weights(default / "model.safetensors", changed / "model.safetensors")


def test_a_resumed_run_uses_its_own_adam_betas_not_the_checkpoints(train, tmp_path):
    argv = ["--dataset", "digits", "--variant", "vqvae", "--cpu", "--mixed-precision", "no", "--checkpoint-every", 2]
    run = train(tmp_path / "run", *argv, steps=2)
    train(run, *argv, "--resume", "--adam-beta1", 0.9, "--adam-beta2", 0.95, steps=4)
    for step, betas in ((2, [0.5, 0.9]), (4, [0.9, 0.95])):
        state = torch.load(run / "checkpoints" / f"step_{step}" / "optimizer.bin", weights_only=True)
        assert [list(group["betas"]) for group in state["param_groups"]] == [betas], step


def test_weight_ema_is_the_average_of_each_steps_weights_and_leaves_training_alone(train, tmp_path):
    argv = ["--dataset", "digits", "--variant", "vqgan", "--disc-start", 2, "--mixed-precision", "no", "--cpu",
            "--checkpoint-every", 1, "--keep-checkpoints", 10, "--max-eval-items", 64]
    plain = train(tmp_path / "plain", *argv, steps=5)
    averaged = train(tmp_path / "ema", *argv, "--weight-ema", 0.5, steps=5)

    # The trained weights are the same with and without the average.
    assert_same_weights(plain / "checkpoints" / "step_5" / "model.safetensors",
                        averaged / "checkpoints" / "step_5" / "model.safetensors")
    # The saved model is the warmed-up EMA of each step's weights: the first step's copied, then the n-th update
    # keeps min(decay, (1 + n) / (10 + n)) of the average.
    steps = [load_file(str(plain / "checkpoints" / f"step_{k}" / "model.safetensors")) for k in range(1, 6)]
    saved = load_file(str(averaged / "model.safetensors"))
    parameters = dict(VQModel.from_pretrained(plain).named_parameters())
    for name in parameters:
        expected = steps[0][name].clone()
        for n, weights in enumerate(steps[1:], start=1):
            keep = min(0.5, (1 + n) / (10 + n))
            expected = keep * expected + (1 - keep) * weights[name]
        torch.testing.assert_close(saved[name], expected, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(saved["decoder.conv_out.weight"], steps[-1]["decoder.conv_out.weight"])
    # Buffers (codebook usage counters) are the trained model's.
    torch.testing.assert_close(saved["quantizer.usage_counts"], steps[-1]["quantizer.usage_counts"])
    results = json.loads((averaged / "eval_results.json").read_text())
    assert results["weight_ema"] == 0.5
    assert results["without_weight_ema"]["test_psnr"] == pytest.approx(
        json.loads((plain / "eval_results.json").read_text())["test_psnr"])
    assert results["test_psnr"] != results["without_weight_ema"]["test_psnr"]


def folder_without_image_column(tmp_path: Path) -> list[str]:
    """A local parquet data set whose columns are 'pixels' and 'label': no image column."""
    import datasets

    folder = tmp_path / "no_images"
    folder.mkdir()
    for split in ("train", "test"):
        datasets.Dataset.from_dict({"pixels": [[0, 1], [2, 3]], "label": [0, 1]}).to_parquet(folder / f"{split}.parquet")
    return ["--dataset", str(folder)]


def folder_with_a_corrupt_record(tmp_path: Path, corrupt: tuple[int, ...] = (5,)) -> list[str]:
    """A local image data set (PNG bytes, ClassLabel) whose records `corrupt` in each split are not images."""
    import io

    import datasets
    import numpy as np

    def png(value: int) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(buffer, "PNG")
        return buffer.getvalue()

    folder = tmp_path / "corrupt"
    folder.mkdir()
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=["dark", "light"]))
    for split, size in (("train", 32), ("test", 8)):
        records = [{"bytes": png(7 * i), "path": None} for i in range(size)]
        for index in corrupt:
            records[index] = {"bytes": b"not a png", "path": None}
        data = {"image": records, "label": [i % 2 for i in range(size)]}
        datasets.Dataset.from_dict(data, features=features).to_parquet(folder / f"{split}.parquet")
    return ["--dataset", str(folder)]


BAD_INPUT = {
    "missing-path": (lambda tmp: ["--dataset", str(tmp / "does-not-exist")], "does not exist"),
    "no-image-column": (folder_without_image_column,
                        r"has no image column: expected one of \['image', 'img'\], found \['pixels', 'label'\]"),
    "resolution": (lambda tmp: ["--resolution", "17"], "resolution=17 is not divisible"),
    "wrong-modality": (lambda tmp: ["--modality", "text"], "holds images; use --modality image"),
    "resume-without-checkpoint": (lambda tmp: ["--resume"], "holds no checkpoint"),
    "corrupt-record": (folder_with_a_corrupt_record, "record 5: image could not be decoded"),
}


@pytest.mark.parametrize("make_argv, message", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_is_a_one_line_error(train, tmp_path, capsys, make_argv, message):
    argv = make_argv(tmp_path)
    capsys.readouterr()  # drop what making the input printed
    with pytest.raises(SystemExit) as exit_info:
        train(tmp_path / "run", *argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # Only the message: progress bars (datasets reading a new folder) may come before it.
    message_lines = [line for line in err.splitlines() if line.strip() and not re.search(r"\d+%\||examples/s", line)]
    assert len(message_lines) == 1 and message_lines[0].startswith("error: "), message_lines
    assert re.search(message, message_lines[0]), message_lines[0]


def test_skip_corrupt_skips_and_counts(train, tmp_path):
    # Record 0 too: the channel count must come from the first record that decodes.
    dataset = folder_with_a_corrupt_record(tmp_path, corrupt=(0, 5))
    out = train(tmp_path / "run", *dataset, "--variant", "vqvae", "--skip-corrupt")
    results = json.loads((out / "eval_results.json").read_text())
    assert results["skipped_corrupt_records"] == {"train": 2, "eval": 2}
    assert results["num_examples"] == 6
    assert VQModel.from_pretrained(out).config.class_names == ["dark", "light"]


def test_non_finite_losses_stop_the_run_with_a_checkpoint(train, tmp_path, capsys):
    # Adam moves every weight by about the learning rate: 1e38 overflows the next forward pass.
    with pytest.raises(SystemExit) as exit_info:
        train(tmp_path / "run", "--variant", "vqvae", "--learning-rate", "1e38", "--max-nonfinite", 1, steps=4)
    assert exit_info.value.code == 1
    assert "error: 1 non-finite losses in a row at step 2" in capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoints" / "step_2" / "manifest.json").is_file()
    assert not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
        (["--variant", "vqx"], "argument --variant: invalid choice: 'vqx'"),
        (["--max-steps", "0"], "--max-steps must be >= 1"),
        (["--weight-ema", "1.0"], "--weight-ema must be in (0, 1)"),
        (["--lr-schedule", "linear"], "--lr-schedule: invalid choice: 'linear'"),
        (["--warmup-steps", "-1"], "--warmup-steps must be >= 0"),
        (["--decay-steps", "0"], "--decay-steps must be >= 1"),
    ],
    ids=["preset", "variant", "max-steps", "weight-ema", "lr-schedule", "warmup-steps", "decay-steps"],
)
def test_bad_arguments_are_argparse_errors(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli(["--max-steps", "2", "--output-dir", str(tmp_path), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err.splitlines()[-1] and "error:" in err.splitlines()[-1]
    assert "Traceback" not in err


def test_config_fields_go_over_the_preset_inline_or_from_a_file(tmp_path):
    from stage1_tokenizer.train import build_config, parse_args

    base = ["--max-steps", "1", "--output-dir", str(tmp_path / "out"), "--preset", "small"]
    inline = build_config(parse_args(base + ["--config", '{"codebook_size": 1024, "kmeans_init": false}']), 1, None)
    small = TOKENIZER_PRESETS["small"]["model"]
    assert inline.codebook_size == 1024 and inline.kmeans_init is False
    assert inline.base_channels == small["base_channels"] and inline.perceptual_depth == small["perceptual_depth"]
    saved = tmp_path / "config.json"
    inline.save_pretrained(tmp_path)  # a trained tokenizer's config.json works as --config too
    again = build_config(parse_args(base + ["--config", str(saved), "--codebook-size", "256"]), 1, None)
    assert again.codebook_size == 256  # the command line wins over the file
    assert again.kmeans_init is False and again.base_channels == small["base_channels"]


@pytest.mark.parametrize("value, needle", [
    ('{"codebook_size": 1', "--config value is not valid JSON"),
    ("missing.json", "--config 'missing.json' is neither a JSON object nor an existing file"),
])
def test_bad_config_is_named(tmp_path, capsys, value, needle):
    with pytest.raises(SystemExit) as exit_info:
        cli(["--dataset", "digits", "--max-steps", "1", "--output-dir", str(tmp_path / "out"), "--config", value])
    assert exit_info.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("changed, message", [
    (["--variant", "vqvae"], r"variant: 'vqgan' -> 'vqvae'"),
    (["--codebook-size", "32"], r"codebook_size: 64 -> 32"),
    (["--config", '{"disc_norm": "batch"}'], r"disc_norm: 'group' -> 'batch'"),
    (["--preset", "small"], r"base_channels: \d+ -> \d+"),
])
def test_resume_with_changed_settings_is_refused(train, tmp_path, capsys, changed, message):
    out = train(tmp_path / "run", "--variant", "vqgan", steps=2)
    before = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train(out, "--variant", "vqgan", *changed, "--resume", steps=4)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "was started with other settings" in err and re.search(message, err), err
    assert (out / "model.safetensors").read_bytes() == before  # nothing overwritten
    assert [row["step"] for row in read_metrics(out)][-1] == 2


@pytest.mark.parametrize("name", ["pytorch_model.bin", "custom_checkpoint_0.pkl"])
def test_resume_refuses_a_checkpoint_holding_pickles(train, tmp_path, capsys, name):
    """A checkpoint whose weights are a pickle (even with a matching manifest) is refused by vqgen, unloaded."""
    from stage1_tokenizer.train_utils import write_manifest

    out = train(tmp_path / "run", "--variant", "vqvae", steps=2)
    before = (out / "model.safetensors").read_bytes()
    checkpoint = out / "checkpoints" / "step_2"
    torch.save({"weight": torch.zeros(1)}, checkpoint / name)
    if name == "pytorch_model.bin":
        (checkpoint / "model.safetensors").unlink()
    write_manifest(checkpoint)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train(out, "--variant", "vqvae", "--resume", steps=4)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"holds files vqgen does not load: ['{name}']" in err, err
    assert (out / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("labels, feature, message", [
    ([0, 1, 2, 3], "classlabel", r"labels \[2, 3\] are outside its 2 class names \['a', 'b'\]"),
    ([0, 1, 5, 1], "classlabel", r"labels \[5\] are outside"),
    ([-1, 0, 1, 1], "int", "integer labels must be 0..K-1, found -1"),
])
def test_labels_outside_the_class_names_are_refused(tmp_path, labels, feature, message):
    import datasets

    from stage1_tokenizer.data import DataError, load_split

    folder = tmp_path / "labelled"
    folder.mkdir()
    label_feature = datasets.ClassLabel(names=["a", "b"]) if feature == "classlabel" else datasets.Value("int64")
    features = datasets.Features({"text": datasets.Value("string"), "label": label_feature})
    data = {"text": ["one", "two", "three", "four"], "label": labels}
    if feature == "classlabel":  # ClassLabel refuses out-of-range values itself when encoding: write raw ints
        features = datasets.Features({"text": datasets.Value("string"), "label": datasets.Value("int64")})
        datasets.Dataset.from_dict(data, features=features).to_parquet(folder / "train.parquet")
        table = datasets.load_dataset(str(folder))["train"]
        table = table.cast_column("label", datasets.ClassLabel(names=["a", "b"]))  # no range check on cast
        folder2 = tmp_path / "labelled2"
        folder2.mkdir()
        table.to_parquet(folder2 / "train.parquet")
        folder = folder2
    else:
        datasets.Dataset.from_dict(data, features=features).to_parquet(folder / "train.parquet")
    with pytest.raises(DataError, match=message):
        load_split(str(folder), "train", "text")


def test_integer_labels_without_names_get_numbered_classes(tmp_path):
    import datasets

    from stage1_tokenizer.data import load_split

    folder = tmp_path / "numbered"
    folder.mkdir()
    datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 2, 1]}).to_parquet(folder / "train.parquet")
    assert load_split(str(folder), "train", "text").class_names == ["0", "1", "2"]


def test_negative_disc_grad_clip_is_named(tmp_path, capsys):
    from stage1_tokenizer.train import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--max-steps", "1", "--output-dir", str(tmp_path), "--disc-grad-clip", "-1"])
    assert exit_info.value.code == 2
    assert "--disc-grad-clip must be a finite number >= 0.0, got -1.0" in capsys.readouterr().err


def test_log_window_averages_each_key_over_the_steps_that_logged_it():
    window = LogWindow()
    window.add({"loss": torch.tensor(1.0), "threads": 2})
    window.add({"loss": torch.tensor(3.0), "disc_loss": torch.tensor(0.5), "threads": 1})
    window.add({"loss": torch.tensor(5.0), "disc_loss": torch.tensor(1.5)})
    means = window.mean()
    assert means["loss"].item() == 3.0 and means["disc_loss"].item() == 1.0 and means["threads"] == 1
    assert len(window) == 0 and window.mean() == {}  # emptied for the next window
    window.add({"loss": torch.tensor(7.0)})
    assert window.mean()["loss"].item() == 7.0


def test_a_logged_row_is_the_mean_of_its_window(train, tmp_path):
    """log_every 2: each row's loss is the mean of the two steps' losses logged with log_every 1, so the GAN health
    over a window describes all its batches, not one."""
    every_step, every_other = tmp_path / "every_step", tmp_path / "every_other"
    train(every_step, "--variant", "vqgan", "--log-every", "1", steps=4)
    train(every_other, "--variant", "vqgan", "--log-every", "2", steps=4)
    single, paired = read_metrics(every_step), read_metrics(every_other)
    assert [row["step"] for row in paired] == [2, 4]
    for row, (first, second) in zip(paired, [single[0:2], single[2:4]]):
        for key in ("loss", "rec_loss", "disc_loss", "disc_acc_real", "logits_fake"):
            assert row[key] == pytest.approx((first[key] + second[key]) / 2, rel=1e-5, abs=1e-7), key
