"""The Llama family (Llama 1-3, Qwen2, Mistral): RMSNorm, rotary positions, SwiGLU, grouped-query
attention; q|k|v and gate|up each one fused matmul, cos/sin computed once per forward."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vlkit.errors import VlkitError
from vlkit.lm.decoder import DecoderLayer, DecoderLM
from vlkit.nn.attention import Attention
from vlkit.nn.linear import Linear, linear, use_onednn
from vlkit.nn.mlp import GatedMLP, check_activation
from vlkit.nn.norms import RMSNorm
from vlkit.nn.rope import RopeConfig, Rotary

FAMILIES = ("llama", "qwen2", "mistral")


@dataclass
class LlamaConfig:
    """Defaults are transformers' ``LlamaConfig`` (Llama-7B); field names are transformers' where it
    has one. ``qkv_bias``/``out_bias`` split transformers' ``attention_bias`` (Qwen2 has q/k/v bias
    but no output bias). ``sliding_window``: attention reaches only that far back (Mistral; Qwen2
    with ``use_sliding_window``); vlkit refuses longer sequences rather than window them.
    ``full_attention_layers``: with a window, how many first layers attend to everything (Qwen2's
    ``max_window_layers``); as no sequence runs past the window it changes nothing here, but an
    export must say it. ``family`` is the transformers architecture the model exports to."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    rope: RopeConfig = field(default_factory=RopeConfig)
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    full_attention_layers: int = 0
    family: str = "llama"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {list(FAMILIES)}, got {self.family!r}")
        check_activation(self.hidden_act, "LlamaConfig.hidden_act")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{self.num_attention_heads} attention heads cannot share {self.num_key_value_heads} key/value heads")


def _layer(cfg: LlamaConfig) -> DecoderLayer:
    d = cfg.hidden_size
    attn = Attention(d, cfg.num_attention_heads, bias=cfg.qkv_bias, num_kv_heads=cfg.num_key_value_heads,
                     head_dim=cfg.head_dim, out_bias=cfg.out_bias)
    return DecoderLayer(RMSNorm(d, cfg.rms_norm_eps), attn, RMSNorm(d, cfg.rms_norm_eps),
                       GatedMLP(d, cfg.intermediate_size, cfg.hidden_act, bias=cfg.mlp_bias))


class LlamaLM(DecoderLM):
    """``embed_tokens`` → layers (``norm1``, ``attn.qkv``/``attn.proj``, ``norm2``,
    ``mlp.gate_up``/``mlp.down``) → ``norm`` → ``lm_head`` (absent when tied to the embeddings)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(_layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
        nn.init.normal_(self.embed_tokens.weight, std=0.02)
        use_onednn(self)

    @property
    def max_length(self) -> int:
        """``max_position_embeddings``; with dynamic rope scaling, ``factor`` times that (the length
        the dynamic base is meant to stretch to)."""
        rope = self.cfg.rope
        if rope.type == "dynamic":
            return int(self.cfg.max_position_embeddings * rope.factor)
        return self.cfg.max_position_embeddings

    def _check_length(self, total: int, start: int, n: int) -> None:
        window = self.cfg.sliding_window
        if window is not None and total > window:
            raise VlkitError(
                f"a sequence of {total} tokens is longer than this model's sliding attention window of {window}; "
                "vlkit does not implement windowed attention, so it refuses rather than attend too far back"
            )
        super()._check_length(total, start, n)

    def _kv_shape(self) -> tuple[int, int]:
        return self.cfg.num_key_value_heads, self.cfg.head_dim

    def _prepare(self, x: torch.Tensor, positions: torch.Tensor, max_position: int | None):
        return x, self.rotary.tables(positions, x.dtype, max_position)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm(h)
        return linear(h, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(h)
