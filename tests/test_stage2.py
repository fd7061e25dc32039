"""Stage 2: token layout, sampling invariants (KV cache, CFG, filters, seeds), label dropout, code cache, training."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import stage2_prior.train as prior_train
from pipelines.pipeline import VQPipeline
from stage1_tokenizer.modeling import VQModel
from stage1_tokenizer.train_utils import weight_ema
from stage2_prior.modeling import TokenLayout, build_prior, training_attention
from stage2_prior import sampling
from stage2_prior.sampling import filter_logits, sample_codes
from stage2_prior.tokenize_dataset import build_code_cache, codes_tensor

LABELS = torch.tensor([0, 1, 2, 3])


@pytest.fixture(scope="module")
def pipe(pipeline_dir) -> VQPipeline:
    """The session's trained class-conditional pipeline, loaded once for this module."""
    return VQPipeline.from_pretrained(pipeline_dir)


def draw(pipe: VQPipeline, labels=LABELS, seed: int = 0, **kwargs) -> torch.Tensor:
    """sample_codes on the trained prior with a fresh seeded generator, in float32 throughout (these tests compare
    code paths draw for draw; "auto" may run the decode step's matmuls in bf16: tests/test_llama_decoder.py)."""
    kwargs.setdefault("precision", "fp32")
    return sample_codes(pipe.prior, pipe.layout, len(labels), labels, generator=torch.Generator().manual_seed(seed),
                        **kwargs)


# --------------------------------------------------------------------------------------- token layout
def test_token_layout_ids():
    layout = TokenLayout(codebook_size=64, num_classes=10, num_codes=16)
    assert (layout.class_offset, layout.null_token, layout.bos_token, layout.vocab_size) == (64, 74, 75, 76)
    assert layout.conditional
    first = layout.condition_tokens(torch.tensor([0, 3, 9, -1]), 4)
    assert first.tolist() == [64, 67, 73, 74]
    assert TokenLayout.from_dict(json.loads(json.dumps(layout.to_dict()))) == layout

    unconditional = TokenLayout(codebook_size=64, num_classes=0, num_codes=16)
    assert (unconditional.null_token, unconditional.bos_token, unconditional.vocab_size) == (64, 65, 66)
    assert not unconditional.conditional
    assert unconditional.condition_tokens(None, 3).tolist() == [65, 65, 65]


def test_training_attention_computes_the_same_loss_and_gradients():
    """The CPU training default ("eager" attention) is the same function as SDPA: same loss and gradients."""
    layout = TokenLayout(codebook_size=16, num_classes=3, num_codes=10)
    sequence = torch.randint(0, 16, (4, 11))
    results = []
    for attention in ("eager", "sdpa"):
        torch.manual_seed(0)
        prior = build_prior("tiny", layout, attn_implementation=attention)
        assert prior.config._attn_implementation == attention
        loss = prior_train.code_loss(prior, sequence)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in prior.parameters()]))
    (eager_loss, eager_grads), (sdpa_loss, sdpa_grads) = results
    assert torch.allclose(eager_loss, sdpa_loss, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(eager_grads, sdpa_grads))
    assert training_attention(torch.device("cpu")) == "eager"


def test_token_layout_from_dict_rejects_inconsistent_ids():
    data = TokenLayout(64, 10, 16).to_dict()
    data["vocab_size"] = 80
    with pytest.raises(ValueError, match="vocab_size"):
        TokenLayout.from_dict(data)


def test_build_prior_fits_layout():
    layout = TokenLayout(codebook_size=32, num_classes=4, num_codes=9)
    prior = build_prior("tiny", layout)
    assert prior.config.vocab_size == layout.vocab_size == 38
    assert prior.config.max_position_embeddings == layout.num_codes + 1
    assert prior.config.bos_token_id == layout.bos_token
    with pytest.raises(ValueError, match="preset"):
        build_prior("enormous", layout)


