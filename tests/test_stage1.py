"""Stage 1 config, model and objective: config errors, save/load equality, encode/decode contracts,
the VQ-VAE and VQGAN losses (adaptive weight, disc_start, hinge)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel

from stage1_tokenizer import TOKENIZER_PRESETS, VQConfig, VQModel
from stage1_tokenizer.losses import TokenizerObjective, adaptive_gan_weight, hinge_discriminator_loss
from stage1_tokenizer.modeling_text import bytes_to_strings, strings_to_bytes

TINY = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, num_groups=4, codebook_size=32,
            codebook_dim=4, resolution=16, seq_len=16, byte_embed_dim=16, disc_channels=8,
            disc_layers=2, usage_window=4)


def tiny_config(**overrides) -> VQConfig:
    """A seconds-sized tokenizer config: 16x16 images -> 8x8 codes, 16 bytes -> 8 codes."""
    return VQConfig(**{**TINY, **overrides})


def images(batch: int = 4) -> torch.Tensor:
    return torch.rand(batch, 1, 16, 16) * 2 - 1


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "fields, named",
    [
        (dict(resolution=18, channel_mult=(1, 2, 2)), "resolution"),
        (dict(modality="text", seq_len=30, channel_mult=(1, 2, 2)), "seq_len"),
        (dict(codebook_size=1), "codebook_size"),
        (dict(variant="vqx"), "variant"),
        (dict(modality="audio"), "modality"),
        (dict(codebok_size=64), "codebok_size"),
        (dict(ema_decay=1.0), "ema_decay"),
        (dict(perceptual_backend="vgg"), "perceptual_backend"),
        (dict(in_channels=2), "in_channels"),
        (dict(num_groups=3), "num_groups"),
        (dict(variant="vqgan", disc_layers=3), "disc_layers=3 is too deep for resolution=16"),
        (dict(variant="vqgan", modality="text", disc_layers=3), "disc_layers=3 is too deep for seq_len=16"),
    ],
)
def test_config_rejects_bad_fields_naming_them(fields, named):
    with pytest.raises(ValueError, match=named):
        tiny_config(**fields)


def test_unknown_preset_is_an_error_naming_the_choices():
    with pytest.raises(ValueError, match="preset='huge'.*tiny"):
        VQConfig.from_preset("huge")


@pytest.mark.parametrize("preset", sorted(TOKENIZER_PRESETS))
def test_presets_build_valid_configs(preset):
    config = VQConfig.from_preset(preset)
    assert config.resolution % config.downsample_factor == 0
    assert config.latent_shape == (config.resolution // config.downsample_factor,) * 2
    text = VQConfig.from_preset(preset, modality="text")
    assert text.latent_shape == (text.seq_len // text.downsample_factor,)


def fields_of(config: VQConfig) -> dict:
    """The config's saved fields, less where it was loaded from."""
    return {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}


