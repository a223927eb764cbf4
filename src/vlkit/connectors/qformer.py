"""BLIP-2's Querying Transformer: learned queries that read image features by cross-attention,
BERT-style (post-LN), sharing self-attention with an optional text path.

As a connector, ``QFormer(cfg)(image_tokens)`` turns ``[B, N, Dv]`` vision tokens into a fixed
``[B, num_queries, width]`` whatever N. BLIP-2's stage-1 objectives run queries and text in one
pass under one of three attention patterns (:data:`PATTERNS`, built by :func:`joint_mask`);
the text alone (ITC's text side) goes through :meth:`QFormer.encode_text`.

Which first text token is ``[CLS]`` (ITC, ITM) or ``[DEC]`` (ITG) is the tokenizer's and the
model's concern: this module embeds whatever ids it is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from vlkit.config import Fraction, NonNegativeInt, PositiveFloat, PositiveInt, validate
from vlkit.errors import VlkitError
from vlkit.nn.attention import Attention
from vlkit.nn.mlp import MLP, check_activation

INIT_STD = 0.02
"""BERT's initialiser range, which BLIP-2 keeps for the queries and every weight."""

Pattern = Literal["itc", "itm", "itg"]
PATTERNS: tuple[str, ...] = ("itc", "itm", "itg")
"""Who attends to whom when queries and text run together:
``itc``: queries and text apart (the same as two separate passes);
``itm``: everything attends to everything (image-text matching);
``itg``: queries see only queries, text sees every query and the text up to itself
(image-grounded generation)."""