def test_build_prior_takes_shape_overrides_and_refuses_shapes_rotary_cannot_use():
    layout = TokenLayout(codebook_size=32, num_classes=4, num_codes=9)
    prior = build_prior("tiny", layout, num_hidden_layers=3, hidden_size=96, num_attention_heads=6)
    assert (len(prior.model.layers), prior.config.hidden_size, prior.config.num_key_value_heads) == (3, 96, 6)
    with pytest.raises(ValueError, match="heads of an even size"):
        build_prior("tiny", layout, hidden_size=96, num_attention_heads=5)  # 96 / 5 is not whole
    with pytest.raises(ValueError, match="heads of an even size"):
        build_prior("tiny", layout, hidden_size=36, num_attention_heads=4)  # heads of 9 channels


@pytest.mark.parametrize(("config", "message"), [
    ('{"hidden_size": 64, "rope_theta": 10}', "['rope_theta'] are not prior shape fields"),
    ('{"num_hidden_layers": 0}', "num_hidden_layers must be a positive integer, got 0"),
    ('{"num_hidden_layers": 2.5}', "num_hidden_layers must be a positive integer, got 2.5"),
    ("list.json", "JSON object of prior shape fields, got list"),
    ("no-such-file.json", "neither a JSON object nor an existing file"),
])
def test_prior_config_is_checked_before_anything_runs(tmp_path, capsys, monkeypatch, config, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "list.json").write_text("[2]")
    with pytest.raises(SystemExit) as stop:
        prior_train.cli(["--tokenizer", str(tmp_path), "--max-steps", "2", "--output-dir", str(tmp_path / "out"),
                         "--config", config])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and message in error, error
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("temperature", [0, 1.0], ids=["greedy", "sampled"])
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0], ids=["no-cfg", "cfg"])
@pytest.mark.parametrize("static_cache", [False, True], ids=["dynamic-cache", "static-cache"])
def test_kv_cache_matches_full_recompute(pipe, temperature, guidance_scale, static_cache, monkeypatch):
    made, real = [], sampling.make_static_cache

    def spy(prior, rows, max_len):
        made.append((rows, max_len))
        return real(prior, rows, max_len)

    monkeypatch.setattr(sampling, "make_static_cache", spy)
    kwargs = dict(temperature=temperature, guidance_scale=guidance_scale, top_k=40 if temperature else None)
    cached = draw(pipe, use_cache=True, static_cache=static_cache, **kwargs)
    rows = 8 if guidance_scale != 1.0 else 4
    assert made == ([(rows, pipe.layout.num_codes + 1)] if static_cache else [])
    uncached = draw(pipe, use_cache=False, **kwargs)
    assert cached.shape == (4, pipe.layout.num_codes)
    assert torch.equal(cached, uncached)


def test_generate_with_a_static_cache_draws_the_same_codes(pipe):
    kwargs = dict(num_samples=4, class_labels=LABELS.tolist(), guidance_scale=2.0, seed=0, output_type="pt",
                  precision="fp32")
    default, static = pipe.generate(**kwargs), pipe.generate(static_cache=True, **kwargs)
    assert torch.equal(default.codes, static.codes)


def test_greedy_matches_reference_decoder(pipe):
    """Greedy sampling equals a plain loop: full forward, argmax over code tokens, append."""
    sequence = pipe.layout.condition_tokens(LABELS, 4).unsqueeze(1)
    for _ in range(pipe.layout.num_codes):
        with torch.no_grad():
            logits = pipe.prior(input_ids=sequence).logits[:, -1, : pipe.layout.codebook_size]
        sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(draw(pipe, temperature=0), sequence[:, 1:])


def test_guidance_scale_one_is_plain_conditional_sampling(pipe):
    plain = draw(pipe)
    assert torch.equal(draw(pipe, guidance_scale=1.0), plain)
    out = pipe.generate(num_samples=4, class_labels=LABELS.tolist(), guidance_scale=1.0, seed=0, output_type="pt",
                        precision="fp32")
    assert torch.equal(out.codes.flatten(1), plain)


