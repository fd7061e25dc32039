"""Invariants of stage1_tokenizer.quantizer: lookup round trip, the commitment term's weight, EMA, l2 codes,
rotation trick, dead-code restart, k-means init, fp32 distances under autocast and windowed usage stats."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stage1_tokenizer.quantizer import VectorQuantizer, kmeans, rotate_to, usage_from_counts

# A 3-code, 2-dim codebook and four encoder outputs whose nearest codes are [0, 1, 1, 2].
CODEBOOK = torch.tensor([[0.0, 0.0], [1.0, 1.0], [-2.0, 1.0]])
OUTPUTS = torch.tensor([[0.2, -0.1], [0.9, 1.3], [1.2, 0.8], [-1.5, 0.5]])
NEAREST = torch.tensor([0, 1, 1, 2])


def make_quantizer(codebook: torch.Tensor, **options) -> VectorQuantizer:
    """A quantizer whose codebook is `codebook` (K, D), EMA statistics consistent with it."""
    quantizer = VectorQuantizer(codebook.shape[0], codebook.shape[1], **options)
    with torch.no_grad():
        quantizer.embedding.weight.copy_(codebook)
        if quantizer.ema_decay is not None:
            quantizer.ema_cluster_size.fill_(1.0)
            quantizer.ema_embed_sum.copy_(codebook)
    return quantizer


def as_latents(flat: torch.Tensor) -> torch.Tensor:
    """(N, D) vectors -> channel-first latents (1, D, N), the quantizer's input layout."""
    return flat.t().unsqueeze(0).contiguous()


def as_rows(latents: torch.Tensor) -> torch.Tensor:
    """(1, D, N) -> (N, D)."""
    return latents[0].t()


