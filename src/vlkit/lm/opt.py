"""OPT (BLIP-2's language model): learned positions offset by 2, ReLU MLP, pre- or post-LayerNorm,
an optional projection between a narrower word embedding and the width."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlkit.errors import VlkitError
from vlkit.lm.decoder import DecoderLayer, DecoderLM
from vlkit.nn.attention import Attention
from vlkit.nn.linear import Linear, linear, use_onednn
from vlkit.nn.mlp import MLP, check_activation

POSITION_OFFSET = 2
"""OPT's position table has two rows before position 0 (a fairseq padding-index convention)."""


@dataclass
class OPTConfig:
    """Defaults are transformers' ``OPTConfig`` (OPT-125m). ``do_layer_norm_before=False`` puts each
    LayerNorm after its residual sum (OPT-350m) and drops the final norm, as does
    ``remove_final_layer_norm`` (transformers' ``_remove_final_layer_norm``).
    ``word_embed_proj_dim`` (default: ``hidden_size``) is the embeddings' and head's width."""

    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    remove_final_layer_norm: bool = False
    word_embed_proj_dim: int | None = None
    num_attention_heads: int = 12
    activation_function: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 1
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size
        check_activation(self.activation_function, "OPTConfig.activation_function")

    @property
    def final_norm(self) -> bool:
        return self.do_layer_norm_before and not self.remove_final_layer_norm


def _norm(cfg: OPTConfig) -> nn.LayerNorm:
    return nn.LayerNorm(cfg.hidden_size, elementwise_affine=cfg.layer_norm_elementwise_affine)


def _layer(cfg: OPTConfig) -> DecoderLayer:
    d = cfg.hidden_size
    attn = Attention(d, cfg.num_attention_heads, bias=cfg.enable_bias)
    mlp = MLP(d, cfg.ffn_dim, cfg.activation_function, bias=cfg.enable_bias)
    return DecoderLayer(_norm(cfg), attn, _norm(cfg), mlp, post_norm=not cfg.do_layer_norm_before)


class OPTLM(DecoderLM):
    """``embed_tokens`` (+ ``project_in``) + ``embed_positions`` → layers (``norm1``, ``attn.qkv``/``attn.proj``,
    ``norm2``, ``mlp.fc1``/``mlp.fc2``) → ``norm`` (pre-LN only) → ``project_out`` → ``lm_head``
    (absent when tied to the embeddings)."""

    def __init__(self, cfg: OPTConfig):
        super().__init__(cfg)
        d, e = cfg.hidden_size, cfg.word_embed_proj_dim
        self.embed_tokens = nn.Embedding(cfg.vocab_size, e)
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + POSITION_OFFSET, d)
        self.project_in = Linear(e, d, bias=False) if e != d else None
        self.layers = nn.ModuleList(_layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = _norm(cfg) if cfg.final_norm else None
        self.project_out = Linear(d, e, bias=False) if e != d else None
        self.lm_head = None if cfg.tie_word_embeddings else Linear(e, cfg.vocab_size, bias=False)
        nn.init.normal_(self.embed_tokens.weight, std=0.02)
        nn.init.normal_(self.embed_positions.weight, std=0.02)
        use_onednn(self)

    @property
    def max_length(self) -> int:
        return self.cfg.max_position_embeddings

    def _kv_shape(self) -> tuple[int, int]:
        return self.cfg.num_attention_heads, self.cfg.hidden_size // self.cfg.num_attention_heads

    def _positions(self, position_ids, attention_mask, b, start, n, device) -> torch.Tensor:
        positions = super()._positions(position_ids, attention_mask, b, start, n, device)
        if position_ids is not None and position_ids.numel():
            low, high = int(position_ids.min()), int(position_ids.max())
            if low < -POSITION_OFFSET or high >= self.max_length:
                raise VlkitError(f"position_ids range over [{low}, {high}]; OPT's table holds positions 0..{self.max_length - 1}")
        return positions

    def _prepare(self, x: torch.Tensor, positions: torch.Tensor, max_position: int | None):
        if self.project_in is not None:
            x = self.project_in(x)
        return x + self.embed_positions(positions + POSITION_OFFSET), None

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            h = self.norm(h)
        if self.project_out is not None:
            h = self.project_out(h)
        return linear(h, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(h)
