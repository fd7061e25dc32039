"""A one-token decode step for a Llama prior that calls its weights directly, with a preallocated KV cache.

Sampling a code grid is one forward per token. At the `small` prior's size a step is ~7 MFLOP per row, so
transformers' per-call work (mask and cache objects, output dataclasses, three q/k/v and two gate/up matmuls,
rotary embeddings recomputed every step, a cache grown by concatenation) costs as much as the arithmetic. This
step has fused QKV and gate/up weights made once with the RMSNorm gains folded in, rotary factors precomputed,
keys and values written in place, one `scaled_dot_product_attention` call, logits for the code tokens only:
~15 computing ops a layer. With sampling, the `small` prior's step dispatches ~160 tensor ops (~410 counting the
ones they call); the same loop on the transformers forward dispatches ~260 (~870).

It computes what `LlamaForCausalLM.forward` computes, up to float rounding; tests/test_llama_decoder.py checks
its logits against the transformers forward. With `matmul_dtype=torch.bfloat16` the matmul weights are kept in bf16
and each matmul's input is cast to it, while the residual stream, the norms, the rotary embedding, the KV cache and
attention stay in the prior's float32: on a CPU with native bf16 that draws 4+ rows 1.2-1.5x faster (the weights
are half the bytes to stream each step, and bf16 matmuls run at twice the rate). The cache stays float32 because
the CPU's bf16 kernels for one-query attention were measured 2-5x slower than its float32 ones.
`sampling.decode_matmul_dtype` chooses the dtype. `unsupported_reason` says which priors it cannot run; for those
the sampler keeps the transformers forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM
from transformers.models.llama import modeling_llama


def unsupported_reason(prior: torch.nn.Module) -> str | None:
    """Why `LlamaDecoder` cannot run `prior` (None when it can)."""
    if type(prior) is not LlamaForCausalLM:
        return f"{type(prior).__name__} is not a plain LlamaForCausalLM"
    config = prior.config
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    checks = {
        "hidden_act is not silu": config.hidden_act != "silu",
        "attention or MLP biases": bool(config.attention_bias or config.mlp_bias),
        "rope type is not default": rope.get("rope_type", rope.get("type", "default")) != "default",
        "attention dropout while training": prior.training and config.attention_dropout > 0,
        "lm_head is not a Linear": type(prior.lm_head) is not torch.nn.Linear,
    }
    modules = list(prior.modules())
    checks["hooks on a module"] = any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook")
                                      for m in modules)
    expected = {"self_attn": modeling_llama.LlamaAttention, "mlp": modeling_llama.LlamaMLP,
                "input_layernorm": modeling_llama.LlamaRMSNorm, "post_attention_layernorm": modeling_llama.LlamaRMSNorm}
    checks["a layer is not the stock Llama module"] = any(
        type(getattr(layer, name, None)) is not kind for layer in prior.model.layers for name, kind in expected.items()
    ) or type(prior.model.norm) is not modeling_llama.LlamaRMSNorm
    parameters = list(prior.parameters())
    checks["parameters on several devices or dtypes, or not floating point"] = (
        len({(p.device, p.dtype) for p in parameters}) != 1 or not parameters[0].is_floating_point()
        or parameters[0].device.type == "meta"
    )
    failed = [reason for reason, bad in checks.items() if bad]
    return "; ".join(failed) if failed else None


class LlamaDecoder:
    """A Llama prior's weights arranged for one-token decode steps over `rows` sequences of up to `max_len` tokens."""

    @torch.no_grad()
    def __init__(self, prior: LlamaForCausalLM, rows: int, max_len: int, num_logits: int,
                 matmul_dtype: torch.dtype | None = None):
        reason = unsupported_reason(prior)
        if reason is not None:
            raise ValueError(f"LlamaDecoder cannot run this prior: {reason}")
        config, model = prior.config, prior.model
        weight = model.embed_tokens.weight
        device, dtype = weight.device, weight.dtype
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.embedding = weight
        # Query and key features are stored with each head's two halves interleaved, (x1_0, x2_0, x1_1, x2_1, ...):
        # the same permutation of q and k leaves every q.k unchanged, and makes rotate_half a complex product.
        half = self.head_dim // 2
        interleave = torch.arange(self.head_dim).view(2, half).t().reshape(-1)  # (d,)
        self.layers = []
        for layer in model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            query = attention.q_proj.weight.unflatten(0, (self.num_heads, self.head_dim))[:, interleave].flatten(0, 1)
            key = attention.k_proj.weight.unflatten(0, (self.num_kv_heads, self.head_dim))[:, interleave].flatten(0, 1)
            qkv = torch.cat([query, key, attention.v_proj.weight])
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            # Each RMSNorm's gain is folded into the matmul after it: (n * g) W^T = n (W diag(g))^T.
            # Weights are stored transposed and contiguous, (in, out): mm's fastest layout for a few rows.
            self.layers.append(dict(
                input_eps=_column(layer.input_layernorm.variance_epsilon, device),
                qkv_t=(qkv * layer.input_layernorm.weight).t().contiguous(),  # (D, (H + 2 Hkv) d)
                out_t=attention.o_proj.weight.t().contiguous(),  # (H d, D)
                post_eps=_column(layer.post_attention_layernorm.variance_epsilon, device),
                gate_up_t=(gate_up * layer.post_attention_layernorm.weight).t().contiguous(),  # (D, 2 I)
                down_t=mlp.down_proj.weight.t().contiguous(),  # (I, D)
            ))
        self.final_eps = _column(model.norm.variance_epsilon, device)
        # Only the first num_logits vocabulary rows can be drawn (code tokens), so only they are computed.
        self.head_t = (prior.lm_head.weight[:num_logits] * model.norm.weight).t().contiguous()  # (D, num_logits)
        self.matmul_dtype = matmul_dtype or dtype
        if self.matmul_dtype != dtype:  # folded gains first, then rounded once
            for layer in self.layers:
                for name in ("qkv_t", "out_t", "gate_up_t", "down_t"):
                    layer[name] = layer[name].to(self.matmul_dtype)
            self.head_t = self.head_t.to(self.matmul_dtype)
        self.head_bias = None if prior.lm_head.bias is None else prior.lm_head.bias[:num_logits]
        # The model's own rotary module makes the tables, so they equal what its forward uses.
        positions = torch.arange(max_len, device=device).unsqueeze(0)
        cos, sin = model.rotary_emb(weight[:1].unsqueeze(0), positions)  # (1, T, d) each
        # x cos + rotate_half(x) sin on a pair (x1_i, x2_i) is (x1_i + i x2_i) (cos_i + i sin_i).
        self.rotation = torch.complex(cos[0, :, :half].float(), sin[0, :, :half].float())  # (T, d/2)
        # RMSNorm's mean square as a matmul with a column of 1/D, plus eps, in one addmm.
        self.mean_column = torch.full((config.hidden_size, 1), 1.0 / config.hidden_size, device=device,
                                      dtype=torch.float32)
        shape = (len(self.layers), rows, self.num_kv_heads, max_len, self.head_dim)
        self.keys = torch.empty(shape, device=device, dtype=dtype)  # (L, R, Hkv, T, d); only [:position+1] is read
        self.values = torch.empty(shape, device=device, dtype=dtype)
        self.caches = list(zip(self.keys.unbind(0), self.values.unbind(0)))  # per layer: (R, Hkv, T, d) twice
        self.gqa = self.num_kv_heads != self.num_heads

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """Logits of the next token after `tokens` (R,) at `position`, caching their keys and values: (R, num_logits)."""
        rows = tokens.shape[0]
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        qk_width = (heads + kv_heads) * dim
        rotation = self.rotation[position]  # (d/2,) complex
        x = F.embedding(tokens, self.embedding)  # (R, D)
        for layer, (keys, values) in zip(self.layers, self.caches):
            qkv = self._project(self._normalized(x, layer["input_eps"]), layer["qkv_t"]).to(x.dtype)  # (R, (H+2Hkv) d)
            qk = _rotate(qkv[:, :qk_width].view(rows, heads + kv_heads, dim), rotation)  # queries and keys
            keys.select(2, position).copy_(qk[:, heads:])
            values.select(2, position).copy_(qkv[:, qk_width:].view(rows, kv_heads, dim))
            attended = F.scaled_dot_product_attention(
                qk[:, :heads].unsqueeze(2), keys.narrow(2, 0, position + 1), values.narrow(2, 0, position + 1),
                enable_gqa=self.gqa,
            )  # (R, H, 1, d): one query over every cached position, so no mask
            x = self._residual(x, attended.view(rows, heads * dim), layer["out_t"])
            gate, up = self._project(self._normalized(x, layer["post_eps"]), layer["gate_up_t"]).chunk(2, dim=-1)
            x = self._residual(x, F.silu(gate).mul_(up), layer["down_t"])
        logits = self._project(self._normalized(x, self.final_eps), self.head_t).to(x.dtype)
        return logits if self.head_bias is None else logits.add_(self.head_bias)

    def _project(self, h: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
        """h @ weight_t in the weight's dtype: (R, in) -> (R, out)."""
        return torch.mm(h if h.dtype == weight_t.dtype else h.to(weight_t.dtype), weight_t)

    def _residual(self, x: torch.Tensor, h: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
        """x + h @ weight_t, in x's dtype (one addmm when the weight shares it)."""
        if weight_t.dtype == x.dtype:
            return torch.addmm(x, h, weight_t)
        return x + self._project(h, weight_t)

    def _normalized(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """RMSNorm without its gain (folded into the next matmul), in float32 like LlamaRMSNorm: (R, D) -> (R, D)."""
        if x.dtype != torch.float32:
            return self._normalized(x.float(), eps).to(x.dtype)
        return x * torch.addmm(eps, x * x, self.mean_column).rsqrt_()  # eps: (1, 1), a tensor to spare a scalar copy


def _column(value: float, device: torch.device) -> torch.Tensor:
    """A (1, 1) float32 tensor holding `value`."""
    return torch.full((1, 1), value, device=device, dtype=torch.float32)


def _rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of (R, heads, d) features stored as interleaved pairs, by complex (d/2,) factors."""
    if x.dtype != torch.float32:
        return _rotate(x.float(), rotation).to(x.dtype)
    pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))  # (R, heads, d/2)
    return torch.view_as_real(pairs * rotation).flatten(-2)
