"""The VQGAN's discriminator options and health logs; through the real train_step, the default recipe's discriminator
(trained from step 0, per-sample GroupNorm) separates sharp images from reconstructions before the GAN reaches the
autoencoder, while taming's (BatchNorm, real and fake in separate calls) stays at chance once it trains."""

from __future__ import annotations

import argparse
import statistics

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from pipelines.verdict import gan_health
from stage1_tokenizer.configuration import GAN_RECIPES, VQConfig
from stage1_tokenizer.discriminator import PatchDiscriminator
from stage1_tokenizer.losses import (
    TokenizerObjective,
    centring_penalty,
    hinge_discriminator_loss,
    lecam_penalty,
    separation_auc,
    vanilla_discriminator_loss,
)
from stage1_tokenizer.train import build_models, train_step
from stage1_tokenizer.train_utils import NonFiniteGuard

STEPS = 100
DISC_START = 30


def sharp_shapes(count: int, side: int = 16, seed: int = 1) -> torch.Tensor:
    """Grey rectangles with hard edges on black, in [-1, 1]: detail a young autoencoder visibly blurs."""
    generator = torch.Generator().manual_seed(seed)
    images = -torch.ones(count, 1, side, side)
    for image in images:
        for _ in range(3):
            x0, y0 = torch.randint(0, side - 3, (2,), generator=generator).tolist()
            width, height = torch.randint(2, 8, (2,), generator=generator).tolist()
            image[0, y0:y0 + height, x0:x0 + width] = torch.rand(1, generator=generator).item() * 2 - 1
    return images


def train_gan(recipe: str, steps: int = STEPS) -> list[dict]:
    """Run the real stage-1 train_step on sharp 16x16 shapes; returns the float logs of every step."""
    torch.manual_seed(0)
    images = sharp_shapes(512)
    config = VQConfig.from_preset("tiny", variant="vqgan", **{**GAN_RECIPES[recipe], "disc_start": DISC_START})
    accelerator = Accelerator(cpu=True)
    model, objective, wrapped_disc, optimizers = build_models(accelerator, config, 2e-4, 2e-4)
    args = argparse.Namespace(grad_clip=1.0, disc_grad_clip=0.0)
    guard = NonFiniteGuard(5, accelerator)
    generator = torch.Generator().manual_seed(0)
    history = []
    for step in range(steps):
        batch = images[torch.randint(0, len(images), (16,), generator=generator)]
        logs = train_step(args, accelerator, model, objective, wrapped_disc, optimizers, batch, step, guard)
        history.append({"step": step + 1, **{k: float(v) for k, v in logs.items()}})
    return history


def mean_of(history: list[dict], key: str, rows: slice) -> float:
    return statistics.mean(row[key] for row in history[rows] if key in row)


def test_default_recipe_discriminator_learns_where_tamings_stays_at_chance():
    """BatchNorm normalises the real and the fake batch separately (and DCGAN init starves it): taming's
    discriminator sits at hinge loss ~1.0, while the default one, trained from step 0, gets ahead of it."""
    default, taming = train_gan("vqgen"), train_gan("taming")
    assert "disc_loss" in default[0]  # trained from step 0 (disc_train_start=0), before its loss reaches the AE
    assert "gan_loss" not in default[DISC_START - 1] and "gan_loss" in default[DISC_START]
    assert "disc_loss" not in taming[DISC_START - 1]  # taming trains D only from disc_start
    # Before its loss reaches the autoencoder the default discriminator separates clearly (measured: hinge 0.86,
    # AUC 0.84; the logistic loss grows its logits more slowly than the hinge did, so the hinge reads higher).
    assert mean_of(default, "disc_loss", slice(0, DISC_START)) < 0.9
    assert mean_of(default, "disc_auc", slice(0, DISC_START)) > 0.75
    gan_phase = slice(DISC_START, None)
    assert mean_of(taming, "disc_loss", gan_phase) > 0.95
    assert mean_of(taming, "disc_auc", gan_phase) < 0.55  # chance
    # Once the autoencoder pushes back, the default stays ahead where taming's does not (measured: AUC 0.64 vs 0.49).
    assert mean_of(default, "disc_auc", gan_phase) > mean_of(taming, "disc_auc", gan_phase) + 0.1
    assert mean_of(default, "disc_loss", gan_phase) < mean_of(taming, "disc_loss", gan_phase) - 0.03
    assert default[-1]["gan_weight"] == pytest.approx(GAN_RECIPES["vqgen"]["disc_weight"])
    health = gan_health(taming)
    assert not health["separated"] and health["disc_loss"] > 0.9 and "adaptive_weight" in health


