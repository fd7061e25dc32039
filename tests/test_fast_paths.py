"""The speed paths change how much work is done, never the result: split-graph VQGAN gradients equal taming's
formulation, the no-grad perceptual target equals the concatenated pass, the perceptual distance's hand-written
backward equals autograd's, the CPU attention equals SDPA, --compile trains and fails clearly."""

from __future__ import annotations

import copy

import pytest
import torch

from stage1_tokenizer import VQConfig, VQModel
from stage1_tokenizer.losses import RandomVGGPerceptualLoss, TokenizerObjective, _unit_channels, unit_channel_distance
from stage1_tokenizer.modeling_image import AttentionBlock


def tiny_vqgan(**overrides) -> VQConfig:
    fields = dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, resolution=16, codebook_size=32,
                  codebook_dim=4, disc_channels=8, disc_layers=2, disc_start=0, perceptual_depth=2,
                  variant="vqgan", perceptual_backend="random-vgg", gan_weighting="adaptive")
    return VQConfig(**{**fields, **overrides})


def generator_gradients(model: VQModel, objective: TokenizerObjective, target: torch.Tensor, split: bool):
    """Loss, logs and the autoencoder's gradients after one generator backward, as train_step runs it."""
    objective.split_backward = split
    if objective.discriminator is not None:
        objective.discriminator.requires_grad_(False)
    out = model(target)
    total, logs = objective.generator_loss(out.reconstruction, target, out.quantizer_loss, 0, model.last_layer)
    total.backward()
    return total.detach(), logs, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("overrides", [{}, {"feature_matching_weight": 0.3, "l2_weight": 0.5},
                                       {"perceptual_backend": "none"}, {"modality": "text", "seq_len": 32}],
                         ids=["image", "feature-matching", "no-perceptual", "text"])
def test_split_backward_matches_taming_formulation(overrides):
    config = tiny_vqgan(**overrides)
    torch.manual_seed(0)
    model = VQModel(config).train()
    reference_model = copy.deepcopy(model)
    objective = TokenizerObjective(config)
    reference_objective = copy.deepcopy(objective)
    target = (torch.randint(0, 257, (4, 32)) if config.modality == "text" else torch.rand(4, 1, 16, 16) * 2 - 1)

    total, logs, grads = generator_gradients(model, objective, target, split=True)
    ref_total, ref_logs, ref_grads = generator_gradients(reference_model, reference_objective, target, split=False)

    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-6)
    assert logs.keys() == ref_logs.keys()
    assert float(logs["adaptive_weight"]) == pytest.approx(float(ref_logs["adaptive_weight"]), rel=1e-4)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:  # equal up to fp32 summation order
        difference = float((grads[name] - ref_grads[name]).norm())
        assert difference <= 1e-5 * float(ref_grads[name].norm()) + 1e-9, (name, difference)
    # The frozen discriminator gets no gradient from the generator pass in either formulation.
    assert all(p.grad is None for p in objective.discriminator.parameters())


def test_split_backward_matches_under_bf16_autocast():
    config = tiny_vqgan()
    torch.manual_seed(0)
    model = VQModel(config).train()
    reference_model = copy.deepcopy(model)
    objective = TokenizerObjective(config)
    reference_objective = copy.deepcopy(objective)
    target = torch.rand(4, 1, 16, 16) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _, grads = generator_gradients(model, objective, target, split=True)
        ref_total, _, ref_grads = generator_gradients(reference_model, reference_objective, target, split=False)
    torch.testing.assert_close(total, ref_total, rtol=1e-2, atol=1e-3)
    # bf16 rounds differently along the two paths: compare each tensor's gradient direction and size.
    for name in grads:
        a, b = grads[name].flatten().float(), ref_grads[name].flatten().float()
        if b.norm() > 0:
            assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99, name
            assert float(a.norm() / b.norm()) == pytest.approx(1.0, rel=0.05), name


def test_perceptual_target_without_autograd_equals_concatenated_pass():
    loss = RandomVGGPerceptualLoss(depth=2)
    x = (torch.rand(3, 1, 16, 16) * 2 - 1).requires_grad_(True)
    y = torch.rand(3, 1, 16, 16) * 2 - 1
    value = loss(x, y)
    value.backward()
    # The formulation before the speed-up: one concatenated pass with y inside the autograd graph.
    x_ref = x.detach().clone().requires_grad_(True)
    h = (torch.cat([x_ref, y]).expand(-1, 3, -1, -1) - loss.shift) / loss.scale
    reference = torch.zeros(())
    for index, layer in enumerate(loss.features):
        h = layer(h)
        if index in loss.taps:
            fx, fy = h.chunk(2)
            reference = reference + (_unit_channels(fx) - _unit_channels(fy)).pow(2).sum(1).mean()
    reference.backward()
    torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-7)


