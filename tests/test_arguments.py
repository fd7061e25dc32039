"""Training arguments: dataclasses parsed by HfArgumentParser, one source of defaults, and a 0 that stays a 0."""

import dataclasses
import json

import pytest

from stage1_tokenizer.arguments import TokenizerTrainingArguments, parse_arguments, save_arguments
from stage1_tokenizer.configuration import TOKENIZER_PRESETS
from stage2_prior.arguments import PriorTrainingArguments
from stage2_prior.modeling import PRIOR_PRESETS


def test_flags_with_dashes_or_underscores_give_the_same_object(tmp_path):
    dashes = parse_arguments(TokenizerTrainingArguments, ["--max-steps", "7", "--output-dir", str(tmp_path),
                                                          "--perceptual", "none", "--disc-start", "0", "--hflip"])
    underscores = parse_arguments(TokenizerTrainingArguments, ["--max_steps", "7", "--output_dir", str(tmp_path),
                                                               "--perceptual_backend", "none", "--disc_start", "0",
                                                               "--hflip"])
    assert dashes == underscores
    assert dashes.disc_start == 0 and dashes.hflip is True and dashes.perceptual_backend == "none"


def test_resolved_fills_only_unset_fields_from_the_preset(tmp_path):
    arguments = TokenizerTrainingArguments(max_steps=5, output_dir=str(tmp_path), preset="small", batch_size=3)
    resolved = arguments.resolved()
    train = TOKENIZER_PRESETS["small"]["train"]
    assert resolved.batch_size == 3  # given: kept
    assert resolved.learning_rate == train["learning_rate"] and resolved.log_every == train["log_every"]
    assert arguments.learning_rate is None  # the original is untouched
    prior = PriorTrainingArguments(tokenizer="t", max_steps=5, output_dir="o", preset="small", warmup_steps=0)
    assert prior.resolved().warmup_steps == 0  # a 0 stays a 0
    assert prior.resolved().batch_size == PRIOR_PRESETS["small"]["train"]["batch_size"]


def test_small_preset_trains_the_image_vqvae_with_its_own_adam_betas(tmp_path):
    def betas(**fields):
        arguments = TokenizerTrainingArguments(max_steps=5, output_dir=str(tmp_path), preset="small", **fields)
        return arguments.resolved().adam_beta1, arguments.resolved().adam_beta2

    train, vqvae = TOKENIZER_PRESETS["small"]["train"], TOKENIZER_PRESETS["small"]["image_train"]["vqvae"]
    taming = (train["adam_beta1"], train["adam_beta2"])
    assert (vqvae["adam_beta1"], vqvae["adam_beta2"]) != taming
    assert betas(variant="vqvae") == (vqvae["adam_beta1"], vqvae["adam_beta2"])
    assert betas(variant="vqgan") == taming
    assert betas(variant="vqvae", modality="text") == taming  # measured for images only
    assert betas(variant="vqvae", adam_beta1=0.5) == (0.5, vqvae["adam_beta2"])  # given: kept
    assert betas(variant="vqvae", adam_beta1=0.0)[0] == 0.0  # a 0 stays a 0


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--learning-rate", "0"], "--learning-rate must be a finite number > 0.0, got 0.0"),
    (["--learning-rate", "nan"], "--learning-rate must be a finite number > 0.0, got nan"),
    (["--max-steps", "0"], "--max-steps must be >= 1, got 0"),
    (["--preset", "huge"], "invalid choice: 'huge'"),
    (["--disc-start", "-1"], "--disc-start must be >= 0, got -1"),
    (["--adam-beta1", "1"], "--adam-beta1 must be in [0, 1), got 1.0"),
    (["--adam-beta2", "nan"], "--adam-beta2 must be in [0, 1), got nan"),
])
def test_bad_values_exit_2_with_the_field_named(tmp_path, capsys, flags, message):
    argv = ["--max-steps", "3", "--output-dir", str(tmp_path), *flags]
    with pytest.raises(SystemExit) as stop:
        parse_arguments(TokenizerTrainingArguments, argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_a_json_file_of_fields_is_the_same_as_the_flags(tmp_path):
    arguments = PriorTrainingArguments(tokenizer="tok", max_steps=9, output_dir=str(tmp_path), class_conditional=True,
                                       label_dropout=0.2)
    path = save_arguments(arguments, tmp_path)
    assert json.loads(path.read_text())["label_dropout"] == 0.2
    assert parse_arguments(PriorTrainingArguments, [str(path)]) == arguments
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**dataclasses.asdict(arguments), "label_dropout": 1.5}))
    with pytest.raises(SystemExit):
        parse_arguments(PriorTrainingArguments, [str(bad)])