OPTIONS = {
    "straight-through": {},
    "l2": {"l2_normalize": True},
    "ema": {"ema_decay": 0.99},
    "rotation": {"rotation_trick": True},
    "l2+rotation+ema": {"l2_normalize": True, "rotation_trick": True, "ema_decay": 0.9},
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("spatial", [(5,), (3, 4)], ids=["1d", "2d"])
def test_forward_value_is_the_looked_up_code(options, training, spatial):
    quantizer = VectorQuantizer(16, 4, **options).train(training)
    z = torch.randn(2, 4, *spatial)
    codebook = quantizer.codebook.detach().clone()  # an EMA step in training updates it after the lookup
    out = quantizer(z)
    assert out.indices.shape == (2, *spatial) and out.indices.dtype == torch.long
    torch.testing.assert_close(out.quantized, codebook[out.indices].movedim(-1, 1), atol=1e-5, rtol=0)
    if not training:
        codes = quantizer.lookup(out.indices).movedim(-1, 1)  # (B, D, *spatial)
        torch.testing.assert_close(out.quantized, codes, atol=1e-5, rtol=0)
    # The chosen code is the nearest one (after normalising both sides in l2 mode).
    flat = z.movedim(1, -1).reshape(-1, 4)
    if options.get("l2_normalize"):
        flat = F.normalize(flat, dim=-1)
    expected = torch.cdist(flat, codebook).argmin(dim=1)
    assert torch.equal(out.indices.flatten(), expected)


@pytest.mark.parametrize("beta", [0.25, 0.7])
def test_commitment_beta_weighs_the_encoder_term_only(beta):
    """loss = ||sg[z_e] - e||^2 + beta * ||z_e - sg[e]||^2 (van den Oord et al. 2017), gradients by hand."""
    quantizer = make_quantizer(CODEBOOK, commitment_beta=beta)
    z = as_latents(OUTPUTS).requires_grad_(True)
    out = quantizer(z)
    assert torch.equal(out.indices.flatten(), NEAREST)

    # Mean squared distance over N * D = 8 entries: (0.05 + 0.10 + 0.08 + 0.50) / 8.
    torch.testing.assert_close(out.codebook_loss, torch.tensor(0.09125))
    torch.testing.assert_close(out.commitment_loss, torch.tensor(0.09125))
    torch.testing.assert_close(out.loss, torch.tensor((1 + beta) * 0.09125))

    out.loss.backward()
    # Codebook: d/de_k of mean((e - sg[z])^2) = 2/8 * sum over its outputs (e_k - z_n); weight 1, no beta.
    codebook_grad = torch.tensor([[-0.05, 0.025], [-0.025, -0.025], [-0.125, 0.125]])
    torch.testing.assert_close(quantizer.embedding.weight.grad, codebook_grad)
    # Encoder output: beta * 2/8 * (z_n - e_k(n)).
    encoder_grad = beta * torch.tensor([[0.05, -0.025], [-0.025, 0.075], [0.05, -0.05], [0.125, -0.125]])
    torch.testing.assert_close(as_rows(z.grad), encoder_grad)


def test_straight_through_passes_the_decoder_gradient_unchanged():
    quantizer = make_quantizer(CODEBOOK)
    z = as_latents(OUTPUTS).requires_grad_(True)
    decoder_grad = torch.randn(1, 2, 4)
    (quantizer(z).quantized * decoder_grad).sum().backward()
    assert torch.equal(z.grad, decoder_grad)
    # The reconstruction path does not train the codebook; only the codebook term does.
    assert quantizer.embedding.weight.grad is None or not quantizer.embedding.weight.grad.any()


def test_ema_codebook_gets_no_gradient_and_loss_is_commitment_only():
    quantizer = make_quantizer(CODEBOOK, ema_decay=0.99, commitment_beta=0.25)
    assert not quantizer.embedding.weight.requires_grad
    z = as_latents(OUTPUTS).requires_grad_(True)
    out = quantizer(z)
    assert float(out.codebook_loss) == 0.0
    torch.testing.assert_close(out.loss, 0.25 * out.commitment_loss)
    (out.loss + out.quantized.sum()).backward()
    assert quantizer.embedding.weight.grad is None
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_ema_update_matches_hand_computation_with_laplace_smoothing():
    decay, eps = 0.5, 0.1
    quantizer = make_quantizer(CODEBOOK, ema_decay=decay, ema_epsilon=eps).train()
    quantizer(as_latents(OUTPUTS))
    # Counts n = [1, 2, 1]; N' = 0.5 * 1 + 0.5 * n = [1, 1.5, 1], total 3.5.
    torch.testing.assert_close(quantizer.ema_cluster_size, torch.tensor([1.0, 1.5, 1.0]))
    # m' = 0.5 * e + 0.5 * (sum of assigned outputs).
    embed_sum = torch.tensor([[0.1, -0.05], [1.55, 1.55], [-1.75, 0.75]])
    torch.testing.assert_close(quantizer.ema_embed_sum, embed_sum)
    # Laplace smoothing: (N' + eps) / (total + K * eps) * total.
    smoothed = torch.tensor([1.1, 1.6, 1.1]) * 3.5 / 3.8
    torch.testing.assert_close(quantizer.embedding.weight, embed_sum / smoothed[:, None])


def test_ema_moves_used_codes_toward_their_outputs_and_leaves_unused_codes():
    """From a fresh quantizer (its own EMA initial state), one update must be a small, sane step."""
    quantizer = VectorQuantizer(16, 4, ema_decay=0.9, l2_normalize=False).train()
    before = quantizer.embedding.weight.detach().clone()
    z = before[:4].repeat(8, 1) + 0.01 * torch.randn(32, 4)  # outputs around codes 0..3
    out = quantizer(as_latents(z))
    after = quantizer.embedding.weight.detach()
    used = torch.bincount(out.indices.flatten(), minlength=16) > 0
    assert used.sum() >= 2 and (~used).sum() >= 8
    torch.testing.assert_close(after[~used], before[~used], rtol=1e-4, atol=1e-7)
    for code in used.nonzero().flatten().tolist():
        target = z[out.indices.flatten() == code].mean(0)
        assert (after[code] - target).norm() < (before[code] - target).norm()


def test_l2_normalized_codes_have_unit_norm_and_match_by_angle():
    # Raw codes of very different norms: Euclidean nearest would be code 1, cosine nearest is code 0.
    quantizer = make_quantizer(torch.tensor([[10.0, 0.0], [0.1, 0.1]]), l2_normalize=True)
    torch.testing.assert_close(quantizer.codebook.norm(dim=-1), torch.ones(2))
    out = quantizer(as_latents(torch.tensor([[1.0, 0.3]])))
    assert out.indices.flatten().tolist() == [0]
    torch.testing.assert_close(out.quantized.norm(dim=1), torch.ones(1, 1))
    torch.testing.assert_close(as_rows(out.quantized), torch.tensor([[1.0, 0.0]]))


def test_rotation_trick_forward_is_the_code_and_gradient_is_the_rotation():
    """e = [2, 0] -> q = [0, 1]: R is the +90 degree rotation, scale |q|/|e| = 1/2 (Fifty et al. 2024)."""
    quantizer = make_quantizer(torch.tensor([[0.0, 1.0], [-3.0, -3.0]]), rotation_trick=True)
    z = as_latents(torch.tensor([[2.0, 0.0]])).requires_grad_(True)
    out = quantizer(z)
    torch.testing.assert_close(as_rows(out.quantized), torch.tensor([[0.0, 1.0]]))
    (out.quantized * as_latents(torch.tensor([[0.3, -0.4]]))).sum().backward()
    # grad = (|q|/|e|) R^T g = 0.5 * [[0, 1], [-1, 0]] @ [0.3, -0.4]; straight-through would give g itself.
    torch.testing.assert_close(as_rows(z.grad), torch.tensor([[-0.2, -0.15]]))


def test_rotate_to_random_vectors_keeps_value_and_scales_gradient_norm():
    source = torch.randn(64, 8, requires_grad=True)
    target = torch.randn(64, 8)
    out = rotate_to(source, target)
    torch.testing.assert_close(out, target, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn(64, 8)
    (out * grad_out).sum().backward()
    assert torch.isfinite(source.grad).all()
    assert not torch.allclose(source.grad, grad_out)
    # A rotation keeps norms, so the gradient's norm is the scale |q|/|e| times the incoming one.
    scale = target.norm(dim=-1) / source.detach().norm(dim=-1)
    torch.testing.assert_close(source.grad.norm(dim=-1), scale * grad_out.norm(dim=-1), atol=1e-4, rtol=1e-4)


def test_dead_codes_restart_onto_encoder_outputs_after_a_full_window():
    codebook = torch.cat([torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.full((6, 2), 100.0)])
    quantizer = make_quantizer(codebook, dead_code_threshold=1.0, usage_window=2).train()
    batches = [torch.tensor([[1.0, 0.1], [0.1, 1.0], [0.9, -0.1], [-0.1, 0.8]]) + 0.01 * i for i in range(3)]

    quantizer(as_latents(batches[0]))
    assert torch.equal(quantizer.embedding.weight.detach(), codebook), "no restart before the window is full"
    quantizer(as_latents(batches[1]))
    weight = quantizer.embedding.weight.detach()
    assert torch.equal(weight[:2], codebook[:2]), "used codes stay"
    for code in weight[2:]:
        assert (batches[1] == code).all(dim=1).any(), f"restarted code {code} is not an encoder output"
    assert quantizer.restarted_at[2:].tolist() == [2] * 6

    # Restarted codes get a full window before they can be judged dead again.
    restarted = weight.clone()
    quantizer(as_latents(batches[2]))
    assert torch.equal(quantizer.embedding.weight.detach()[2:], restarted[2:])


def test_eval_mode_neither_tracks_usage_nor_restarts():
    quantizer = VectorQuantizer(8, 2, dead_code_threshold=1.0, usage_window=1).eval()
    before = quantizer.embedding.weight.detach().clone()
    quantizer(torch.randn(1, 2, 10))
    assert int(quantizer.usage_cursor) == 0
    assert torch.equal(quantizer.embedding.weight.detach(), before)


def test_kmeans_init_puts_codes_on_the_data():
    points = torch.tensor([[3.0, 0.0], [0.0, 3.0], [-3.0, 0.0], [0.0, -3.0], [2.0, 2.0], [-2.0, -2.0]])
    quantizer = VectorQuantizer(6, 2, kmeans_init=True)
    assert not bool(quantizer.initialized)
    quantizer.eval()(as_latents(points))
    assert not bool(quantizer.initialized), "eval mode must not initialise"
    out = quantizer.train()(as_latents(points))
    assert bool(quantizer.initialized)
    # As many distinct points as codes: every point becomes a code, and quantizes to itself.
    assert sorted(map(tuple, quantizer.codebook.detach().tolist())) == sorted(map(tuple, points.tolist()))
    torch.testing.assert_close(as_rows(out.quantized), points)
    # Initialised once: a later batch does not re-run k-means.
    quantizer(as_latents(torch.randn(6, 2)))
    assert sorted(map(tuple, quantizer.codebook.detach().tolist())) == sorted(map(tuple, points.tolist()))


@pytest.mark.parametrize("l2", [False, True])
def test_kmeans_returns_lloyd_fixed_points(l2):
    centers = torch.tensor([[5.0, 5.0], [-5.0, 5.0], [5.0, -5.0], [-5.0, -5.0]])
    samples = centers.repeat_interleave(50, dim=0) + 0.3 * torch.randn(200, 2)
    if l2:
        samples = F.normalize(samples, dim=-1)
    centroids = kmeans(samples, 4, num_iters=10, l2=l2)
    assign = torch.cdist(samples, centroids).argmin(dim=1)
    for code in assign.unique().tolist():
        mean = samples[assign == code].mean(0)
        torch.testing.assert_close(centroids[code], F.normalize(mean, dim=0) if l2 else mean, atol=1e-5, rtol=1e-5)
    if l2:
        torch.testing.assert_close(centroids.norm(dim=-1), torch.ones(4))


def test_distances_are_fp32_under_bf16_autocast():
    codebook = torch.randn(64, 8)
    z = torch.randn(4096, 8)
    quantizer = make_quantizer(codebook)
    reference = quantizer(as_latents(z)).indices
    assert torch.equal(reference.flatten(), torch.cdist(z, codebook).argmin(dim=1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        naive = (z.pow(2).sum(1, keepdim=True) - 2 * z @ codebook.t() + codebook.pow(2).sum(1)).argmin(1)
        under_autocast = quantizer(as_latents(z))
        from_bf16_input = quantizer(as_latents(z).bfloat16())
    assert not torch.equal(naive, reference.flatten()), "this input must be sensitive to bf16 rounding"
    assert torch.equal(under_autocast.indices, reference)
    assert from_bf16_input.quantized.dtype == torch.bfloat16
    expected = quantizer(as_latents(z.bfloat16().float())).indices
    assert torch.equal(from_bf16_input.indices, expected)


def test_usage_and_perplexity_are_over_the_window_not_the_batch():
    codebook = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, 0.0], [0.0, -10.0]])
    quantizer = make_quantizer(codebook, usage_window=3).train()
    batches = [[0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 2, 2], [2, 2, 2, 3]]  # the code each output sits on

    assert quantizer.usage_stats() == {"codebook_usage": 0.0, "perplexity": 0.0}
    for i, codes in enumerate(batches):
        out = quantizer(as_latents(codebook[codes] + 0.1))
        assert out.indices.flatten().tolist() == codes
        if i == 1:  # window half full: codes 0 and 1, four each
            stats = quantizer.usage_stats()
            assert stats["codebook_usage"] == 50.0
            assert stats["perplexity"] == pytest.approx(2.0)

    # The window holds the last 3 batches: counts [0, 6, 5, 1] of 12.
    stats = quantizer.usage_stats()
    assert stats["codebook_usage"] == 75.0
    entropy = -(6 / 12 * math.log(6 / 12) + 5 / 12 * math.log(5 / 12) + 1 / 12 * math.log(1 / 12))
    assert stats["perplexity"] == pytest.approx(math.exp(entropy), rel=1e-5)
    # The last batch alone ([2, 2, 2, 3]) would say otherwise.
    batch_entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert float(out.batch_perplexity) == pytest.approx(math.exp(batch_entropy), rel=1e-5)

    quantizer.eval()(as_latents(codebook[[0, 0, 0, 0]]))
    assert quantizer.usage_stats() == stats, "eval batches are not counted"


def test_usage_from_counts_hand_case():
    stats = usage_from_counts(torch.tensor([2.0, 2.0, 0.0, 0.0]))
    assert stats["codebook_usage"] == 50.0
    assert stats["perplexity"] == pytest.approx(2.0)
    stats = usage_from_counts(torch.tensor([1.0, 1.0, 1.0, 1.0]))
    assert stats == {"codebook_usage": 100.0, "perplexity": pytest.approx(4.0)}