def test_objective_conv_nets_are_channels_last_and_autoencoder_is_not():
    objective = TokenizerObjective(tiny_vqgan())
    convs = [m for m in objective.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    model = VQModel(tiny_vqgan())
    assert model.encoder.conv_in.weight.is_contiguous()


def test_decoder_activations_stay_channels_first():
    # The quantizer and the code lookup move the code dimension last and back, which leaves channel-last strides;
    # unless the decoder makes its input contiguous, it then runs channels-last, where CPU GroupNorm is slower.
    model = VQModel(tiny_vqgan()).train()
    seen = []
    for module in model.decoder.modules():
        if isinstance(module, torch.nn.GroupNorm):
            module.register_forward_hook(lambda m, inputs, output: seen.append(inputs[0].is_contiguous()))
    model(torch.rand(2, 1, 16, 16) * 2 - 1)
    model.decode(torch.zeros(2, *model.config.latent_shape, dtype=torch.long))
    assert seen and all(seen), seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unit_channel_distance_matches_autograd(dtype):
    torch.manual_seed(0)
    a = torch.relu(torch.randn(3, 16, 5, 6)).to(dtype).contiguous(memory_format=torch.channels_last)
    b = torch.relu(torch.randn(3, 16, 5, 6)).to(dtype).contiguous(memory_format=torch.channels_last)
    a[1, :, 2, 3] = 0  # a dead ReLU position: autograd's gradient is NaN there, the hand-written one 0
    a_ref, a_new = a.clone().requires_grad_(True), a.clone().requires_grad_(True)
    reference = (_unit_channels(a_ref.float()) - _unit_channels(b.float())).pow(2).sum(1).mean()
    reference.backward()
    value = unit_channel_distance(a_new, b)
    value.backward()
    torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-7)
    assert a_new.grad.dtype == dtype and a_new.grad.is_contiguous(memory_format=torch.channels_last)
    live = torch.ones_like(a, dtype=torch.bool)
    live[1, :, 2, 3] = False
    assert torch.isnan(a_ref.grad[~live]).all()
    assert (a_new.grad[~live] == 0).all()
    tolerance = dict(rtol=1e-5, atol=1e-8) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(a_new.grad[live].float(), a_ref.grad[live].float(), **tolerance)
    assert a_new.grad[live].abs().max() > 0


def test_unit_channel_distance_target_with_gradient_uses_autograd():
    a = torch.rand(2, 4, 3, 3, requires_grad=True)
    b = torch.rand(2, 4, 3, 3, requires_grad=True)
    unit_channel_distance(a, b).backward()
    assert a.grad is not None and b.grad is not None and b.grad.abs().sum() > 0