def test_gan_health_summarises_the_last_quarter():
    rows = [{"step": s, "loss": 1.0} for s in range(10)]
    rows += [{"step": 10 + s, "disc_loss": 1.0 if s < 6 else 0.5, "disc_acc_real": 0.9, "disc_acc_fake": 0.8,
              "gan_weight": 0.1} for s in range(8)]
    health = gan_health(rows)
    assert health["disc_loss"] == 0.5 and health["first_step"] == 16 and health["last_step"] == 17
    assert health["separated"]
    assert gan_health([{"step": 1, "loss": 0.3}]) is None  # a VQ-VAE log has no discriminator


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
@pytest.mark.parametrize("spectral_norm", [False, True])
@pytest.mark.parametrize("blur", [False, True])
def test_discriminator_options_build_and_score_patches(norm, spectral_norm, blur):
    disc = PatchDiscriminator(1, 8, 2, norm=norm, spectral_norm=spectral_norm, blur=blur)
    logits = disc(torch.randn(3, 1, 16, 16))
    assert logits.shape[:2] == (3, 1) and logits.shape[-1] >= 2
    if norm != "batch":  # per-sample scoring: a sample's logits do not depend on the rest of its batch
        disc.eval()
        torch.testing.assert_close(disc(torch.ones(1, 1, 16, 16)), disc(torch.ones(4, 1, 16, 16))[:1])
    assert "logit_ema" in disc.state_dict()  # LeCam's anchors are saved with checkpoints


def test_lecam_penalty_pulls_towards_the_other_sides_ema():
    ema = torch.tensor([1.0, -1.0])  # (real, fake)
    real, fake = torch.full((4,), 2.0), torch.full((4,), -2.0)
    penalty = lecam_penalty(real, fake, ema, decay=0.5)
    # EMA first moves halfway to the batch means: (1.5, -1.5); then relu(2 - (-1.5))^2 + relu(1.5 - (-2))^2.
    torch.testing.assert_close(ema, torch.tensor([1.5, -1.5]))
    assert float(penalty) == pytest.approx(2 * 3.5**2)
    assert float(lecam_penalty(torch.full((4,), -5.0), torch.full((4,), 5.0), ema)) == 0.0  # no push when inverted


def test_centring_pins_the_common_offset_and_leaves_the_gap_alone():
    real = torch.tensor([0.1, 0.3], requires_grad=True)
    fake = torch.tensor([-0.5, -0.7], requires_grad=True)
    penalty = centring_penalty(real, fake)  # means 0.2 and -0.6: offset -0.2
    assert float(penalty.detach()) == pytest.approx(0.04)
    penalty.backward()
    # The same push on every logit of both sides (upwards, towards offset 0): the real-fake gap gets no gradient.
    torch.testing.assert_close(real.grad, torch.full((2,), -0.1))
    torch.testing.assert_close(fake.grad, torch.full((2,), -0.1))
    assert float(centring_penalty(torch.tensor([2.0, 1.0]), torch.tensor([-1.0, -2.0]))) == 0.0


def test_median_centring_balances_the_accuracies_where_a_tail_skews_the_mean():
    # Real logits: a typical patch at 0.1, one confident outlier at 3.0; fake logits around -0.3.
    real = torch.tensor([0.0, 0.1, 0.2, 3.0], requires_grad=True)
    fake = torch.tensor([-0.4, -0.3, -0.2, -0.3])
    # The means (0.825, -0.3) put the offset at +0.2625: shifting it to 0 would leave 3 of the 4 real patches
    # below 0. The medians (lower middle: 0.1 and -0.3) put it at -0.1, and shifting that to 0 leaves every
    # real patch above 0 and every fake patch below.
    assert float(centring_penalty(real, fake).detach()) == pytest.approx(0.2625**2)
    penalty = centring_penalty(real, fake, "median")
    assert float(penalty.detach()) == pytest.approx(0.01)
    penalty.backward()
    assert real.grad.tolist() == pytest.approx([0.0, -0.1, 0.0, 0.0])  # only the median patch is pushed
    by_mean = real.detach() - 0.2625
    assert float((by_mean > 0).float().mean()) == 0.25
    shifted = real.detach() + 0.1, fake + 0.1
    assert float(centring_penalty(*shifted, "median")) == pytest.approx(0.0, abs=1e-12)
    assert float((shifted[0] > 0).float().mean()) == 1.0 and float((shifted[1] < 0).float().mean()) == 1.0


