"""Autoregressive sampling of code grids from the prior: KV cache, batched CFG, temperature / top-k / top-p."""

from __future__ import annotations

import inspect

import torch
from transformers import PreTrainedModel, StaticCache

from stage1_tokenizer.precision import bf16_is_fast
from stage1_tokenizer.threads import rebalance_threads

from .llama_decoder import LlamaDecoder, unsupported_reason
from .modeling import TokenLayout, cache_kwarg, output_cache


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf: (B, V) -> (B, V)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw_one(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of `probs` (B, V) -> (B,): what `torch.multinomial(probs, 1, generator=generator)` draws.

    torch.multinomial draws one sample as argmax(p / q) with q ~ Exp(1) (the exponential race, a Gumbel-max
    trick), after input checks that each cost a synchronising reduction. This is that draw without the checks,
    consuming the generator identically, so seeds keep their codes (tests/test_llama_decoder.py pins that).
    """
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)


# KV caches. By default a plain Llama prior runs LlamaDecoder's step, whose preallocated cache is written in place
# and attended up to the current position only. Other priors get transformers' dynamic cache, which grows by
# concatenation. `static_cache=True` runs the prior's forward with a preallocated transformers StaticCache (what
# torch.compile / CUDA graphs want); on CPU it does not pay off, since its attention always spans the whole
# preallocated length (benchmarks/README.md, bench_sampling.py).


def make_static_cache(prior: PreTrainedModel, rows: int, max_len: int):
    """A preallocated KV cache for `rows` sequences of up to `max_len` tokens (transformers 4.5x and 5.x)."""
    kwargs = dict(config=prior.config, max_cache_len=max_len)
    if "max_batch_size" in inspect.signature(StaticCache.__init__).parameters:  # transformers 4.x
        kwargs.update(max_batch_size=rows, device=prior.device, dtype=prior.dtype)
    return StaticCache(**kwargs)


def _forward(prior: PreTrainedModel, input_ids: torch.Tensor, cache, use_cache: bool):
    kwargs = {cache_kwarg(prior): cache} if use_cache else {}
    outputs = prior(input_ids=input_ids, use_cache=use_cache, **kwargs)
    return outputs.logits[:, -1].float(), (output_cache(outputs) if use_cache else None)


PRECISIONS = ("auto", "fp32")
# From this many rows (samples, twice that with guidance) bf16 matmul weights pay off in the decode step on a CPU
# with native bf16: 2-core AMD EPYC with AVX512-BF16, `small` prior, 16x16 codes, decode steps alone: 0.69x at 1 row,
# 0.95x at 2, 1.28x at 4, 1.26x at 16, 1.47x at 64 (README, Performance: sampling in bf16).
BF16_DECODE_MIN_ROWS = 4


def decode_matmul_dtype(prior: PreTrainedModel, rows: int, precision: str = "auto") -> torch.dtype | None:
    """The dtype of the decode step's matmul weights: bf16 for "auto" on a float32 prior drawing `rows` >=
    BF16_DECODE_MIN_ROWS rows on a CPU where bf16 is measured fast (stage1_tokenizer.precision); None keeps the
    prior's own dtype ("fp32": the codes then equal the transformers forward's for a seed)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is unknown; expected one of {list(PRECISIONS)}")
    parameter = next(prior.parameters())
    if (precision == "auto" and rows >= BF16_DECODE_MIN_ROWS and parameter.dtype == torch.float32
            and parameter.device.type == "cpu" and bf16_is_fast("cpu")):
        return torch.bfloat16
    return None


def describe_precision(prior: PreTrainedModel, rows: int, precision: str = "auto") -> str:
    """How `sample_codes` computes a draw of `rows` rows of `prior` at `precision`, in words (for reports)."""
    if unsupported_reason(prior) is None and decode_matmul_dtype(prior, rows, precision) == torch.bfloat16:
        return "bf16 matmul weights in the decode step; float32 KV cache, attention and draws (a CPU with native bf16)"
    return f"{str(next(prior.parameters()).dtype).removeprefix('torch.')} throughout"


