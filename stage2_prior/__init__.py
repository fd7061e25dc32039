"""Stage 2: a GPT-style autoregressive prior over a tokenizer's code indices."""

from .modeling import PRIOR_PRESETS, TokenLayout, build_prior
from .sampling import sample_codes

__all__ = ["PRIOR_PRESETS", "TokenLayout", "build_prior", "sample_codes"]