def test_cpu_attention_equals_sdpa():
    torch.manual_seed(0)
    block = AttentionBlock(16, 4)
    x = torch.randn(3, 16, 4, 5, requires_grad=True)
    out = block(x)
    out.square().sum().backward()
    h = block.norm(x).flatten(2).transpose(1, 2)
    q, k, v = (t.unsqueeze(1) for t in block.qkv(h).chunk(3, dim=-1))
    attended = torch.nn.functional.scaled_dot_product_attention(q, k, v).squeeze(1)
    reference = x + block.proj(attended).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    grad = x.grad.clone()
    x.grad = None
    reference.square().sum().backward()
    torch.testing.assert_close(grad, x.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- --compile


def test_compile_flag_trains_the_tiny_tokenizer(tmp_path, fresh_accelerate_state):
    from stage1_tokenizer.train import cli

    fresh_accelerate_state()
    out = tmp_path / "run"
    cli(["--preset", "tiny", "--variant", "vqgan", "--max-steps", "2", "--output-dir", str(out), "--compile",
         "--log-every", "1", "--max-eval-items", "16"])
    model = VQModel.from_pretrained(str(out))
    assert model.encode(torch.zeros(2, 1, 16, 16)).shape == (2, 8, 8)
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and "gan_weight" in rows[-1] and "disc_acc_real" in rows[-1]


def test_compiled_prior_loss_equals_eager():
    from stage2_prior.modeling import TokenLayout, build_prior
    from stage2_prior.train import code_loss

    layout = TokenLayout(codebook_size=16, num_classes=2, num_codes=8)
    prior = build_prior("tiny", layout)
    sequence = torch.randint(0, 16, (4, 9))
    torch.testing.assert_close(torch.compile(code_loss)(prior, sequence), code_loss(prior, sequence),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("script", ["stage1_tokenizer", "stage2_prior"])
def test_compile_that_cannot_build_is_a_one_line_error(script, tmp_path, monkeypatch, capsys, fresh_accelerate_state):
    import importlib

    def broken_compile(*args, **kwargs):
        def run(*a, **k):
            raise RuntimeError("C++ compiler not found")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    fresh_accelerate_state()
    if script == "stage1_tokenizer":
        argv = ["--preset", "tiny", "--max-steps", "1", "--output-dir", str(tmp_path / "run"), "--compile"]
    else:
        tokenizer = tmp_path / "tokenizer"
        VQModel(tiny_vqgan(class_names=None)).save_pretrained(str(tokenizer))
        argv = ["--tokenizer", str(tokenizer), "--preset", "tiny", "--max-steps", "1", "--compile",
                "--output-dir", str(tmp_path / "prior"), "--cache-dir", str(tmp_path / "cache")]
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"{script}.train").cli(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: --compile") and "C++ compiler not found" in error and "drop --compile" in error


@pytest.fixture
def fresh_bf16_probe():
    """Clear the once-per-process bf16 measurement before and after the test."""
    from stage1_tokenizer import precision

    precision._cpu_bf16_is_fast.cache_clear()
    yield precision
    precision._cpu_bf16_is_fast.cache_clear()


@pytest.mark.parametrize("override, expected", [("1", "bf16"), ("0", "no")])
def test_auto_precision_on_cpu_follows_the_bf16_measurement(fresh_bf16_probe, monkeypatch, override, expected):
    from stage1_tokenizer.train_utils import mixed_precision_mode

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(fresh_bf16_probe.OVERRIDE_ENV, override)
    assert mixed_precision_mode("auto") == expected
    assert mixed_precision_mode("bf16") == "bf16" and mixed_precision_mode("no") == "no"
    with fresh_bf16_probe.fast_autocast("cpu"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == (torch.bfloat16 if override == "1" else torch.float32)


def test_bf16_measurement_is_a_cached_bool_and_bad_override_is_named(fresh_bf16_probe, monkeypatch):
    monkeypatch.delenv(fresh_bf16_probe.OVERRIDE_ENV, raising=False)
    first = fresh_bf16_probe.bf16_is_fast("cpu")
    assert isinstance(first, bool) and fresh_bf16_probe.bf16_is_fast("cpu") is first
    assert fresh_bf16_probe._cpu_bf16_is_fast.cache_info().hits >= 1
    fresh_bf16_probe._cpu_bf16_is_fast.cache_clear()
    monkeypatch.setenv(fresh_bf16_probe.OVERRIDE_ENV, "yes")
    with pytest.raises(ValueError, match="VQGEN_CPU_BF16='yes'"):
        fresh_bf16_probe.bf16_is_fast("cpu")


def test_optimizers_use_the_fused_adam_kernel_on_cpu(fresh_accelerate_state):
    from accelerate import Accelerator

    from stage1_tokenizer.train import build_models
    from stage1_tokenizer.train_utils import fused_optimizer

    _, _, _, optimizers = build_models(Accelerator(cpu=True), tiny_vqgan(), 2e-4, 2e-4)
    assert [opt.param_groups[0]["fused"] for opt in optimizers] == [True, True]
    assert fused_optimizer(torch.device("cpu")) == {"fused": True}
    assert fused_optimizer(torch.device("meta")) == {}


def test_discriminator_group_norm_on_channels_last_equals_nn_group_norm():
    from stage1_tokenizer.discriminator import GroupNorm

    torch.manual_seed(0)
    norm = GroupNorm(4, 16)
    reference = torch.nn.GroupNorm(4, 16)
    reference.load_state_dict(norm.state_dict())
    x = torch.randn(2, 16, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, out_ref = norm(x), reference(x_ref)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, out_ref)
    out.sin().sum().backward()
    out_ref.sin().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(norm.weight.grad, reference.weight.grad)
