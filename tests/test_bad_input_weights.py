"""Weights come from safetensors only: a pickle-only folder is refused by name on every path that reads weights."""

import pytest
import torch

from stage1_tokenizer import VQConfig, VQModel
from stage1_tokenizer.loading import load_strict
from stage2_prior.train import cli as prior_cli


@pytest.fixture
def pickle_only_tokenizer(tmp_path):
    config = VQConfig.from_preset("tiny", resolution=16, in_channels=1)
    model = VQModel(config)
    folder = tmp_path / "tokenizer"
    model.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_vqmodel_from_pretrained_never_reads_a_pickle(pickle_only_tokenizer):
    with pytest.raises(OSError, match="safetensors"):
        VQModel.from_pretrained(pickle_only_tokenizer)


def test_strict_loading_names_the_pickle(pickle_only_tokenizer):
    with pytest.raises(ValueError, match=r"holds only pickle weights \['pytorch_model.bin'\]; vqgen loads safetensors"):
        load_strict(VQModel, pickle_only_tokenizer, "tokenizer")


def test_stage2_refuses_a_pickle_only_tokenizer(pickle_only_tokenizer, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        prior_cli(["--tokenizer", str(pickle_only_tokenizer), "--max-steps", "1", "--output-dir", str(tmp_path / "p")])
    assert stop.value.code == 2
    assert "holds only pickle weights ['pytorch_model.bin']" in capsys.readouterr().err