def test_guidance_scale_zero_is_unconditional_sampling(pipe):
    """logits = u + s * (c - u) with s = 0 is the null-class row alone."""
    null_labels = torch.full((4,), -1)
    assert torch.equal(draw(pipe, guidance_scale=0.0), draw(pipe, labels=null_labels))


def test_guidance_changes_samples(pipe):
    plain, guided = draw(pipe), draw(pipe, guidance_scale=3.0)
    assert not torch.equal(plain, guided)


class _StubOutput(dict):
    """Dict with attribute access, like a transformers ModelOutput."""

    __getattr__ = dict.__getitem__


class ClassEchoPrior(torch.nn.Module):
    """Stand-in prior: class c adds `strength` nats to code c; the null class is uniform; non-code tokens win big."""

    def __init__(self, layout: TokenLayout, strength: float):
        super().__init__()
        self.layout, self.strength = layout, strength
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # sample_codes reads the device from the parameters

    def forward(self, input_ids, use_cache=False, cache=None, past_key_values=None):
        state = cache if cache is not None else past_key_values
        first = input_ids[:, 0] if state is None else state  # (B,) condition token, kept as the "cache"
        logits = torch.zeros(*input_ids.shape, self.layout.vocab_size)  # (B, T, V)
        logits[..., self.layout.codebook_size :] = 100.0
        rows = ((first >= self.layout.class_offset) & (first < self.layout.null_token)).nonzero().squeeze(1)
        logits[rows, :, first[rows] - self.layout.class_offset] += self.strength
        kept = first if use_cache else None
        return _StubOutput(logits=logits, cache=kept, past_key_values=kept)


@pytest.mark.parametrize("use_cache", [True, False])
def test_guidance_direction_and_strength(use_cache):
    """A 1-nat class preference gives ~4% hits; scale 8 sharpens it to ~98%; scale 0 removes it."""
    layout = TokenLayout(codebook_size=64, num_classes=4, num_codes=64)
    prior = ClassEchoPrior(layout, strength=1.0)
    labels = torch.tensor([0, 1, 2, 3] * 4)

    def hit_rate(scale: float) -> float:
        codes = sample_codes(prior, layout, len(labels), labels, guidance_scale=scale,
                             generator=torch.Generator().manual_seed(0), use_cache=use_cache)
        assert codes.min() >= 0 and codes.max() < layout.codebook_size
        return (codes == labels.unsqueeze(1)).float().mean().item()

    assert hit_rate(8.0) > 0.9
    assert hit_rate(1.0) < 0.15
    assert hit_rate(0.0) < 0.05


