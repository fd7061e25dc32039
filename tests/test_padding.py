"""Text padding never enters the tokenizer's loss, the byte accuracy or the prior's loss.

A text record is its bytes, then PAD_BYTE up to the sequence length. The first pad marks the end (the tokenizer
learns to reproduce it, so decoded samples end); everything after it is padding.
"""

from __future__ import annotations

import pytest
import torch

from stage1_tokenizer.configuration import PAD_BYTE, VQConfig
from stage1_tokenizer.evaluation import reconstruction_metrics
from stage1_tokenizer.losses import TokenizerObjective, text_targets
from stage1_tokenizer.modeling import VQModel
from stage1_tokenizer.modeling_text import codes_up_to_end, strings_to_bytes
from stage2_prior.modeling import TokenLayout, build_prior
from stage2_prior.train import code_loss

SEQ_LEN = 32
TEXTS = ["to be or not", "a much longer line of text here!", ""]  # 12 bytes, 32 bytes (no pad), empty


def _text_config(variant: str = "vqvae") -> VQConfig:
    return VQConfig.from_preset("tiny", modality="text", variant=variant, seq_len=SEQ_LEN)


def test_the_targets_keep_the_end_and_drop_what_follows():
    targets = text_targets(strings_to_bytes(TEXTS, SEQ_LEN))
    assert targets[0, 12].item() == PAD_BYTE and (targets[0, 13:] == -100).all()  # the end, then ignored
    assert (targets[1] != -100).all()  # a full window: every byte counts
    assert targets[2, 0].item() == PAD_BYTE and (targets[2, 1:] == -100).all()


def test_logits_after_the_end_do_not_change_the_tokenizer_loss():
    objective = TokenizerObjective(_text_config())
    target = strings_to_bytes(TEXTS, SEQ_LEN)
    logits = torch.randn(len(TEXTS), 257, SEQ_LEN, generator=torch.Generator().manual_seed(0))
    loss = objective.reconstruction_loss(logits, target)
    changed = logits.clone()
    changed[0, :, 13:] = torch.randn(257, SEQ_LEN - 13)  # padding of the first record
    changed[2, :, 1:] += 50.0 * torch.rand(257, SEQ_LEN - 1)  # padding of the empty record
    assert objective.reconstruction_loss(changed, target) == pytest.approx(float(loss), rel=1e-6)
    at_end = logits.clone()
    at_end[0, :, 12] = torch.randn(257)  # the end marker itself counts
    assert float(objective.reconstruction_loss(at_end, target)) != pytest.approx(float(loss), rel=1e-6)


def test_predictions_at_padding_do_not_change_the_byte_accuracy(monkeypatch):
    model = VQModel(_text_config()).eval()
    inputs = strings_to_bytes(TEXTS[:1], SEQ_LEN)  # 12 bytes, then 20 pads

    def decode_as(predicted):
        logits = torch.full((1, 257, SEQ_LEN), -10.0)
        logits[0, predicted, torch.arange(SEQ_LEN)] = 10.0
        return lambda codes: logits.expand(len(codes), -1, -1)

    right = inputs[0].clone()
    right[5] = ord("#")  # one byte of the 12 wrong
    monkeypatch.setattr(model, "decode", decode_as(right))
    records = torch.utils.data.TensorDataset(inputs, torch.tensor([-1]))
    base = reconstruction_metrics(model, records)
    assert base["byte_accuracy"] == pytest.approx(11 / 12)
    garbage_after_end = right.clone()
    garbage_after_end[12:] = ord("x")  # every pad position predicted as a letter
    monkeypatch.setattr(model, "decode", decode_as(garbage_after_end))
    assert reconstruction_metrics(model, records)["byte_accuracy"] == pytest.approx(11 / 12)


@torch.no_grad()
def test_codes_after_the_end_do_not_enter_the_prior_loss():
    # 32 bytes in 8 codes: 4 bytes per code. The first pad at byte 12 lies in code 3, so 4 codes count.
    assert codes_up_to_end(strings_to_bytes(TEXTS, SEQ_LEN), 8).tolist() == [4, 8, 1]
    layout = TokenLayout(codebook_size=16, num_classes=0, num_codes=8)
    torch.manual_seed(0)
    prior = build_prior("tiny", layout).eval()
    sequence = torch.cat([torch.full((3, 1), layout.bos_token), torch.randint(0, 16, (3, 8))], dim=1)
    lengths = torch.tensor([4, 8, 1])
    loss = code_loss(prior, sequence, lengths)
    changed = sequence.clone()
    changed[0, 5:] = (changed[0, 5:] + 7) % 16  # codes 4..7 of the first row: after its end
    changed[2, 2:] = (changed[2, 2:] + 3) % 16
    assert float(code_loss(prior, changed, lengths)) == pytest.approx(float(loss), rel=1e-6)
    assert float(code_loss(prior, changed)) != pytest.approx(float(code_loss(prior, sequence)), rel=1e-6)
    inside = sequence.clone()
    inside[0, 4] = (inside[0, 4] + 1) % 16  # the code that holds the end counts
    assert float(code_loss(prior, inside, lengths)) != pytest.approx(float(loss), rel=1e-6)
