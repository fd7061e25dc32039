"""The stage-2 prior: a Llama-style causal LM over [codes] + [class tokens] + [null class] + [bos]."""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

# Named size presets (hidden size, depth, heads, MLP width); they also feed the command line's choices.
PRIOR_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(model=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
                 train=dict(batch_size=32, learning_rate=1e-3, warmup_steps=10, log_every=5,
                            eval_every=50, sample_every=100, checkpoint_every=50)),
    # ~3.4M parameters.
    "small": dict(model=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, intermediate_size=768),
                  train=dict(batch_size=64, learning_rate=6e-4, warmup_steps=100, log_every=25,
                             eval_every=500, sample_every=1000, checkpoint_every=500)),
    "base": dict(model=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=2048),
                 train=dict(batch_size=64, learning_rate=3e-4, warmup_steps=1000, log_every=50,
                            eval_every=2000, sample_every=5000, checkpoint_every=2000)),
}


@dataclass(frozen=True)
class TokenLayout:
    """Where each kind of token lives in the prior's vocabulary."""

    codebook_size: int
    num_classes: int  # 0 for an unconditional prior
    num_codes: int  # sequence length after the conditioning token (h*w or n)

    @property
    def class_offset(self) -> int:
        return self.codebook_size

    @property
    def null_token(self) -> int:
        """The "no class" token: label dropout target and the unconditional row of CFG."""
        return self.codebook_size + self.num_classes

    @property
    def bos_token(self) -> int:
        return self.codebook_size + self.num_classes + 1

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + self.num_classes + 2

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def condition_tokens(self, class_labels: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """First token of each sequence: class token (label >= 0), null (label -1), or bos (unconditional)."""
        if not self.conditional:
            return torch.full((batch_size,), self.bos_token, dtype=torch.long)
        assert class_labels is not None and class_labels.shape == (batch_size,)
        labels = class_labels.long()
        return torch.where(labels >= 0, labels + self.class_offset, torch.full_like(labels, self.null_token))

    def to_dict(self) -> dict:
        return {**asdict(self), "class_offset": self.class_offset, "null_token": self.null_token,
                "bos_token": self.bos_token, "vocab_size": self.vocab_size}

    @classmethod
    def from_dict(cls, data: dict) -> "TokenLayout":
        layout = cls(int(data["codebook_size"]), int(data["num_classes"]), int(data["num_codes"]))
        for key in ("null_token", "bos_token", "vocab_size"):
            if key in data and int(data[key]) != getattr(layout, key):
                raise ValueError(f"token_layout.{key}={data[key]} disagrees with the layout it implies ({getattr(layout, key)})")
        return layout


def training_attention(device: torch.device) -> str:
    """Attention kernel for training on `device`: "eager" (plain bf16/fp32 matmuls and softmax) on a CPU, where at
    65 tokens it ran the `small` prior's training step 1.5x faster than SDPA, whose CPU flash kernel's backward took
    37% of the step (README, Performance); SDPA on a GPU. Not saved with the model: sampling is unaffected."""
    return "sdpa" if device.type == "cuda" else "eager"


# The Llama fields a preset sets and `--config` may change.
PRIOR_SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def check_prior_shape(shape: dict) -> dict:
    """A prior's `--config`: some of PRIOR_SHAPE_FIELDS, each a positive integer."""
    unknown = sorted(set(shape) - set(PRIOR_SHAPE_FIELDS))
    if unknown:
        raise ValueError(f"--config: {unknown} are not prior shape fields; expected some of {list(PRIOR_SHAPE_FIELDS)}")
    for name, value in shape.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--config: {name} must be a positive integer, got {value!r}")
    return shape


def build_prior(preset: str, layout: TokenLayout, **overrides) -> LlamaForCausalLM:
    """A freshly initialised Llama-style prior sized by `preset` (and shape overrides) for this token layout."""
    if preset not in PRIOR_PRESETS:
        raise ValueError(f"preset={preset!r} is unknown; expected one of {list(PRIOR_PRESETS)}")
    fields = dict(PRIOR_PRESETS[preset]["model"])
    fields.update(overrides)
    width, heads = fields["hidden_size"], fields["num_attention_heads"]
    if width % heads or (width // heads) % 2:
        raise ValueError(f"hidden_size {width} must split into num_attention_heads {heads} heads of an even size "
                         "(rotary position embeddings rotate pairs of channels)")
    config = LlamaConfig(
        vocab_size=layout.vocab_size,
        max_position_embeddings=layout.num_codes + 1,
        num_key_value_heads=fields["num_attention_heads"],
        tie_word_embeddings=False,
        bos_token_id=layout.bos_token,
        eos_token_id=None,
        pad_token_id=None,
        **fields,
    )
    return LlamaForCausalLM(config)


_CACHE_KWARG: dict[type, str] = {}  # per model class: one global answer would be wrong for a second class


def cache_kwarg(model: PreTrainedModel) -> str:
    """Name of the KV-cache argument of the model's forward ('cache' in transformers >= 5.x, else 'past_key_values')."""
    cls = type(model)
    if cls not in _CACHE_KWARG:
        params = inspect.signature(cls.forward).parameters
        _CACHE_KWARG[cls] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KWARG[cls]


def output_cache(outputs) -> Any:
    """The KV cache a forward returned, under whichever name this transformers version uses."""
    return outputs["cache"] if "cache" in outputs else outputs["past_key_values"]