def _non_code_prior(prior, layout: TokenLayout):
    """A copy of `prior` whose lm_head puts +100 on every class / null / bos token."""
    rigged = copy.deepcopy(prior)
    head = torch.nn.Linear(rigged.lm_head.in_features, layout.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(rigged.lm_head.weight)
        head.bias.zero_()
        head.bias[layout.codebook_size :] = 100.0
    rigged.lm_head = head
    return rigged


@pytest.mark.parametrize("kwargs", [dict(temperature=0), dict(temperature=1.0), dict(temperature=2.0, top_k=5),
                                    dict(temperature=1.0, top_p=0.9), dict(temperature=1.0, guidance_scale=3.0)],
                         ids=["greedy", "t1", "topk", "topp", "cfg"])
def test_only_code_tokens_are_sampled(pipe, kwargs):
    layout = pipe.layout
    rigged = _non_code_prior(pipe.prior, layout)
    with torch.no_grad():
        first_logits = rigged(input_ids=layout.condition_tokens(LABELS, 4).unsqueeze(1)).logits[:, -1]
    assert (first_logits.argmax(-1) >= layout.codebook_size).all()  # unrestricted, a non-code token would win
    codes = sample_codes(rigged, layout, 4, LABELS, generator=torch.Generator().manual_seed(0), **kwargs)
    assert codes.min() >= 0 and codes.max() < layout.codebook_size


def test_top_k_one_equals_greedy(pipe):
    assert torch.equal(draw(pipe, temperature=1.0, top_k=1, seed=5), draw(pipe, temperature=0))


def test_filter_logits_top_p_keeps_the_nucleus():
    probs = torch.tensor([[0.10, 0.50, 0.15, 0.25], [0.25, 0.15, 0.10, 0.50]])
    logits = probs.log()
    kept = lambda top_p: torch.isfinite(filter_logits(logits, None, top_p))  # noqa: E731
    # Smallest set of most likely tokens whose mass reaches top_p: 0.5 -> {.5}; 0.6 -> {.5,.25}; 0.8 -> +{.15}.
    assert kept(0.3).tolist() == [[False, True, False, False], [False, False, False, True]]
    assert kept(0.6).tolist() == [[False, True, False, True], [True, False, False, True]]
    assert kept(0.8).tolist() == [[False, True, True, True], [True, True, False, True]]
    assert kept(1.0).all()
    finite = filter_logits(logits, None, 0.6)
    assert torch.equal(finite[torch.isfinite(finite)], logits[kept(0.6)])  # kept logits are untouched


def test_filter_logits_top_k():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.5, 0.3]])
    assert torch.isfinite(filter_logits(logits, 2, None)).tolist() == [[False, True, False, True, False]]
    assert torch.isfinite(filter_logits(logits, 10, None)).all()
    both = filter_logits(logits, 3, 0.01)  # top-k first, then the nucleus of what is left
    assert torch.isfinite(both).tolist() == [[False, True, False, False, False]]


def test_seeded_sampling_is_reproducible(pipe):
    first, again, other = draw(pipe, seed=7), draw(pipe, seed=7), draw(pipe, seed=8)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


# --------------------------------------------------------------------------------------- training pieces
def test_label_dropout_rate_and_determinism():
    layout = TokenLayout(codebook_size=16, num_classes=10, num_codes=4)
    codes = torch.randint(0, 16, (20000, 4))
    labels = torch.full((20000,), 3)

    def batch(dropout: float, step: int, seed: int) -> torch.Tensor:
        return prior_train.sequence_batch(layout, codes, labels, dropout, step, seed, conditional=True)

    sequence = batch(0.1, step=5, seed=0)
    assert sequence.shape == (20000, 5)
    assert torch.equal(sequence[:, 1:], codes)
    first = sequence[:, 0]
    assert set(first.unique().tolist()) == {layout.class_offset + 3, layout.null_token}
    assert abs((first == layout.null_token).float().mean().item() - 0.1) < 0.01
    assert abs((batch(0.3, 5, 0)[:, 0] == layout.null_token).float().mean().item() - 0.3) < 0.015
    assert torch.equal(batch(0.1, 5, 0), sequence)  # deterministic in (seed, step)
    assert not torch.equal(batch(0.1, 6, 0), sequence)
    assert not torch.equal(batch(0.1, 5, 1), sequence)
    assert (batch(0.0, 5, 0)[:, 0] == layout.class_offset + 3).all()
    unconditional = TokenLayout(codebook_size=16, num_classes=0, num_codes=4)
    plain = prior_train.sequence_batch(unconditional, codes, labels, 0.1, 5, 0, conditional=False)
    assert (plain[:, 0] == unconditional.bos_token).all()