@dataclass
class QFormerConfig:
    """Defaults are BLIP-2's Q-Former (BERT-base, 32 queries, EVA ViT-g's 1408-wide features).

    ``context_dim``: the image features' width; ``cross_attention_every``: layers 0, k, 2k, ...
    cross-attend to them. ``image_norm``: a LayerNorm (``image_norm_eps``) on the image
    features before the Q-Former (BLIP-2's ``ln_vision``, transformers' ``vision_model.post_layernorm``).
    ``text``: the text path (word and position embeddings and the text feed-forward in each
    layer), which stage 1 needs and a connector does not. ``dropout``: BERT's hidden dropout
    (on the embeddings and every residual branch); attention probabilities are not dropped.
    """

    width: PositiveInt = 768
    depth: PositiveInt = 12
    num_heads: PositiveInt = 12
    mlp_dim: PositiveInt = 3072
    num_queries: PositiveInt = 32
    context_dim: PositiveInt = 1408
    cross_attention_every: PositiveInt = 2
    act: str = "gelu"
    eps: PositiveFloat = 1e-12
    dropout: Fraction = 0.1
    image_norm: bool = True
    image_norm_eps: PositiveFloat = 1e-6
    text: bool = False
    vocab_size: PositiveInt = 30522
    max_positions: PositiveInt = 512
    pad_token_id: NonNegativeInt | None = 0

    def __post_init__(self):
        validate(self)
        check_activation(self.act, "QFormerConfig.act")
        if self.width % self.num_heads:
            raise ValueError(f"QFormerConfig.width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.pad_token_id is not None and self.pad_token_id >= self.vocab_size:
            raise ValueError(f"QFormerConfig.pad_token_id {self.pad_token_id} is outside the vocabulary of {self.vocab_size}")


@dataclass
class QFormerOutput:
    queries: torch.Tensor
    """``[B, num_queries, width]``."""
    text: torch.Tensor
    """``[B, T, width]``."""


def joint_mask(pattern: Pattern, num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, 1, M+T, M+T]`` self-attention mask (True = attend) for ``num_queries`` queries
    followed by text whose padding is ``text_mask`` ``[B, T]`` (nonzero = token)."""
    if pattern not in PATTERNS:
        raise VlkitError(f"attention pattern {pattern!r} is not one of {list(PATTERNS)}")
    b, t = text_mask.shape
    m, device = num_queries, text_mask.device
    pos = torch.arange(m + t, device=device)
    row, col = pos[:, None], pos[None, :]
    if pattern == "itm":
        allowed = torch.ones(m + t, m + t, dtype=torch.bool, device=device)
    elif pattern == "itc":
        allowed = (row < m) == (col < m)
    else:
        allowed = (col < m) | ((row >= m) & (col <= row))
    keys = torch.cat([torch.ones(b, m, dtype=torch.bool, device=device), text_mask.bool()], dim=1)
    return allowed[None, None] & keys[:, None, None, :]


class QFormerLayer(nn.Module):
    """Post-LN: shared self-attention; the queries (the first ``m`` rows) then cross-attend to the
    image (on cross-attention layers) and take their own feed-forward, the text the other."""

    def __init__(self, cfg: QFormerConfig, cross: bool):
        super().__init__()
        w = cfg.width
        self.attn = Attention(w, cfg.num_heads)
        self.attn_norm = nn.LayerNorm(w, eps=cfg.eps)
        self.cross = Attention(w, cfg.num_heads, context_dim=cfg.context_dim) if cross else None
        self.cross_norm = nn.LayerNorm(w, eps=cfg.eps) if cross else None
        self.query_mlp = MLP(w, cfg.mlp_dim, cfg.act)
        self.query_norm = nn.LayerNorm(w, eps=cfg.eps)
        self.text_mlp = MLP(w, cfg.mlp_dim, cfg.act) if cfg.text else None
        self.text_norm = nn.LayerNorm(w, eps=cfg.eps) if cfg.text else None
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, m: int, image: torch.Tensor | None, mask: torch.Tensor | None, image_mask: torch.Tensor | None
    ) -> torch.Tensor:
        x = self.attn_norm(x + self.drop(self.attn(x, mask=mask)))
        queries, text = x[:, :m], x[:, m:]
        parts = []
        if m:
            if self.cross is not None:
                queries = self.cross_norm(queries + self.drop(self.cross(queries, mask=image_mask, context=image)))
            parts.append(self.query_norm(queries + self.drop(self.query_mlp(queries))))
        if text.shape[1]:
            parts.append(self.text_norm(text + self.drop(self.text_mlp(text))))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class QFormer(nn.Module):
    """``forward(image_tokens)`` → query outputs (the connector); :meth:`encode_text` → text alone;
    :meth:`encode` → queries and text in one pass under an attention :data:`PATTERNS` entry."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_queries, cfg.width))
        self.image_norm = nn.LayerNorm(cfg.context_dim, eps=cfg.image_norm_eps) if cfg.image_norm else None
        if cfg.text:
            self.word_embed = nn.Embedding(cfg.vocab_size, cfg.width, padding_idx=cfg.pad_token_id)
            self.pos_embed = nn.Embedding(cfg.max_positions, cfg.width)
        self.embed_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.embed_drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(QFormerLayer(cfg, i % cfg.cross_attention_every == 0) for i in range(cfg.depth))
        self.apply(_init_bert)
        nn.init.normal_(self.query_tokens, std=INIT_STD)

    def num_tokens(self, n: int) -> int:
        """Tokens out for ``n`` image tokens in: the query count, whatever ``n``."""
        return self.cfg.num_queries

    def forward(self, image_tokens: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, N, context_dim]`` image features (``image_mask`` ``[B, N]``, nonzero = real) →
        ``[B, num_queries, width]``: the queries alone, which never see text."""
        image, image_mask = self._image(image_tokens, image_mask)
        return self._run(self._queries(image.shape[0]), self.cfg.num_queries, image, None, image_mask)

    def encode_text(self, input_ids: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T]`` ids (``text_mask`` ``[B, T]``, nonzero = token) → ``[B, T, width]``, bidirectional
        and without queries or image: ITC's text side."""
        x = self._embed_text(input_ids)
        mask = None
        if text_mask is not None:
            self._check_text_mask(text_mask, input_ids)
            mask = text_mask.bool()[:, None, None, :]
        return self._run(x, 0, None, mask, None)

    def encode(
        self,
        image_tokens: torch.Tensor,
        input_ids: torch.Tensor,
        pattern: Pattern,
        text_mask: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> QFormerOutput:
        """Queries and text in one pass, attending to each other as ``pattern`` says
        (see :data:`PATTERNS`); the queries also cross-attend to the image."""
        image, image_mask = self._image(image_tokens, image_mask)
        text = self._embed_text(input_ids)
        if image.shape[0] != text.shape[0]:
            raise VlkitError(f"image_tokens has {image.shape[0]} rows but input_ids has {text.shape[0]}; expected one text per image")
        if text_mask is None:
            text_mask = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        self._check_text_mask(text_mask, input_ids)
        m = self.cfg.num_queries
        x = torch.cat([self._queries(image.shape[0]), text], dim=1)
        out = self._run(x, m, image, joint_mask(pattern, m, text_mask), image_mask)
        return QFormerOutput(queries=out[:, :m], text=out[:, m:])

    def _queries(self, batch: int) -> torch.Tensor:
        return self.embed_drop(self.embed_norm(self.query_tokens.expand(batch, -1, -1)))

    def _embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Word + learned absolute position embeddings, LayerNorm, dropout (BERT's embeddings)."""
        if not self.cfg.text:
            raise VlkitError("this Q-Former has no text path (QFormerConfig.text=false); build it with text=true to encode text")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise VlkitError(f"input_ids must be [batch, tokens] with at least one token, got shape {tuple(input_ids.shape)}")
        t = input_ids.shape[1]
        if t > self.cfg.max_positions:
            raise VlkitError(f"a text of {t} tokens is longer than the Q-Former's {self.cfg.max_positions} positions (QFormerConfig.max_positions)")
        positions = torch.arange(t, device=input_ids.device)
        return self.embed_drop(self.embed_norm(self.word_embed(input_ids) + self.pos_embed(positions)))

    def _image(self, image_tokens: torch.Tensor, image_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The image features, layer-normed when the config says so, and their cross-attention mask."""
        if image_tokens.dim() != 3 or image_tokens.shape[-1] != self.cfg.context_dim:
            raise VlkitError(
                f"image_tokens must be [batch, tokens, {self.cfg.context_dim}] (QFormerConfig.context_dim), got shape {tuple(image_tokens.shape)}"
            )
        if image_mask is not None:
            if tuple(image_mask.shape) != tuple(image_tokens.shape[:2]):
                raise VlkitError(f"image_mask has shape {tuple(image_mask.shape)}; expected {tuple(image_tokens.shape[:2])}, one entry per image token")
            if not image_mask.bool().any(dim=1).all():
                raise VlkitError("image_mask has a row with no tokens; every image needs at least one unmasked token")
            image_mask = image_mask.bool()[:, None, None, :]
        image = image_tokens if self.image_norm is None else self.image_norm(image_tokens)
        return image, image_mask

    @staticmethod
    def _check_text_mask(text_mask: torch.Tensor, input_ids: torch.Tensor) -> None:
        if tuple(text_mask.shape) != tuple(input_ids.shape):
            raise VlkitError(f"text_mask has shape {tuple(text_mask.shape)}; expected {tuple(input_ids.shape)}, the shape of input_ids")
        if not text_mask.bool().any(dim=1).all():
            raise VlkitError("text_mask has a row with no tokens; every text needs at least one unmasked token")

    def _run(
        self, x: torch.Tensor, m: int, image: torch.Tensor | None, mask: torch.Tensor | None, image_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The layers over ``x`` whose first ``m`` rows are queries."""
        for layer in self.layers:
            x = layer(x, m, image, mask, image_mask)
        return x


def _init_bert(module: nn.Module) -> None:
    """BERT's initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorms, a zero padding row."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=INIT_STD)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
