"""The hand-written decode step computes what the transformers forward computes, and the sampler falls back to
that forward for any prior the step does not support."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from stage2_prior import sampling
from stage2_prior.llama_decoder import LlamaDecoder, unsupported_reason
from stage2_prior.modeling import TokenLayout, build_prior
from stage2_prior.sampling import draw_one, sample_codes

LAYOUT = TokenLayout(codebook_size=48, num_classes=4, num_codes=12)


def random_prior(**overrides) -> LlamaForCausalLM:
    """A `tiny` prior with random RMSNorm gains too (fresh ones are all 1, which would hide a folding mistake)."""
    torch.manual_seed(0)
    prior = build_prior("tiny", LAYOUT, **overrides).eval()
    with torch.no_grad():
        for name, parameter in prior.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    return prior


def gqa_prior() -> LlamaForCausalLM:
    """A tiny prior whose 4 query heads share 2 key/value heads."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=LAYOUT.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=96, max_position_embeddings=LAYOUT.num_codes + 1)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("make_prior", [random_prior, gqa_prior], ids=["tiny", "gqa"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("guided", [False, True], ids=["plain", "cfg"])
def test_decode_step_matches_transformers_forward(make_prior, batch, guided):
    prior = make_prior()
    condition = LAYOUT.condition_tokens(torch.arange(batch) % LAYOUT.num_classes, batch)
    if guided:  # the sampler's CFG rows: conditional ones, then as many null-class rows
        condition = torch.cat([condition, torch.full_like(condition, LAYOUT.null_token)])
    decoder = LlamaDecoder(prior, len(condition), LAYOUT.num_codes + 1, LAYOUT.codebook_size)
    generator = torch.Generator().manual_seed(1)
    sequence, cache, tokens = condition.unsqueeze(1), None, condition
    with torch.no_grad():
        for position in range(LAYOUT.num_codes):
            outputs = prior(input_ids=tokens.unsqueeze(1), use_cache=True, **{sampling.cache_kwarg(prior): cache})
            cache = sampling.output_cache(outputs)
            expected = outputs.logits[:, -1, : LAYOUT.codebook_size]  # (R, K)
            logits = decoder.step(tokens, position)
            assert logits.shape == expected.shape
            torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
            tokens = torch.randint(0, LAYOUT.codebook_size, (len(condition),), generator=generator)
            sequence = torch.cat([sequence, tokens.unsqueeze(1)], dim=1)
        # The last step against a full forward without a cache, too.
        full = prior(input_ids=sequence[:, :-1]).logits[:, -1, : LAYOUT.codebook_size]
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)


def test_decode_step_runs_a_bfloat16_prior_within_its_rounding():
    prior = random_prior().to(torch.bfloat16)
    tokens = LAYOUT.condition_tokens(torch.tensor([0, 1, -1]), 3)
    decoder = LlamaDecoder(prior, 3, LAYOUT.num_codes + 1, LAYOUT.codebook_size)
    with torch.no_grad():
        expected = prior(input_ids=tokens.unsqueeze(1)).logits[:, -1, : LAYOUT.codebook_size]
    logits = decoder.step(tokens, 0)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), expected.float(), rtol=0, atol=2e-2)  # bf16 keeps ~3 digits


@pytest.mark.parametrize("kwargs", [dict(), dict(guidance_scale=3.0), dict(temperature=0), dict(top_k=5),
                                    dict(top_p=0.8, temperature=1.5)], ids=["t1", "cfg", "greedy", "topk", "topp"])
def test_fast_and_transformers_paths_draw_the_same_codes(kwargs, monkeypatch):
    prior, labels = random_prior(), torch.tensor([0, 1, 2, 3, -1])
    made, real = [], sampling.fast_decoder

    def spy(*args):
        made.append(real(*args))
        return made[-1]

    monkeypatch.setattr(sampling, "fast_decoder", spy)
    kwargs["precision"] = "fp32"  # "auto" may round the step's matmuls to bf16 (tested below)
    fast = sample_codes(prior, LAYOUT, 5, labels, generator=torch.Generator().manual_seed(0), **kwargs)
    assert len(made) == 1 and isinstance(made[0], LlamaDecoder)  # a plain Llama prior gets the fast step
    assert made[0].matmul_dtype == torch.float32
    monkeypatch.setattr(sampling, "fast_decoder", lambda *args: None)
    generic = sample_codes(prior, LAYOUT, 5, labels, generator=torch.Generator().manual_seed(0), **kwargs)
    assert fast.shape == (5, LAYOUT.num_codes)
    assert torch.equal(fast, generic)