def test_code_cache_hit_and_miss(pipeline_tokenizer_dir, tmp_path, monkeypatch):
    tokenizer = VQModel.from_pretrained(pipeline_tokenizer_dir).eval()
    first, class_names, hit = build_code_cache(tokenizer, "digits", "eval", cache_dir=tmp_path)
    assert not hit
    assert class_names == [str(i) for i in range(10)]
    codes, labels, lengths = codes_tensor(first)
    assert codes.shape == (len(first), 64) and labels.shape == (len(first),)
    assert lengths is None  # images: every code counts
    assert codes.min() >= 0 and codes.max() < tokenizer.config.codebook_size
    assert set(labels.tolist()) == set(range(10))

    def no_encode(*args, **kwargs):
        raise AssertionError("the tokenizer encoded again although the cache should have been hit")

    monkeypatch.setattr(tokenizer, "encode", no_encode)
    second, _, hit = build_code_cache(tokenizer, "digits", "eval", cache_dir=tmp_path)
    assert hit
    assert torch.equal(codes_tensor(second)[0], codes)

    monkeypatch.undo()
    changed = VQModel.from_pretrained(pipeline_tokenizer_dir).eval()
    with torch.no_grad():
        changed.quantizer.embedding.weight.mul_(-1.0)
    calls = []
    original = changed.encode
    monkeypatch.setattr(changed, "encode", lambda x: calls.append(len(x)) or original(x))
    third, _, hit = build_code_cache(changed, "digits", "eval", cache_dir=tmp_path)
    assert not hit
    assert sum(calls) == len(third)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


def test_window_offsets_cut_unlabelled_text_at_evenly_spaced_starts(tmp_path):
    """--window-offsets N: the training windows of unlabelled text are cut N times, each cut starting
    seq_len / N bytes further in, and each window is encoded exactly as a window of its own."""
    from stage1_tokenizer.configuration import VQConfig
    from stage1_tokenizer.data import load_split, text_dataset

    data = tmp_path / ("a_long_folder_name_" * 4)  # its cache key once exceeded datasets' 64-character fingerprints
    data.mkdir()
    lines = [f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(40)]
    (data / "train.txt").write_text("\n".join(lines) + "\n")
    (data / "validation.txt").write_text("\n".join(lines[:4]) + "\n")
    stream = "\n".join(lines).encode()
    split = load_split(str(data), "train", "text")
    shifted = text_dataset(split, 16, offsets=[5])
    assert bytes(shifted[0][0].tolist()) == stream[5:21] and bytes(shifted[1][0].tolist()) == stream[21:37]
    assert len(shifted) == (len(stream) - 5) // 16

    torch.manual_seed(0)
    tokenizer = VQModel(VQConfig.from_preset("tiny", modality="text", seq_len=16)).eval()
    one, _, _ = build_code_cache(tokenizer, str(data), "train", cache_dir=tmp_path / "cache")
    four, _, hit = build_code_cache(tokenizer, str(data), "train", cache_dir=tmp_path / "cache", window_offsets=4)
    assert not hit  # its own cache entry, not the single cut's
    # seq_len 16 in 8 codes: 2 bytes per code, so cut k starts at 4k + k mod 2 bytes
    assert tokenizer.config.latent_shape == (8,)
    expected = [len(text_dataset(split, 16, offsets=[start])) for start in (0, 5, 8, 13)]
    assert len(four) == sum(expected) and len(one) == expected[0]
    codes_one, codes_four = codes_tensor(one)[0], codes_tensor(four)[0]
    assert torch.equal(codes_four[: len(one)], codes_one)  # the first cut is the plain one
    with torch.no_grad():
        third_cut = text_dataset(split, 16, offsets=[8])
        start = sum(expected[:2])
        assert torch.equal(codes_four[start], tokenizer.encode(third_cut[0][0][None]).flatten())
    with pytest.raises(ValueError, match="exceeds the tokenizer's seq_len"):
        build_code_cache(tokenizer, str(data), "train", cache_dir=tmp_path / "cache", window_offsets=17)