def test_balanced_centring_puts_the_threshold_where_both_accuracies_are_equal():
    real = torch.tensor([-1.0, 0.5, 1.0, 2.0], requires_grad=True)
    fake = torch.tensor([-2.0, -1.5, 0.0, 0.8], requires_grad=True)
    # Pooled and sorted: -2, -1.5, -1, 0, | 0.5, 0.8, 1, 2: the median is midway between 0 and 0.5.
    penalty = centring_penalty(real, fake, "balanced")
    assert float(penalty.detach()) == pytest.approx(0.25**2)
    penalty.backward()  # the push falls on the two middle logits only, half each: d(0.25^2)/d(median) = 0.5
    assert real.grad.tolist() == pytest.approx([0.0, 0.25, 0.0, 0.0])
    assert fake.grad.tolist() == pytest.approx([0.0, 0.0, 0.25, 0.0])
    shifted_real, shifted_fake = real.detach() - 0.25, fake.detach() - 0.25
    assert float(centring_penalty(shifted_real, shifted_fake, "balanced")) == pytest.approx(0.0, abs=1e-12)
    # 3 of 4 on the right side of 0 on both sides; mean centring (offset -0.025) leaves 3/4 real, 2/4 fake right.
    assert float((shifted_real > 0).float().mean()) == float((shifted_fake < 0).float().mean()) == 0.75
    by_mean = real.detach() + 0.025, fake.detach() + 0.025
    assert float(centring_penalty(*by_mean)) == pytest.approx(0.0, abs=1e-12)
    assert float((by_mean[1] < 0).float().mean()) == 0.5


def test_vanilla_loss_is_the_logistic_loss_and_pulls_an_undecided_patch_to_zero():
    real, fake = torch.tensor([0.5, 2.0, -1.0]), torch.tensor([-0.3, 0.4, -3.0])
    expected = 0.5 * (F.binary_cross_entropy_with_logits(real, torch.ones(3))
                      + F.binary_cross_entropy_with_logits(fake, torch.zeros(3)))
    torch.testing.assert_close(vanilla_discriminator_loss(real, fake), expected)
    # A patch the discriminator cannot tell apart (the same logit on both sides, inside the hinge's margin):
    # the hinge gives it no gradient, so it sits wherever the offset leaves it; the logistic loss moves it to 0.
    for offset in (-0.5, 0.5):
        for loss_fn, pulled in ((hinge_discriminator_loss, False), (vanilla_discriminator_loss, True)):
            logit = torch.tensor([offset], requires_grad=True)
            loss_fn(logit, logit).backward()
            # Gradient descent moves the logit by -grad: towards 0 when the grad has the offset's sign.
            assert (float(logit.grad) * offset > 0) == pulled, (loss_fn.__name__, offset)
            assert (float(logit.grad) == 0.0) == (not pulled)


@pytest.mark.parametrize("modality", ["image", "text"])
def test_vanilla_objective_trains_the_discriminator_and_logs_its_loss_beside_the_hinge(modality):
    config = VQConfig.from_preset("tiny", variant="vqgan", modality=modality, disc_objective="vanilla")
    objective = TokenizerObjective(config)
    if modality == "image":
        real, fake = torch.rand(4, 1, 16, 16) * 2 - 1, torch.rand(4, 1, 16, 16) * 2 - 1
    else:  # byte ids against the decoder's byte logits (the discriminator embeds both)
        real, fake = torch.randint(0, 257, (4, config.seq_len)), torch.randn(4, 257, config.seq_len)
    torch.manual_seed(0)
    loss, logs = objective.discriminator_loss(fake, real)
    logits_real = objective.discriminator(real).float()
    logits_fake = objective.discriminator(fake).float()
    penalty = config.disc_centring_weight * centring_penalty(logits_real, logits_fake)
    torch.testing.assert_close(loss, vanilla_discriminator_loss(logits_real, logits_fake) + penalty)
    torch.testing.assert_close(logs["disc_loss"], hinge_discriminator_loss(logits_real, logits_fake))
    torch.testing.assert_close(logs["disc_vanilla_loss"], vanilla_discriminator_loss(logits_real, logits_fake))
    hinge_config = VQConfig.from_preset("tiny", variant="vqgan", modality=modality, disc_objective="hinge")
    assert "disc_vanilla_loss" not in TokenizerObjective(hinge_config).discriminator_loss(fake, real)[1]


