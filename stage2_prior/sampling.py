"""Autoregressive sampling of code grids from the prior: KV cache, batched CFG, temperature / top-k / top-p."""

from __future__ import annotations

import inspect

import torch
from transformers import PreTrainedModel, StaticCache

from stage1_tokenizer.threads import rebalance_threads

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


# The default KV cache is transformers' dynamic one, which grows by concatenation. `static_cache=True` preallocates a
# StaticCache and writes in place instead (what torch.compile / CUDA graphs want). On CPU it does not pay off,
# since attention then always spans the whole preallocated length (benchmarks/README.md, bench_sampling.py).


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
) -> torch.Tensor:
    """Draw (num_samples, num_codes) code indices; only code tokens (0..K-1) can ever be drawn.

    With classifier-free guidance (guidance_scale != 1, conditional prior) the conditional and
    unconditional rows run in one batched forward per step: logits = u + s * (c - u).
    `static_cache=True` (with `use_cache`) uses a preallocated StaticCache instead of the growing default one.
    `temperature=0` means greedy decoding. Random draws use `generator` (on the CPU), so equal
    seeds give equal codes on any device.
    """
    device = next(prior.parameters()).device
    condition = layout.condition_tokens(class_labels, num_samples).to(device)  # (B,)
    guided = layout.conditional and guidance_scale != 1.0
    if guided:
        condition = torch.cat([condition, torch.full_like(condition, layout.null_token)])  # (2B,)
    sequence = condition.unsqueeze(1)  # (B or 2B, 1)
    codes = torch.empty(num_samples, layout.num_codes, dtype=torch.long, device=device)
    cache = None
    if use_cache and static_cache:
        cache = make_static_cache(prior, sequence.shape[0], layout.num_codes + 1)
    step_input = sequence
    for position in range(layout.num_codes):
        rebalance_threads()
        logits, cache = _forward(prior, step_input if use_cache else sequence, cache, use_cache)
        logits = logits[:, : layout.codebook_size]  # only code tokens are candidates
        if guided:
            cond, uncond = logits.chunk(2)
            logits = uncond + guidance_scale * (cond - uncond)
        if temperature == 0:
            token = logits.argmax(dim=-1)
        else:
            logits = filter_logits(logits / temperature, top_k, top_p)
            probs = logits.softmax(dim=-1).cpu()
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(device)
        codes[:, position] = token
        step_input = (torch.cat([token, token]) if guided else token).unsqueeze(1)
        sequence = torch.cat([sequence, step_input], dim=1)
    return codes