# --------------------------------------------------------------------------------------- end to end
def test_train_writes_a_complete_pipeline_folder(pipeline_dir):
    for name in ("pipeline_config.json", "README.md", "sample_grid.png", "metrics.jsonl",
                 "tokenizer/config.json", "tokenizer/model.safetensors", "prior/config.json",
                 "prior/model.safetensors"):
        assert (pipeline_dir / name).is_file(), name
    rows = [json.loads(line) for line in (pipeline_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6
    assert math.isfinite(rows[-1]["val_bits_per_code"]) and rows[-1]["val_bits_per_code"] > 0
    config = json.loads((pipeline_dir / "pipeline_config.json").read_text())
    assert config["class_conditional"] and config["metadata"]["prior_metrics"]["val_bits_per_code"] > 0

    pipe = VQPipeline.from_pretrained(pipeline_dir)
    out = pipe.generate(num_samples=4, class_labels=[0, 1, 2, 3], guidance_scale=2.0, seed=0)
    assert len(out.images) == 4 and all(image.size == (16, 16) for image in out.images)
    assert out.class_labels == [0, 1, 2, 3]
    assert out.codes.shape == (4, 8, 8)


class _Interrupted(Exception):
    pass


def _train(tokenizer_dir, cache_dir, output_dir, *extra: str) -> None:
    prior_train.cli(["--tokenizer", str(tokenizer_dir), "--dataset", "digits", "--preset", "tiny",
                     "--class-conditional", "--batch-size", "8", "--output-dir", str(output_dir),
                     "--cache-dir", str(cache_dir), "--log-every", "1", "--checkpoint-every", "4",
                     "--sample-every", "1000", "--max-eval-items", "16", *extra])


@pytest.mark.parametrize(("precision", "extra"), [("no", ()), ("bf16", ()), ("no", ("--weight-ema", "0.9"))])
def test_resume_after_interruption_is_exact(pipeline_tokenizer_dir, code_cache_dir, tmp_path, monkeypatch,
                                            fresh_accelerate_state, precision, extra):
    """An 8-step run killed after its step-4 checkpoint, then resumed, ends bit-identical to an uninterrupted one
    (with a weight EMA too: the checkpoint carries the average)."""
    args = (pipeline_tokenizer_dir, code_cache_dir)
    _train(*args, tmp_path / "straight", "--max-steps", "8", "--mixed-precision", precision, *extra)

    fresh_accelerate_state()
    original = prior_train.sequence_batch

    def crash_at_step_5(layout, codes, labels, label_dropout, step, *rest):
        if step >= 4:  # 0-based: the fifth step, after the step-4 checkpoint was written
            raise _Interrupted
        return original(layout, codes, labels, label_dropout, step, *rest)

    monkeypatch.setattr(prior_train, "sequence_batch", crash_at_step_5)
    with pytest.raises(_Interrupted):
        _train(*args, tmp_path / "resumed", "--max-steps", "8", "--mixed-precision", precision, *extra)
    monkeypatch.setattr(prior_train, "sequence_batch", original)
    assert not (tmp_path / "resumed" / "prior").exists()
    fresh_accelerate_state()
    _train(*args, tmp_path / "resumed", "--max-steps", "8", "--mixed-precision", precision, "--resume", *extra)

    straight = load_file(tmp_path / "straight" / "prior" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "prior" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name

    def losses(folder) -> list[tuple[int, float]]:
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [(row["step"], row["loss"]) for row in rows]

    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert [step for step, _ in losses(tmp_path / "straight")] == list(range(1, 9))
    if extra:  # the pipeline holds the average, not the last weights; the checkpoint holds both
        checkpoint = tmp_path / "straight" / "checkpoints" / "step_8"
        last = load_file(checkpoint / "model.safetensors")
        average = load_file(checkpoint / "weight_ema.safetensors")
        assert all(torch.equal(straight[name], average[f"module.{name}"]) for name in straight)
        assert not all(torch.equal(straight[name], last[name]) for name in straight)
        assert int(average["n_averaged"]) == 8
        metadata = json.loads((tmp_path / "straight" / "pipeline_config.json").read_text())["metadata"]
        assert metadata["weight_ema"] == 0.9
        assert metadata["prior_metrics_without_ema"]["val_nll"] != metadata["prior_metrics"]["val_nll"]


def test_weight_ema_warms_up_then_holds_its_decay():
    """After n updates the average moves by 1 - min(decay, (1 + n) / (10 + n)) towards the weights; the first
    update copies them."""
    model = torch.nn.Linear(1, 1, bias=False)
    average = weight_ema(model, decay=0.2)
    expected = None
    for n, value in enumerate([1.0, -2.0, 4.0, 8.0]):
        model.weight.data.fill_(value)
        average.update_parameters(model)
        rate = 1.0 - min(0.2, (1 + n) / (10 + n))
        expected = value if expected is None else expected + rate * (value - expected)
        assert average.module.weight.item() == pytest.approx(expected, rel=1e-6), n
    assert expected != pytest.approx(8.0)  # it averages, and 0.2 capped the decay from the third update on


def test_resuming_without_the_weight_ema_it_needs_is_refused(pipeline_tokenizer_dir, code_cache_dir, tmp_path,
                                                               capsys, fresh_accelerate_state):
    args = (pipeline_tokenizer_dir, code_cache_dir, tmp_path / "run")
    _train(*args, "--max-steps", "4", "--mixed-precision", "no")
    fresh_accelerate_state()
    with pytest.raises(SystemExit) as stop:
        _train(*args, "--max-steps", "8", "--mixed-precision", "no", "--resume", "--weight-ema", "0.9")
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and "weight_ema.safetensors" in error, error


def test_extending_a_finished_run_is_exact(pipeline_tokenizer_dir, code_cache_dir, tmp_path, fresh_accelerate_state):
    """A 4-step run continued with --resume --max-steps 8 equals a straight 8-step run when --decay-steps is fixed."""
    args = (pipeline_tokenizer_dir, code_cache_dir)
    _train(*args, tmp_path / "straight", "--max-steps", "8", "--decay-steps", "8", "--mixed-precision", "no")
    fresh_accelerate_state()
    _train(*args, tmp_path / "extended", "--max-steps", "4", "--decay-steps", "8", "--mixed-precision", "no")
    fresh_accelerate_state()
    _train(*args, tmp_path / "extended", "--max-steps", "8", "--decay-steps", "8", "--mixed-precision", "no",
           "--resume")
    straight = load_file(tmp_path / "straight" / "prior" / "model.safetensors")
    extended = load_file(tmp_path / "extended" / "prior" / "model.safetensors")
    assert all(torch.equal(straight[name], extended[name]) for name in straight)


def test_load_best_at_end_saves_the_weights_that_validated_best(pipeline_tokenizer_dir, code_cache_dir, tmp_path,
                                                                monkeypatch, fresh_accelerate_state):
    """Validation at steps 2, 4, 6, 8 scripted so step 4 scores best: the pipeline gets step 4's weights (the same
    as its checkpoint's), and the metadata names the step and keeps the last step's scores."""
    real = prior_train.validation_loss
    penalty = iter([1.0, 0.0, 1.0, 2.0, 2.0])  # steps 2, 4, 6, 8, then the final check

    def scripted(*args, **kwargs):
        row = real(*args, **kwargs)
        nll = row["val_nll"] + next(penalty)
        return {"val_nll": nll, "val_bits_per_code": nll / math.log(2)}

    monkeypatch.setattr(prior_train, "validation_loss", scripted)
    run = tmp_path / "run"
    _train(pipeline_tokenizer_dir, code_cache_dir, run, "--max-steps", "8", "--eval-every", "2",
           "--mixed-precision", "no", "--load-best-at-end")
    metadata = json.loads((run / "pipeline_config.json").read_text())["metadata"]
    assert metadata["best_step"] == 4
    assert metadata["prior_metrics"]["val_nll"] < metadata["prior_metrics_last_step"]["val_nll"] - 1.0
    saved = load_file(run / "prior" / "model.safetensors")
    at_step_4 = load_file(run / "checkpoints" / "step_4" / "model.safetensors")
    at_step_8 = load_file(run / "checkpoints" / "step_8" / "model.safetensors")
    assert all(torch.equal(saved[name], at_step_4[name]) for name in saved)
    assert not all(torch.equal(saved[name], at_step_8[name]) for name in saved)


def test_best_weights_survive_a_resume_but_not_from_beyond_it(tmp_path):
    model = torch.nn.Linear(2, 2)
    best = prior_train.BestWeights(tmp_path / "best", enabled=True)
    best.offer(model, 2, {"val_nll": 1.5})
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    best.offer(model, 4, {"val_nll": 1.7})  # worse: not kept
    resumed = prior_train.BestWeights(tmp_path / "best", enabled=True, resumed_step=4)
    assert resumed.record == {"step": 2, "val_nll": 1.5}
    assert prior_train.BestWeights(tmp_path / "best", enabled=True, resumed_step=1).record is None
    assert best.restore(model, final_nll=1.4) is None  # the last weights beat it: unchanged
    assert not torch.equal(model.weight, kept["weight"])
    assert best.restore(model, final_nll=1.6) == {"step": 2, "val_nll": 1.5}
    assert torch.equal(model.weight, kept["weight"])
    prior_train.BestWeights(tmp_path / "best", enabled=True)  # a fresh (not resumed) run forgets the old best
    assert not (tmp_path / "best").exists()


def test_train_cli_bad_input_exits_2(pipeline_tokenizer_dir, code_cache_dir, tmp_path, capsys, fresh_accelerate_state):
    with pytest.raises(SystemExit) as stop:
        prior_train.cli(["--tokenizer", str(tmp_path / "no-tokenizer"), "--max-steps", "2",
                         "--output-dir", str(tmp_path / "out")])
    assert stop.value.code == 2 and "--tokenizer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        _train(pipeline_tokenizer_dir, code_cache_dir, tmp_path / "empty", "--max-steps", "2", "--resume")
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and error.startswith("error: --resume") and "no checkpoint" in error


def test_config_shapes_the_saved_prior_and_a_resume_must_keep_it(pipeline_tokenizer_dir, code_cache_dir, tmp_path,
                                                                   capsys, fresh_accelerate_state):
    run = tmp_path / "run"
    _train(pipeline_tokenizer_dir, code_cache_dir, run, "--max-steps", "4", "--mixed-precision", "no",
           "--config", '{"num_hidden_layers": 1, "hidden_size": 32}')
    pipe = VQPipeline.from_pretrained(run)
    assert (len(pipe.prior.model.layers), pipe.prior.config.hidden_size) == (1, 32)
    assert pipe.metadata["prior_shape"] == {"num_hidden_layers": 1, "hidden_size": 32}
    fresh_accelerate_state()
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        _train(pipeline_tokenizer_dir, code_cache_dir, run, "--max-steps", "8", "--mixed-precision", "no", "--resume")
    error = capsys.readouterr().err
    assert stop.value.code == 2 and "was started with other settings (shape:" in error, error


def test_resume_with_another_tokenizer_is_refused(pipeline_tokenizer_dir, code_cache_dir, tmp_path, capsys,
                                                   fresh_accelerate_state):
    """A tokenizer of the same shape but other weights would pair the prior with codes it was not trained on."""
    from safetensors.torch import load_file, save_file

    other = Path(shutil.copytree(pipeline_tokenizer_dir, tmp_path / "other_tokenizer"))
    tensors = load_file(other / "model.safetensors")
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    _train(pipeline_tokenizer_dir, code_cache_dir, tmp_path / "run", "--max-steps", "4")
    fresh_accelerate_state()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        _train(other, tmp_path / "other_cache", tmp_path / "run", "--max-steps", "8", "--resume")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "was started with other settings (tokenizer_sha256:" in err and "Traceback" not in err