def test_config_save_load_round_trip(tmp_path):
    config = tiny_config(variant="vqgan", ema_decay=0.99, class_names=["a", "b"], rotation_trick=True)
    config.save_pretrained(tmp_path)
    for loaded in (VQConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert isinstance(loaded, VQConfig)
        assert fields_of(loaded) == fields_of(config)
    # config.json also feeds the training script's --config: every key must be accepted back.
    assert fields_of(VQConfig(**json.loads((tmp_path / "config.json").read_text()))) == fields_of(config)


def test_config_json_with_an_unknown_field_is_rejected(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    fields = json.loads((tmp_path / "config.json").read_text())
    fields["commitment_weight"] = 0.25  # a plausible typo for commitment_beta
    (tmp_path / "config.json").write_text(json.dumps(fields))
    with pytest.raises(ValueError, match="commitment_weight"):
        VQConfig.from_pretrained(tmp_path)


# ---------------------------------------------------------------- model


MODEL_CASES = {
    "image": dict(),
    "image-ema-kmeans": dict(ema_decay=0.9, kmeans_init=True, dead_code_threshold=1.0),
    "text": dict(modality="text"),
}


def example_inputs(config: VQConfig, batch: int = 4):
    if config.modality == "image":
        return images(batch)
    return torch.randint(0, 257, (batch, config.seq_len))


@pytest.mark.parametrize("fields", MODEL_CASES.values(), ids=MODEL_CASES.keys())
def test_save_pretrained_from_pretrained_equality(tmp_path, fields):
    model = VQModel(tiny_config(**fields)).train()
    for _ in range(6):  # move the buffers (usage window, EMA state, k-means flag) off their initial values
        model(example_inputs(model.config))
    model.eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()

    state = model.state_dict()
    assert int(state["quantizer.usage_cursor"]) == 6
    inputs = example_inputs(model.config)
    for loaded in (VQModel.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
        assert type(loaded) is VQModel
        loaded_state = loaded.state_dict()
        assert loaded_state.keys() == state.keys()
        for name, tensor in state.items():
            assert loaded_state[name].dtype == tensor.dtype, name
            assert torch.equal(loaded_state[name], tensor), name
        assert torch.equal(loaded.encode(inputs), model.encode(inputs))
        assert loaded.quantizer.usage_stats() == model.quantizer.usage_stats()
        # An EMA codebook stays out of the optimizer's reach after loading too.
        assert loaded.quantizer.embedding.weight.requires_grad == (fields.get("ema_decay") is None)


def test_image_encode_shape_and_decode_range():
    model = VQModel(tiny_config()).eval()
    x = images(3)
    codes = model.encode(x)
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 32
    assert torch.equal(model(x).indices, codes)
    with torch.no_grad():
        model.decoder.conv_out.bias.fill_(3.0)  # push raw outputs well outside [-1, 1]
    assert model(x).reconstruction.max() > 1.0
    decoded = model.decode(codes)
    assert decoded.shape == (3, 1, 16, 16)
    assert decoded.min() >= -1.0 and decoded.max() <= 1.0


def test_decode_rejects_bad_indices():
    model = VQModel(tiny_config()).eval()
    with pytest.raises(ValueError, match=r"\[0, 31\]"):
        model.decode(torch.full((1, 8, 8), 32))
    with pytest.raises(ValueError, match="shape"):
        model.decode(torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="images must have shape"):
        model.encode(torch.zeros(1, 3, 16, 16))


def test_forward_returns_losses_and_window_usage():
    model = VQModel(tiny_config()).train()
    out = model(images())
    assert out.reconstruction.shape == (4, 1, 16, 16)
    assert out.indices.shape == (4, 8, 8)
    torch.testing.assert_close(out.quantizer_loss, out.codebook_loss + 0.25 * out.commitment_loss)
    assert out.usage == model.quantizer.usage_stats()
    assert 0 < out.usage["codebook_usage"] <= 100


def test_text_encode_strings_and_decode_text_never_raises():
    model = VQModel(tiny_config(modality="text")).eval()
    texts = ["hello world", "naïve café — 日本語", ""]
    codes = model.encode(texts)
    assert codes.shape == (3, 8) and codes.dtype == torch.long
    assert torch.equal(codes, model.encode(strings_to_bytes(texts, 16)))
    logits = model.decode(codes)
    assert logits.shape == (3, 257, 16)

    random_codes = torch.randint(0, 32, (5, 8))
    decoded = model.decode_text(random_codes)
    assert len(decoded) == 5 and all(isinstance(t, str) for t in decoded)
    with torch.no_grad():  # make every position decode to a lone UTF-8 continuation byte
        model.decoder.net.conv_out.bias.zero_()
        model.decoder.net.conv_out.bias[0x80] = 1e4
    decoded = model.decode_text(random_codes)
    assert decoded == ["\ufffd" * 16] * 5

    with pytest.raises(ValueError, match="modality='text'"):
        VQModel(tiny_config()).decode_text(torch.zeros(1, 8, 8, dtype=torch.long))


def test_byte_round_trip_pads_truncates_and_replaces():
    texts = ["héllo", "日本語のテキスト"]  # 6 bytes; 24 bytes, cut inside a character at 16
    byte_ids = strings_to_bytes(texts, 16)
    assert byte_ids.shape == (2, 16)
    assert byte_ids[0, 6:].eq(256).all()
    decoded = bytes_to_strings(byte_ids)
    assert decoded[0] == "héllo"
    assert decoded[1].startswith("日本語のテ") and decoded[1].endswith("\ufffd")
    with pytest.raises(TypeError, match="list of strings"):
        strings_to_bytes("not a list", 16)


# ---------------------------------------------------------------- objective


def test_vqvae_objective_is_mse_plus_quantizer_loss_only():
    config = tiny_config(variant="vqvae", disc_start=0)
    objective = TokenizerObjective(config)
    assert objective.perceptual is None and objective.discriminator is None
    reconstruction, target = torch.zeros(2, 1, 16, 16), torch.full((2, 1, 16, 16), 0.5)
    quantizer_loss = torch.tensor(0.3)
    total, logs = objective.generator_loss(reconstruction, target, quantizer_loss, 10**6, torch.zeros(1))
    torch.testing.assert_close(total, torch.tensor(0.25 + 0.3))  # MSE 0.25, not L1 0.5
    assert set(logs) == {"rec_loss", "quantizer_loss"}
    assert not objective.gan_active(10**6)


def test_text_reconstruction_is_byte_cross_entropy():
    objective = TokenizerObjective(tiny_config(modality="text"))
    logits, target = torch.randn(2, 257, 16), torch.randint(0, 257, (2, 16))
    torch.testing.assert_close(objective.reconstruction_loss(logits, target), F.cross_entropy(logits, target))


def test_adaptive_weight_hand_case():
    last_layer = torch.zeros(3, requires_grad=True)
    rec = (last_layer * torch.tensor([3.0, 0.0, 4.0])).sum()  # gradient norm 5
    gan = (last_layer * torch.tensor([0.0, 2.0, 0.0])).sum()  # gradient norm 2
    weight = adaptive_gan_weight(rec, gan, last_layer, max_weight=1e4)
    assert float(weight) == pytest.approx(5.0 / (2.0 + 1e-4))
    assert not weight.requires_grad
    # A vanishing GAN gradient is clamped at max_weight.
    flat_gan = (last_layer * torch.zeros(3)).sum()
    assert float(adaptive_gan_weight(rec, flat_gan, last_layer, max_weight=100.0)) == 100.0


@pytest.mark.parametrize("backend", ["none", "random-vgg"])
def test_vqgan_generator_loss_uses_last_layer_gradient_ratio(backend):
    config = tiny_config(variant="vqgan", perceptual_backend=backend, perceptual_depth=1, disc_start=0,
                         l2_weight=0.5, disc_weight=0.8, gan_weighting="adaptive")
    model, objective = VQModel(config).train(), TokenizerObjective(config)
    target = images()
    out = model(target)
    total, logs = objective.generator_loss(out.reconstruction, target, out.quantizer_loss, 0, model.last_layer)

    # Recompute by hand: rec = L1 + 0.5 * L2 (+ perceptual), gan = -mean D(x_hat).
    rec = (out.reconstruction - target).abs().mean() + 0.5 * F.mse_loss(out.reconstruction, target)
    if backend != "none":
        rec = rec + objective.perceptual(out.reconstruction, target)
    gan = -objective.discriminator(out.reconstruction).mean()
    rec_grad = torch.autograd.grad(rec, model.last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan, model.last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    assert float(logs["adaptive_weight"]) == pytest.approx(float(weight), rel=1e-4)
    torch.testing.assert_close(total, rec + out.quantizer_loss + 0.8 * weight * gan, rtol=1e-5, atol=1e-6)
    assert ("perceptual_loss" in logs) == (backend != "none")


def test_gan_terms_are_off_before_disc_start():
    config = tiny_config(variant="vqgan", perceptual_backend="none", disc_start=3)
    model, objective = VQModel(config).train(), TokenizerObjective(config)
    target = images()
    out = model(target)
    assert not objective.gan_active(2) and objective.gan_active(3)
    before, logs = objective.generator_loss(out.reconstruction, target, out.quantizer_loss, 2, model.last_layer)
    assert "gan_loss" not in logs and "adaptive_weight" not in logs
    torch.testing.assert_close(before, (out.reconstruction - target).abs().mean() + out.quantizer_loss)
    after, logs = objective.generator_loss(out.reconstruction, target, out.quantizer_loss, 3, model.last_layer)
    assert "gan_loss" in logs and not torch.equal(before, after)


def test_hinge_loss_on_known_logits():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    # 0.5 * (mean relu(1 - real) + mean relu(1 + fake)) = 0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 2.5) / 3)
    assert float(hinge_discriminator_loss(real, fake)) == pytest.approx(1.0)
    assert float(hinge_discriminator_loss(torch.full((4,), 1.0), torch.full((4,), -1.0))) == 0.0
    assert float(hinge_discriminator_loss(torch.full((4,), -1.0), torch.full((4,), 1.0))) == pytest.approx(2.0)


def test_discriminator_loss_detaches_reconstructions():
    config = tiny_config(variant="vqgan", perceptual_backend="none")
    model, objective = VQModel(config).train(), TokenizerObjective(config)
    target = images()
    out = model(target)
    loss, logs = objective.discriminator_loss(out.reconstruction, target)
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.discriminator.parameters())
    assert {"disc_loss", "logits_real", "logits_fake"} <= set(logs)


def test_text_discriminator_sees_soft_byte_embeddings():
    objective = TokenizerObjective(tiny_config(modality="text", variant="vqgan"))
    discriminator = objective.discriminator
    byte_ids = torch.randint(0, 257, (2, 16))
    real = discriminator.embed(byte_ids)  # one_hot @ E
    torch.testing.assert_close(real, discriminator.byte_embedding[byte_ids].transpose(1, 2))
    peaked = F.one_hot(byte_ids, 257).transpose(1, 2).float() * 100.0  # softmax ~ one-hot
    torch.testing.assert_close(discriminator.embed(peaked), real, atol=1e-5, rtol=0)
    logits = torch.randn(2, 257, 16, requires_grad=True)
    discriminator(logits).mean().backward()
    assert logits.grad.abs().sum() > 0, "the generator gets a gradient through the soft embedding"


# ---------------------------------------------------------------- perceptual backends


def test_random_vgg_is_seeded_and_leaves_the_global_rng_alone():
    from stage1_tokenizer.losses import RandomVGGPerceptualLoss

    state = torch.random.get_rng_state()
    first, second = RandomVGGPerceptualLoss(depth=1), RandomVGGPerceptualLoss(depth=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in first.parameters())
    x = images(2)
    assert float(first(x, x)) == 0.0 and float(first(x, -x)) > 0.0


def test_lpips_without_weights_says_how_to_proceed(monkeypatch):
    import urllib.error

    import torchvision.models._api

    from stage1_tokenizer.losses import build_perceptual

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(ValueError, match="perceptual_backend='lpips'.*--perceptual random-vgg"):
        build_perceptual("lpips")