def fast_decoder(prior: PreTrainedModel, rows: int, max_len: int, num_logits: int,
                 matmul_dtype: torch.dtype | None = None) -> LlamaDecoder | None:
    """The hand-written decode step for `prior` (None when `LlamaDecoder` does not support it)."""
    if unsupported_reason(prior) is not None:
        return None
    return LlamaDecoder(prior, rows, max_len, num_logits, matmul_dtype)


class _TransformersSteps:
    """Decode steps through the prior's own forward: transformers' dynamic or static KV cache, or none."""

    def __init__(self, prior: PreTrainedModel, first: torch.Tensor, max_len: int, use_cache: bool, static_cache: bool):
        self.prior, self.use_cache = prior, use_cache
        self.cache = make_static_cache(prior, first.shape[0], max_len) if use_cache and static_cache else None
        self.sequence = first.unsqueeze(1)  # (R, 1): only kept whole without a cache

    def step(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """Logits (R, V) of the token after `tokens` (R,), the one at `position`."""
        if position > 0 and not self.use_cache:
            self.sequence = torch.cat([self.sequence, tokens.unsqueeze(1)], dim=1)
        logits, self.cache = _forward(self.prior, self.sequence if not self.use_cache else tokens.unsqueeze(1),
                                      self.cache, self.use_cache)
        return logits


@torch.no_grad()
def sample_codes(
    prior: PreTrainedModel,
    layout: TokenLayout,
    num_samples: int,
    class_labels: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    static_cache: bool = False,
    precision: str = "auto",
) -> torch.Tensor:
    """Draw (num_samples, num_codes) code indices; only code tokens (0..K-1) can ever be drawn.

    With classifier-free guidance (guidance_scale != 1, conditional prior) the conditional and
    unconditional rows run in one batched forward per step: logits = u + s * (c - u).
    With the KV cache (the default) a plain Llama prior runs `LlamaDecoder`'s hand-written step; other priors,
    `static_cache=True` (transformers' preallocated StaticCache) and `use_cache=False` run the prior's forward.
    `temperature=0` means greedy decoding. Random draws use `generator` (on the CPU), so equal
    seeds give equal codes on one machine. precision "auto" lets that step run its matmuls with bf16 weights where
    that is faster (`decode_matmul_dtype`: 4+ rows on a CPU with native bf16), which can change a draw where two
    codes' probabilities differ by less than its rounding; "fp32" keeps the prior's float32 throughout, and then
    every path draws the same codes for a seed.
    """
    device = next(prior.parameters()).device
    condition = layout.condition_tokens(class_labels, num_samples).to(device)  # (B,)
    guided = layout.conditional and guidance_scale != 1.0
    if guided:
        condition = torch.cat([condition, torch.full_like(condition, layout.null_token)])  # (2B,)
    max_len = layout.num_codes + 1
    rows = condition.shape[0]
    matmul_dtype = decode_matmul_dtype(prior, rows, precision)
    steps = fast_decoder(prior, rows, max_len, layout.codebook_size, matmul_dtype) \
        if use_cache and not static_cache else None
    if steps is None:
        steps = _TransformersSteps(prior, condition, max_len, use_cache, static_cache)
    codes = torch.empty(num_samples, layout.num_codes, dtype=torch.long, device=device)
    tokens = condition
    for position in range(layout.num_codes):
        rebalance_threads()
        logits = steps.step(tokens, position)[:, : layout.codebook_size].float()  # only code tokens are candidates
        if guided:
            cond, uncond = logits.chunk(2)
            logits = uncond + guidance_scale * (cond - uncond)
        if temperature == 0:
            token = logits.argmax(dim=-1)
        else:
            if temperature != 1.0:  # dividing by 1 changes nothing, and is one op fewer a step
                logits = logits / temperature
            token = draw_one(filter_logits(logits, top_k, top_p).softmax(dim=-1).cpu(), generator).to(device)
        codes[:, position] = token
        tokens = token.repeat(2) if guided else token
    return codes