def test_bf16_matmul_weights_keep_the_next_code_distribution():
    """The mixed step (bf16 matmul weights, float32 elsewhere) against the float32 step on the same tokens."""
    prior = random_prior()
    condition = LAYOUT.condition_tokens(torch.tensor([0, 1, 2, 3, -1]), 5)
    exact = LlamaDecoder(prior, 5, LAYOUT.num_codes + 1, LAYOUT.codebook_size)
    mixed = LlamaDecoder(prior, 5, LAYOUT.num_codes + 1, LAYOUT.codebook_size, matmul_dtype=torch.bfloat16)
    assert mixed.layers[0]["qkv_t"].dtype == mixed.head_t.dtype == torch.bfloat16
    assert mixed.keys.dtype == torch.float32  # the cache and attention stay float32
    generator, tokens, divergences = torch.Generator().manual_seed(2), condition, []
    for position in range(LAYOUT.num_codes):
        expected, logits = exact.step(tokens, position), mixed.step(tokens, position)
        assert logits.dtype == torch.float32
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-2)  # bf16 keeps ~3 digits
        assert not torch.equal(logits, expected)  # the weights really were rounded
        divergences.append(torch.nn.functional.kl_div(logits.log_softmax(-1), expected.log_softmax(-1),
                                                      log_target=True, reduction="batchmean"))
        tokens = torch.randint(0, LAYOUT.codebook_size, (5,), generator=generator)
    assert max(divergences) < 1e-5  # nats per code (measured: ~3e-7)


@pytest.mark.parametrize("fast", [True, False], ids=["bf16-fast", "bf16-slow"])
def test_auto_precision_uses_bf16_matmuls_only_where_they_pay(fast, monkeypatch):
    monkeypatch.setattr(sampling, "bf16_is_fast", lambda device: fast)
    prior = random_prior()
    minimum = sampling.BF16_DECODE_MIN_ROWS
    assert sampling.decode_matmul_dtype(prior, minimum - 1) is None  # few rows: per-op overhead, not bytes
    assert sampling.decode_matmul_dtype(prior, minimum) == (torch.bfloat16 if fast else None)
    assert sampling.decode_matmul_dtype(prior, minimum, "fp32") is None
    assert sampling.decode_matmul_dtype(random_prior().to(torch.bfloat16), minimum) is None  # a bf16 prior: itself
    with pytest.raises(ValueError, match="precision 'fp16' is unknown"):
        sampling.decode_matmul_dtype(prior, minimum, "fp16")
    made, real = [], sampling.fast_decoder

    def spy(*args):
        made.append(real(*args))
        return made[-1]

    monkeypatch.setattr(sampling, "fast_decoder", spy)
    codes = sample_codes(random_prior(), LAYOUT, 2, torch.tensor([0, 1]), guidance_scale=2.0,
                         generator=torch.Generator().manual_seed(0))  # 2 samples, 4 rows with guidance
    assert codes.shape == (2, LAYOUT.num_codes) and codes.max() < LAYOUT.codebook_size
    assert made[0].matmul_dtype == (torch.bfloat16 if fast else torch.float32)
    described = sampling.describe_precision(prior, minimum)
    assert described.startswith("bf16 matmul") if fast else described == "float32 throughout"
    assert sampling.describe_precision(prior, minimum, "fp32") == "float32 throughout"
    unsupported = build_prior("tiny", LAYOUT, hidden_act="gelu")  # runs the transformers forward, in float32
    assert sampling.describe_precision(unsupported, minimum) == "float32 throughout"


class _PriorSubclass(LlamaForCausalLM):
    """A subclass could change the forward, so it is not taken for a plain Llama prior."""


def _unsupported_priors():
    yield "attention bias", lambda: build_prior("tiny", LAYOUT, attention_bias=True)
    yield "gelu", lambda: build_prior("tiny", LAYOUT, hidden_act="gelu")
    yield "linear rope", lambda: build_prior("tiny", LAYOUT, rope_parameters=dict(rope_type="linear", factor=2.0,
                                                                               rope_theta=10000.0))
    yield "subclass", lambda: _PriorSubclass(build_prior("tiny", LAYOUT).config)

    def hooked():
        prior = build_prior("tiny", LAYOUT)
        prior.model.layers[0].mlp.register_forward_hook(lambda *args: None)
        return prior

    yield "hook", hooked


@pytest.mark.parametrize("make_prior", [make for _, make in _unsupported_priors()],
                         ids=[name for name, _ in _unsupported_priors()])
def test_unsupported_priors_fall_back_to_the_transformers_forward(make_prior, monkeypatch):
    prior = make_prior().eval()
    assert unsupported_reason(prior) is not None
    assert sampling.fast_decoder(prior, 2, LAYOUT.num_codes + 1, LAYOUT.codebook_size) is None
    with pytest.raises(ValueError, match="LlamaDecoder cannot run this prior"):
        LlamaDecoder(prior, 2, LAYOUT.num_codes + 1, LAYOUT.codebook_size)
    codes = sample_codes(prior, LAYOUT, 2, torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0))
    assert codes.shape == (2, LAYOUT.num_codes) and codes.max() < LAYOUT.codebook_size


def test_draw_one_is_torch_multinomial():
    """Same generator, same draws, same generator state afterwards: seeds keep their codes."""
    ours, torchs = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for rows in (1, 16, 16, 7):
        probs = (torch.randn(rows, 300) * 3).softmax(dim=-1)
        expected = torch.multinomial(probs, 1, generator=torchs).squeeze(1)
        assert torch.equal(draw_one(probs, ours), expected)
    assert torch.equal(ours.get_state(), torchs.get_state())
