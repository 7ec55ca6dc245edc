"""Qwen2 / Qwen2.5 in one file: loads and saves the official Hugging Face checkpoints.

    import qwen2
    model = qwen2.from_pretrained("Qwen/Qwen2.5-7B", dtype="bf16", device="cuda")  # hub id or local dir
    logits = model(input_ids)                                    # (B, S) -> (B, S, vocab)
    logits = model(input_ids, attn_mask=mask)                    # mask (B|1, 1, S, S), True = may attend
    new = qwen2.generate(model, [ids_a, ids_b], max_new_tokens=20, eos_token_ids=[151643, 151645])
    model.save_pretrained("out/")                                # transformers and vLLM load this

The numerics follow transformers' Qwen2 (RMSNorm in fp32, RoPE angles in fp32 with the half-rotation
layout, q/k/v biases only), and the parameter names are the checkpoint's, so weights load strictly
with no name mapping. What makes it Qwen2 sits in one block ("Architecture facts") below.

The model contract: all a training method (focusft.py) uses, so all a port must provide.
    h = model.embed(input_ids)                              # (B, S) -> (B, S, D)
    h = model.run_layers(h, a, b, mask=, fast=, checkpoint=)   # decoder layers [a, b) -> (B, S, D)
    h = model.run_attention(h, i, mask=)                    # layer i's attention half, residual included
    h = model.run_ffn(h, i, fast=, checkpoint=)             # layer i's FFN half, residual included
    logits = model.logits(h, where)                         # final norm + lm_head at where (B, S) -> (N, V)
    probs = model.attention_probabilities(h, i, queries, mask=)  # layer i's softmax, per row (H, N_b, S)
    model.blocks()                                          # the decoder layers, the units FSDP shards
  mask: None (causal) or bool (B|1, 1, S, S), True = may attend. fast: the FFN fast-weight slots,
  {layer: {"gate_proj" | "up_proj" | "down_proj": LowRank(A, B, scale)}}, each adding scale * B (A x)
  to its projection; `model.model.layers[i].mlp.<name>.weight` gives their shapes. Loading and
  export use `from_pretrained`, `save_weights`, `config.num_hidden_layers` and `generation_config`.

This file imports torch, safetensors and huggingface_hub only: no device placement policy,
distributed or training code, so it can be copied alone into another project.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint


class CheckpointError(Exception):
    """A config or checkpoint this file cannot load faithfully. The message is meant for the user."""


# ----------------------------------------------------------------------------------------------
# Architecture facts: what makes this file Qwen2 rather than another pre-norm, RoPE, GQA, SwiGLU
# decoder. A port to another family edits this block (and `Attention.project` for a q/k norm);
# docs/porting.md says exactly what changes for Llama 3 and Qwen3.

MODEL_TYPE = "qwen2"  # config.json's model_type; any other is refused
ARCHITECTURE = "Qwen2ForCausalLM"  # written to config.json's "architectures"
QKV_BIAS = True  # biases on q_proj, k_proj and v_proj (never on o_proj or the FFN)
HIDDEN_ACT = "silu"  # the SwiGLU gate's activation; any other is refused
ROPE_TYPES = ("yarn",)  # rope_scaling types implemented by `rope_inv_freq` (besides none/"default")
# Keys written to config.json as constants: this file computes exactly this and nothing else.
FIXED_CONFIG = {"hidden_act": HIDDEN_ACT, "use_sliding_window": False, "attention_dropout": 0.0}


# ----------------------------------------------------------------------------------------------
# Config


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class Qwen2Config:
    """The fields of a Qwen2 `config.json` that the computation depends on (HF names)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None  # None, or {"type": "yarn", "factor": 4.0, ...}
    tie_word_embeddings: bool = False
    torch_dtype: str = "float32"  # the checkpoint's own dtype; the default when loading
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    head_dim: int | None = None  # None: hidden_size // num_attention_heads (all Qwen2 releases)
    extra: dict = field(default_factory=dict, repr=False, compare=False)  # other keys, kept on save

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        problems = []
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                            f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind == "default":
                self.rope_scaling = None
            elif kind not in ROPE_TYPES:
                problems.append(f"rope_scaling type {kind!r} is not implemented (supported: {', '.join(ROPE_TYPES)})")
            elif "factor" not in self.rope_scaling:
                problems.append(f"rope_scaling of type {kind} needs a 'factor'")
        if problems:
            raise CheckpointError("; ".join(problems))

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> Qwen2Config:
        """Build from a HF config dict; refuse what this implementation would not compute faithfully."""
        d = dict(d)
        refuse = []
        if d.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            refuse.append(f"model_type is {d['model_type']!r}, only {MODEL_TYPE!r} is implemented")
        if d.get("hidden_act", HIDDEN_ACT) != HIDDEN_ACT:
            refuse.append(f"hidden_act {d['hidden_act']!r} is not implemented ({MODEL_TYPE} uses {HIDDEN_ACT})")
        if d.get("attention_dropout", 0.0):
            refuse.append(f"attention_dropout={d['attention_dropout']} is not implemented")
        layers = d.get("num_hidden_layers", 0)
        layer_types = d.get("layer_types") or []
        sliding = any(t != "full_attention" for t in layer_types) or (
            not layer_types and d.get("use_sliding_window") and d.get("max_window_layers", layers) < layers)
        if sliding:
            refuse.append("sliding-window attention is enabled (use_sliding_window / layer_types); "
                          "only full attention is implemented")
        # transformers >= 5 writes rope_theta and the scaling into one `rope_parameters` dict.
        rope = d.pop("rope_parameters", None) or {}
        if "rope_theta" in rope:
            d.setdefault("rope_theta", rope["rope_theta"])
        if d.get("rope_scaling") is None and rope.get("rope_type", rope.get("type", "default")) != "default":
            d["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        if "dtype" in d and "torch_dtype" not in d:  # transformers >= 5 spelling
            d["torch_dtype"] = d["dtype"]
        if isinstance(d.get("torch_dtype"), str) and d["torch_dtype"] not in _DTYPES:
            refuse.append(f"torch_dtype {d['torch_dtype']!r} is not a floating dtype this file knows")
        names = {f.name for f in fields(cls)} - {"extra"}
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"]
        missing = [k for k in required if k not in d]
        if missing:
            refuse.append(f"missing required field(s) {', '.join(missing)}")
        if refuse:
            raise CheckpointError(f"{source}: " + "; ".join(refuse))
        d.setdefault("num_key_value_heads", d["num_attention_heads"])
        kwargs = {k: v for k, v in d.items() if k in names and v is not None}  # null: the default
        extra = {k: v for k, v in d.items() if k not in names and k != "dtype"}
        try:
            return cls(**kwargs, extra=extra)
        except (CheckpointError, TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Qwen2Config:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file (a Qwen2 checkpoint directory needs config.json)")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict:
        """The HF `config.json` layout (classic keys, read by transformers 4.x/5.x and vLLM): the
        architecture's constants, then every field of this dataclass (head_dim only when not derived)."""
        d = {k: v for k, v in self.extra.items() if k not in ("architectures", "model_type", "transformers_version")}
        d.update({"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, **FIXED_CONFIG})
        d.update({f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("extra", "head_dim")})
        d.setdefault("initializer_range", 0.02)
        d.setdefault("use_cache", True)
        if self.head_dim != self.hidden_size // self.num_attention_heads:
            d["head_dim"] = self.head_dim
        return d


# ----------------------------------------------------------------------------------------------
# Rotary embeddings


def rope_inv_freq(config: Qwen2Config) -> tuple[Tensor, float]:
    """Inverse frequencies (head_dim/2,) in fp32 and the cos/sin scale (1.0 unless yarn).

    Yarn follows transformers: the low frequencies are interpolated by `factor`, the high ones kept,
    with a linear ramp between the dimensions that turn beta_slow and beta_fast times over the
    original context, and cos/sin scaled by 0.1 ln(factor) + 1."""
    dim, base = config.head_dim, config.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    scaling = config.rope_scaling
    if scaling is None:
        return 1.0 / pos_freqs, 1.0
    factor = scaling["factor"]
    original = scaling.get("original_max_position_embeddings") or config.max_position_embeddings
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (divide by factor)
    inv_freq = 1.0 / (factor * pos_freqs) * (1 - keep) + 1.0 / pos_freqs * keep
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")

        def get_mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if mscale and mscale_all:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all)
        else:
            attention_factor = get_mscale(factor)
    return inv_freq, float(attention_factor)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x (B, H, S, hd); cos, sin (B|1, S, hd), already in x's dtype
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


# ----------------------------------------------------------------------------------------------
# Modules


class LowRank(NamedTuple):
    """A fast weight on one projection W (d_out x d_in): W x + scale * B (A x)."""

    A: Tensor  # (r, d_in)
    B: Tensor  # (d_out, r)
    scale: float


# layer index -> projection name ("gate_proj", "up_proj", "down_proj") -> factors
FastWeights = dict[int, dict[str, LowRank]]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32, cast back, then scale: the order transformers uses, so bf16 matches.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class KVCache:
    """Per-layer keys/values (B, kv_heads, T, head_dim) for generation.

    `pos` says where the next `update` writes: an int (prefill chunk starting there, all rows) or a
    LongTensor (B,) (each row's tokens from its own position: one decode token, or a continuation)."""

    def __init__(self, config: Qwen2Config, batch: int, length: int, dtype: torch.dtype, device):
        shape = (batch, config.num_key_value_heads, length, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.pos: int | Tensor = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        K, V = self.k[layer], self.v[layer]
        if isinstance(self.pos, int):
            end = self.pos + k.shape[2]
            K[:, :, self.pos:end], V[:, :, self.pos:end] = k, v
        else:  # S tokens per row, each row from its own position: a decode step (S = 1) or a continuation
            S = k.shape[2]
            rows = torch.arange(K.shape[0], device=K.device)[:, None]
            idx = self.pos[:, None] + torch.arange(S, device=K.device)  # (B, S)
            K[rows, :, idx], V[rows, :, idx] = k.transpose(1, 2), v.transpose(1, 2)  # (B, S, KV, hd)
            end = int(self.pos.max()) + S
        return K[:, :, :end], V[:, :, :end]

    def grow(self, length: int) -> None:
        """Room for `length` positions per row (existing keys/values kept)."""
        extra = length - self.k[0].shape[2]
        if extra > 0:
            for cache in (self.k, self.v):
                for i, t in enumerate(cache):
                    cache[i] = torch.cat([t, t.new_zeros(*t.shape[:2], extra, t.shape[3])], dim=2)

    def select(self, rows: Tensor) -> None:
        """Keep only these rows (B' indices), in this order."""
        for cache in (self.k, self.v):
            for i, t in enumerate(cache):
                cache[i] = t[rows]


def attention(q: Tensor, k: Tensor, v: Tensor, mask) -> Tensor:
    """Scaled dot-product attention with grouped KV heads.

    q (B, H, S, hd); k, v (B, KV, T, hd); mask None (causal, S == T), a bool tensor (B|1, 1, S, T)
    with True = may attend, or a torch causal bias object. -> (B, H, S, hd)"""
    n_rep = q.shape[1] // k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_rep > 1)
    if n_rep > 1 and q.shape[2] == 1 and isinstance(mask, Tensor):
        # One query per row (decoding): fold the query heads of each KV group into the query
        # axis, so the cache is read once instead of being copied n_rep times.
        B, H, _, hd = q.shape
        y = F.scaled_dot_product_attention(q.view(B, k.shape[1], n_rep, hd), k, v, attn_mask=mask)
        return y.view(B, H, 1, hd)
    if n_rep > 1:
        # With an explicit mask, enable_gqa would send CUDA to the O(S^2)-memory math kernel;
        # repeating K/V keeps the memory-efficient kernel.
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(nn.Module):
    def __init__(self, config: Qwen2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                  config.head_dim)
        D = config.hidden_size
        self.q_proj = nn.Linear(D, self.n_heads * self.head_dim, bias=QKV_BIAS)
        self.k_proj = nn.Linear(D, self.n_kv * self.head_dim, bias=QKV_BIAS)
        self.v_proj = nn.Linear(D, self.n_kv * self.head_dim, bias=QKV_BIAS)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, D, bias=False)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The one place queries, keys and values are made: x (B, S, D) -> q (B, H, S, hd) and
        k, v (B, KV, S, hd), RoPE applied to q and k."""
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask=None, cache: KVCache | None = None):
        B, S, _ = x.shape  # x (B, S, D)
        q, k, v = self.project(x, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        y = attention(q, k, v, mask)  # (B, H, S, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))

    def probabilities(self, x: Tensor, cos: Tensor, sin: Tensor, mask, queries: Tensor) -> list[Tensor]:
        """The attention weights `forward` applies, as an explicit fp32 softmax, for the query
        positions `queries` (B, S) bool only: per row b, (H, N_b, S) over the keys. For measurements;
        `forward` keeps the fused kernel. mask as in `attention` (None: causal)."""
        q, k, _ = self.project(x, cos, sin)
        k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1).float()  # (B, H, S, hd)
        S = x.shape[1]
        if mask is None:
            mask = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()[None, None]
        out = []
        for b in range(x.shape[0]):
            rows = queries[b].nonzero().squeeze(1)  # (N_b,)
            scores = (q[b][:, rows].float() @ k[b].transpose(-1, -2)) / math.sqrt(self.head_dim)  # (H, N_b, S)
            allowed = mask[b if mask.shape[0] > 1 else 0, 0][rows]  # (N_b, S)
            out.append(scores.masked_fill(~allowed, float("-inf")).softmax(-1))
        return out


class MLP(nn.Module):
    """SwiGLU FFN with optional low-rank fast weights on each projection."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        D, I = config.hidden_size, config.intermediate_size  # noqa: E741
        self.gate_proj = nn.Linear(D, I, bias=False)
        self.up_proj = nn.Linear(D, I, bias=False)
        self.down_proj = nn.Linear(I, D, bias=False)

    def proj(self, name: str, x: Tensor, fast: dict[str, LowRank] | None) -> Tensor:
        y = getattr(self, name)(x)
        if fast is not None and name in fast:
            A, B, scale = fast[name]
            y = y + F.linear(F.linear(x, A), B) * scale  # W x + scale * B (A x)
        return y

    def forward(self, x: Tensor, fast: dict[str, LowRank] | None = None) -> Tensor:
        h = F.silu(self.proj("gate_proj", x, fast)) * self.proj("up_proj", x, fast)
        return self.proj("down_proj", h, fast)


class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen2Config, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos=None, sin=None, mask=None, fast=None, cache=None, half: str | None = None) -> Tensor:
        """The pre-norm residual layer on x (B, S, D); `half` "attention" or "ffn" runs that half
        alone. Every use goes through forward, so a wrapper hooking it (FSDP) sees every call."""
        if half != "ffn":
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        if half != "attention":
            x = x + self.mlp(self.post_attention_layernorm(x), fast)
        return x


class Qwen2Body(nn.Module):
    """Holds the `model.*` parameters (embed_tokens, layers, norm) under their checkpoint names."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.model = Qwen2Body(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False  # used by forward(); run_layers takes it as an argument
        self.generation_config: dict = {}  # generation_config.json, written back by save_pretrained
        self._rope_cache: dict = {}

    # -- the entry points a training method composes ------------------------------------------

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_tokens(input_ids)  # (B, S) -> (B, S, D)

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin (B|1, S, head_dim) for positions (B|1, S); angles in fp32, cast to `dtype`."""
        key = positions.device
        if key not in self._rope_cache:  # computed on the CPU like transformers, then moved
            inv_freq, scale = rope_inv_freq(self.config)
            self._rope_cache[key] = (inv_freq.to(positions.device), scale)
        inv_freq, scale = self._rope_cache[key]
        angles = positions[..., None].float() * inv_freq  # (B|1, S, hd/2)
        emb = torch.cat((angles, angles), dim=-1)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)

    def run_layers(self, h: Tensor, start: int, end: int, *, mask=None, positions: Tensor | None = None,
                   fast: FastWeights | None = None, checkpoint: bool = False, cache: KVCache | None = None) -> Tensor:
        """Decoder layers [start, end) on hidden states h (B, S, D) -> (B, S, D).

        mask: None for causal attention, or a bool tensor (B|1, 1, S, S), True = may attend (every
        row must allow at least one key). positions: (B|1, S), default 0..S-1. fast: low-rank fast
        weights by layer index. checkpoint: recompute each layer in backward (non-reentrant)."""
        cos, sin = self.rope(self._positions(h, positions), h.dtype)
        for i in range(start, end):
            h = self._call(self.model.layers[i], checkpoint, h, cos, sin, mask, (fast or {}).get(i), cache)
        return h

    def run_attention(self, h: Tensor, layer: int, *, mask=None, positions: Tensor | None = None) -> Tensor:
        """The attention half of one layer, residual included: what that layer's FFN half sees."""
        cos, sin = self.rope(self._positions(h, positions), h.dtype)
        return self.model.layers[layer](h, cos, sin, mask, half="attention")

    def run_ffn(self, h: Tensor, layer: int, *, fast: dict[str, LowRank] | None = None,
                checkpoint: bool = False) -> Tensor:
        """The FFN half of one layer, residual included, on the output of its attention half."""
        return self._call(self.model.layers[layer], checkpoint, h, fast=fast, half="ffn")

    def attention_probabilities(self, h: Tensor, layer: int, queries: Tensor, *, mask=None) -> list[Tensor]:
        """What layer `layer`'s attention does with its input h (B, S, D): per row b, the softmax
        weights (H, N_b, S) of the query positions `queries` (B, S) bool (see Attention.probabilities)."""
        cos, sin = self.rope(self._positions(h, None), h.dtype)
        block = self.model.layers[layer]
        return block.self_attn.probabilities(block.input_layernorm(h), cos, sin, mask, queries)

    def blocks(self) -> list[nn.Module]:
        """The repeated units, the decoder layers: what a sharding wrapper (FSDP) wraps one by one.
        The entry points above call them through `forward` only, so the wrapper's hooks see every use."""
        return list(self.model.layers)

    @staticmethod
    def _positions(h: Tensor, positions: Tensor | None) -> Tensor:
        return torch.arange(h.shape[1], device=h.device)[None] if positions is None else positions

    @staticmethod
    def _call(layer: nn.Module, checkpoint: bool, *args, **kwargs) -> Tensor:
        if checkpoint and torch.is_grad_enabled():
            return activation_checkpoint(layer, *args, use_reentrant=False, **kwargs)
        return layer(*args, **kwargs)

    def logits(self, h: Tensor, where: Tensor | None = None) -> Tensor:
        """Final norm + lm_head. h (B, S, D) -> (B, S, V); with `where` (B, S) bool, only at the
        selected positions -> (N, V), so a caller pays for vocabulary-wide logits only where needed."""
        if where is not None:
            h = h[where]
        return self.lm_head(self.model.norm(h))

    def forward(self, input_ids: Tensor, attn_mask: Tensor | None = None,
                positions: Tensor | None = None) -> Tensor:
        h = self.embed(input_ids)
        h = self.run_layers(h, 0, self.config.num_hidden_layers, mask=attn_mask, positions=positions,
                            checkpoint=self.gradient_checkpointing)
        return self.logits(h)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def save_pretrained(self, directory: str | os.PathLike, max_shard_bytes: int = 5 * 10**9) -> None:
        save_weights(self.state_dict(), self.config, directory, self.generation_config, max_shard_bytes)


# ----------------------------------------------------------------------------------------------
# Random init, loading, saving


def _checkpoint_keys(config: Qwen2Config, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The state dict as a checkpoint stores it: a tied lm_head is the embedding, not a tensor."""
    return {k: v for k, v in state.items() if not (config.tie_word_embeddings and k == "lm_head.weight")}


def _assign(model: Qwen2ForCausalLM, tensors: dict[str, Tensor]) -> Qwen2ForCausalLM:
    """Install tensors into a meta-device model (strict: every parameter, nothing else)."""
    if model.config.tie_word_embeddings:
        tensors = {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]}
    model.load_state_dict(tensors, strict=True, assign=True)
    if model.config.tie_word_embeddings:  # assign=True installs two parameters; make them one again
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def random_model(config: Qwen2Config, seed: int = 0, dtype: str | torch.dtype | None = None,
                 device: str | torch.device | None = None, std: float = 0.02) -> Qwen2ForCausalLM:
    """The one place weights are drawn: N(0, std) matrices, zero biases, unit norms."""
    dtype = parse_dtype(dtype or config.torch_dtype)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, p in _checkpoint_keys(config, model.state_dict()).items():
        if name.endswith("norm.weight"):
            t = torch.ones(p.shape)
        elif name.endswith(".bias"):
            t = torch.zeros(p.shape)
        else:
            t = torch.randn(p.shape, generator=g) * std
        tensors[name] = t.to(device=device, dtype=dtype)
    return _assign(model, tensors)


# The tokenizer files a checkpoint directory may carry (exports copy them along).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.json", "chat_template.jinja")
_HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
              *TOKENIZER_FILES]


def checkpoint_dir(path_or_hub_id: str | os.PathLike, weights: bool = True) -> Path:
    """A local checkpoint directory: the path itself, or a hub snapshot (config, weights, tokenizer).

    A hub id ("org/name") is downloaded with huggingface_hub into its cache; with HF_HUB_OFFLINE=1
    the cached snapshot is used. weights=False leaves the weights out (a model served elsewhere)."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: is a file; expected a checkpoint directory or a hub id")
    text = str(path_or_hub_id)
    if text.startswith((".", "/", "~")) or text.count("/") != 1 or path.parent.is_dir():
        raise CheckpointError(f"{text}: no such directory (and not a hub id of the form org/name)")
    from huggingface_hub import snapshot_download
    try:
        patterns = _HUB_FILES if weights else [f for f in _HUB_FILES if "safetensors" not in f]
        return Path(snapshot_download(text, allow_patterns=patterns))
    except Exception as e:  # network, auth, missing repo, offline without a cache: all one message
        offline = " (HF_HUB_OFFLINE is set: the model must already be in the cache)" if os.environ.get(
            "HF_HUB_OFFLINE") else ""
        raise CheckpointError(f"{text}: not a local directory, and the hub download failed{offline}: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = [directory / f for f in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index}: lists shard(s) that are not there: {', '.join(absent)}")
        return files
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    hint = " (PyTorch .bin checkpoints are not supported: convert to safetensors)" if any(
        directory.glob("*.bin")) else ""
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json{hint}")


def _listing(kind: str, names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
    return f"{len(names)} {kind}: {shown}"


def from_pretrained(path_or_hub_id: str | os.PathLike, dtype: str | torch.dtype | None = None,
                    device: str | torch.device | None = None) -> Qwen2ForCausalLM:
    """Load a Qwen2 checkpoint (local directory or hub id) in `dtype` (default: the checkpoint's own)
    on `device` (default: cpu). Builds on the meta device and moves tensor by tensor, so peak host
    memory stays near one copy of the model."""
    from safetensors import safe_open

    directory = checkpoint_dir(path_or_hub_id)
    config = Qwen2Config.from_json(directory / "config.json")
    dtype = parse_dtype(dtype or config.torch_dtype)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    expected = {k: tuple(v.shape) for k, v in _checkpoint_keys(config, model.state_dict()).items()}
    tensors, unexpected, misshaped = {}, [], []
    for file in weight_files(directory):
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    if key == "lm_head.weight" and config.tie_word_embeddings:
                        continue  # some tied checkpoints store the (identical) head too
                    if key not in expected:
                        unexpected.append(key)
                        continue
                    shape = tuple(f.get_slice(key).get_shape())
                    if shape != expected[key]:
                        misshaped.append(f"{key} {list(shape)} (expected {list(expected[key])})")
                        continue
                    tensors[key] = f.get_tensor(key).to(dtype)
        except CheckpointError:
            raise
        except Exception as e:  # a truncated or corrupt file
            raise CheckpointError(f"{file}: cannot read safetensors ({type(e).__name__}: {e})") from None
    missing = sorted(set(expected) - set(tensors) - {m.split()[0] for m in misshaped})
    problems = [_listing(kind, names) for kind, names in
                (("missing tensor(s)", missing), ("unexpected tensor(s)", sorted(unexpected)),
                 ("mis-shaped tensor(s)", misshaped)) if names]
    if problems:
        raise CheckpointError(f"{directory}: the weights do not match config.json: " + "; ".join(problems))
    model = _assign(model, tensors)
    gen = directory / "generation_config.json"
    if gen.is_file():
        try:
            model.generation_config = json.loads(gen.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{gen}: not valid JSON ({e})") from None
    return model


def save_weights(state: dict[str, Tensor], config: Qwen2Config, directory: str | os.PathLike,
                 generation_config: dict | None = None, max_shard_bytes: int = 5 * 10**9) -> None:
    """Write config.json, generation_config.json and safetensors in the HF layout.

    Above `max_shard_bytes` the weights are split into model-0000i-of-0000n.safetensors shards with
    a model.safetensors.index.json. Weight files of an earlier save in the directory are removed."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = _checkpoint_keys(config, state)
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    for old in [*directory.glob("model*.safetensors"), directory / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards, strict=True):
        save_file({k: v.detach().to("cpu").contiguous() for k, v in shard.items()}, str(directory / name),
                  metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {k: name for name, shard in zip(names, shards, strict=True) for k in shard}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    cfg = config.to_dict()
    cfg["torch_dtype"] = dtype_name(next(iter(state.values())).dtype)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
           **(generation_config or {})}
    (directory / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# Generation


def next_token(logits: Tensor, temperature: float = 0.0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
    """Greedy (temperature 0) or sampled next tokens from logits (B, V) -> (B,). Sampling keeps the smallest
    set of most likely tokens whose probability reaches top_p (nucleus sampling, as vLLM's top_p)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        p, order = probs.sort(dim=-1, descending=True)
        drop = p.cumsum(-1) - p >= top_p  # the mass before a token already reaches top_p (never the first)
        p = p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class Decoder:
    """Batched decoding whose rows grow over several calls: a multi-turn rollout's context (prompt, the
    model's turn, a tool result, the next turn...) stays in the KV cache between its turns instead of being
    encoded again. `extend` appends each row's new tokens and generates its next turn.

    Per row: `length` tokens are in the cache; `carry` is the last generated token, fed with the row's
    next extension (a finished row's last token is sampled but not yet run through the model)."""

    def __init__(self, model: Qwen2ForCausalLM, prefill_chunk: int | None = None):
        self.model, self.prefill_chunk = model, prefill_chunk
        self.cache: KVCache | None = None
        self.length: list[int] = []
        self.carry: list[list[int]] = []

    def select(self, rows: list[int]) -> None:
        """Keep only these rows, in this order (drop finished rollouts so they cost nothing)."""
        if self.cache is not None:
            self.cache.select(torch.tensor(rows, dtype=torch.long, device=self.model.device))
        self.length = [self.length[r] for r in rows]
        self.carry = [self.carry[r] for r in rows]

    @torch.no_grad()
    def extend(self, tokens: list[list[int]], max_new_tokens: list[int], eos_token_ids: list[int] | None = None,
               temperature: float = 0.0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> list[list[int]]:
        """Append tokens[b] to row b and generate up to max_new_tokens[b] new tokens (0: the row is left
        as it is). Returns each row's new tokens, ending with the first EOS id generated."""
        if self.cache is None:
            self.length, self.carry = [0] * len(tokens), [[] for _ in tokens]
        if len(tokens) != len(self.length) or len(max_new_tokens) != len(self.length):
            raise ValueError(f"extend: {len(tokens)} token lists and {len(max_new_tokens)} budgets for "
                             f"{len(self.length)} rows")
        active = [b for b, n in enumerate(max_new_tokens) if n > 0]
        if not active:
            return [[] for _ in tokens]
        new = [self.carry[b] + list(tokens[b]) if b in active else [] for b in range(len(tokens))]
        if any(len(new[b]) == 0 for b in active):
            raise ValueError("generate: every prompt needs at least one token")
        ids, start, lengths = self._append(new, max(max_new_tokens))
        if not any(self.length):  # every row starts empty: right-padded prompts, causal prefill
            last = self._prefill(ids, lengths)
        else:
            last = self._continue(ids, start, lengths)
        sampling = (temperature, top_p, generator)
        token = next_token(self.model.logits(last), *sampling)  # (B,)
        outputs = self._decode(token, lengths, max_new_tokens, eos_token_ids, sampling)
        for b in active:  # all but the last new token are in the cache at their place
            self.length[b] = int(lengths[b]) + len(outputs[b]) - 1
            self.carry[b] = outputs[b][-1:]
        return outputs

    def _append(self, new: list[list[int]], budget: int) -> tuple[Tensor, Tensor, Tensor]:
        """The rows' new tokens, right-padded, as ids (B, S); where each row starts (B,) and its length
        after them (B,). Makes room in the cache for them and `budget` generated tokens after them."""
        model, device = self.model, self.model.device
        start = torch.tensor(self.length, device=device)
        lengths = start + torch.tensor([len(t) for t in new], device=device)  # tokens after the prefill
        B, S = len(new), max(len(t) for t in new)
        ids = torch.zeros(B, S, dtype=torch.long, device=device)
        for b, t in enumerate(new):
            ids[b, :len(t)] = torch.tensor(t, dtype=torch.long)
        # Room for the longest extension plus the whole budget after it in every row (finished rows keep
        # writing ignored tokens past their end until the batch stops, as they always have).
        need = int(start.max()) + S + budget
        if self.cache is None:
            self.cache = KVCache(model.config, B, need, model.dtype, device)
        else:
            self.cache.grow(need)
        return ids, start, lengths

    def _prefill(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """Run right-padded prompts ids (B, S) into an empty cache, `prefill_chunk` positions at a time.
        Returns the last layer's output (B, hidden) at each row's last prompt token."""
        model, cache, device = self.model, self.cache, self.model.device
        (B, S), L = ids.shape, model.config.num_hidden_layers
        chunk = self.prefill_chunk or S
        last = torch.zeros(B, model.config.hidden_size, dtype=model.dtype, device=device)
        for s in range(0, S, chunk):
            e = min(s + chunk, S)
            cache.pos = s
            # Chunk queries s..e-1 see keys 0..e-1: causal, aligned at the bottom right.
            mask = None if s == 0 else torch.ones(e - s, e, dtype=torch.bool, device=device).tril(s)
            h = model.run_layers(model.embed(ids[:, s:e]), 0, L, mask=mask,
                                 positions=torch.arange(s, e, device=device)[None], cache=cache)
            in_chunk = (lengths - 1 >= s) & (lengths - 1 < e)  # rows whose last prompt token is here
            idx = (lengths - 1 - s).clamp(0, e - s - 1)
            last = torch.where(in_chunk[:, None], h[torch.arange(B, device=device), idx], last)
        return last

    def _continue(self, ids: Tensor, start: Tensor, lengths: Tensor) -> Tensor:
        """Run each row's new tokens ids (B, S) from its own length `start` (B,): per-row positions and masks.
        Returns the last layer's output (B, hidden) at each row's last new token."""
        model, cache, device = self.model, self.cache, self.model.device
        (B, S), L = ids.shape, model.config.num_hidden_layers
        positions = start[:, None] + torch.arange(S, device=device)  # (B, S)
        T = int(start.max()) + S
        mask = (torch.arange(T, device=device)[None, None] <= positions[:, :, None])[:, None]  # (B,1,S,T)
        cache.pos = start
        h = model.run_layers(model.embed(ids), 0, L, mask=mask, positions=positions, cache=cache)
        return h[torch.arange(B, device=device), (lengths - start - 1).clamp(min=0)]

    def _decode(self, token: Tensor, lengths: Tensor, max_new_tokens: list[int], eos_token_ids: list[int] | None,
                sampling: tuple[float, float, torch.Generator | None]) -> list[list[int]]:
        """One token at a time from the first generated `token` (B,), each row's next one going to position
        lengths (B,), until every row has its budget or an EOS. Returns each row's tokens."""
        model, cache, device = self.model, self.cache, self.model.device
        B, L, budget = len(max_new_tokens), model.config.num_hidden_layers, max(max_new_tokens)
        eos = torch.tensor(sorted(set(eos_token_ids or [])), dtype=torch.long, device=device)
        out = torch.empty(B, budget, dtype=torch.long, device=device)
        limit = torch.tensor(max_new_tokens, device=device)
        done = limit == 0
        n_out = torch.zeros(B, dtype=torch.long, device=device)
        pos = lengths.clone()  # where each row's next token goes
        for t in range(budget):
            out[:, t] = token
            n_out += ~done
            done |= torch.isin(token, eos) | (n_out >= limit)
            if t == budget - 1 or bool(done.all()):
                break
            cache.pos = pos
            T = int(pos.max()) + 1
            mask = (torch.arange(T, device=device)[None] <= pos[:, None])[:, None, None]  # (B, 1, 1, T)
            h = model.run_layers(model.embed(token[:, None]), 0, L, mask=mask, positions=pos[:, None],
                                 cache=cache)
            token = next_token(model.logits(h[:, -1]), *sampling)
            pos = pos + 1
        return [out[b, :n].tolist() for b, n in enumerate(n_out.tolist())]


@torch.no_grad()
def generate(model: Qwen2ForCausalLM, prompts: list[list[int]], max_new_tokens: int,
             eos_token_ids: list[int] | int | None = None, prefill_chunk: int | None = None,
             temperature: float = 0.0, top_p: float = 1.0,
             generator: torch.Generator | None = None) -> list[list[int]]:
    """Greedy (or, with a temperature, sampled) decoding with a KV cache for a batch of prompts of
    different lengths.

    Returns each row's new tokens (prompt excluded), ending with the first EOS id generated, or after
    max_new_tokens. Prompts are right-padded: causal attention alone is then exact for every real
    token, so prefill needs no S x S mask; `prefill_chunk` bounds its activation memory further.
    Sampling draws from `generator` (seed it for repeatable samples); see next_token for top_p."""
    if isinstance(eos_token_ids, int):
        eos_token_ids = [eos_token_ids]
    # Decoder.extend returns [] rows for no budget and refuses an empty prompt.
    return Decoder(model, prefill_chunk).extend(prompts, [max_new_tokens] * len(prompts), eos_token_ids,
                                                temperature, top_p, generator)