def test_separation_auc_ignores_the_threshold():
    real, fake = torch.tensor([0.2, 0.4, -0.1]), torch.tensor([-0.3, 0.0, -0.5])
    # 8 of the 9 (real, fake) pairs rank the real patch higher: -0.1 < 0.0 is the one inversion.
    assert float(separation_auc(real, fake)) == pytest.approx(8 / 9)
    assert float(separation_auc(real - 5, fake - 5)) == pytest.approx(8 / 9)  # all below 0: same separation
    assert float(separation_auc(torch.zeros(4), torch.zeros(4))) == pytest.approx(0.5)


def test_separation_auc_equals_the_pairwise_count_with_ties():
    generator = torch.Generator().manual_seed(0)
    real = torch.randint(0, 20, (300,), generator=generator).float()  # many ties within and across sides
    fake = torch.randint(-5, 15, (500,), generator=generator).float()
    pairwise = (real[:, None] > fake[None, :]).float().mean() + 0.5 * (real[:, None] == fake[None, :]).float().mean()
    assert float(separation_auc(real, fake)) == pytest.approx(float(pairwise), abs=1e-6)
    assert float(separation_auc(fake, real)) == pytest.approx(1 - float(pairwise), abs=1e-6)


def test_fixed_weighting_uses_the_constant_and_logs_no_adaptive_weight():
    config = VQConfig.from_preset("tiny", variant="vqgan", gan_weighting="fixed", disc_weight=0.1)
    objective = TokenizerObjective(config)
    from stage1_tokenizer import VQModel

    model = VQModel(config)
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    out = model(images)
    _, logs = objective.generator_loss(out.reconstruction, images, out.quantizer_loss, 0, model.last_layer)
    assert float(logs["gan_weight"]) == pytest.approx(0.1) and "adaptive_weight" not in logs


@pytest.mark.parametrize("field, value, message", [
    ("disc_norm", "layer", "disc_norm"), ("gan_weighting", "auto", "gan_weighting"),
    ("disc_centring", "trimmed", "disc_centring='trimmed' is not supported"),
    ("disc_objective", "wasserstein", "disc_objective='wasserstein' is not supported"),
    ("disc_train_start", 5000, "disc_train_start"), ("lecam_weight", -1.0, "lecam_weight"),
    ("disc_spectral_norm", "false", "disc_spectral_norm"), ("l2_normalize", "false", "l2_normalize"),
])
def test_bad_gan_fields_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        VQConfig(variant="vqgan", disc_start=1000, **{field: value})


def test_taming_recipe_from_the_command_line(tmp_path):
    from stage1_tokenizer.train import build_config, parse_args

    args = parse_args(["--max-steps", "1", "--output-dir", str(tmp_path), "--gan-recipe", "taming",
                       "--config", '{"lecam_weight": 0.01}'])
    config = build_config(args, 1, None)
    assert config.disc_norm == "batch" and config.gan_weighting == "adaptive" and config.disc_train_start is None
    assert config.lecam_weight == 0.01  # --config goes over the recipe


@pytest.mark.parametrize("fields, message", [
    ({"l1_weight": float("nan")}, "l1_weight=nan must be a finite number"),
    ({"commitment_beta": "abc"}, "commitment_beta='abc' must be a finite number"),
    ({"disc_weight": True}, "disc_weight=True must be a finite number"),
    ({"ema_decay": float("inf")}, "ema_decay"),
    ({"codebook_size": 10**9}, "codebook_size=1000000000 is beyond the supported maximum"),
    ({"resolution": 4096}, "resolution=4096 is beyond the supported maximum"),
    ({"disc_start": 1.5}, "disc_start=1.5 must be an integer"),
])
def test_config_values_of_the_wrong_kind_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        VQConfig(**fields)


def test_unknown_discriminator_init_is_named():
    with pytest.raises(ValueError, match="disc_init='kaiming' is not supported"):
        PatchDiscriminator(1, 8, 2, init="kaiming")
