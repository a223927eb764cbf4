"""CLIP's text transformer: token + position embeddings, pre-LN blocks, a final norm, pooling."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlkit.config import NonNegativeInt, PositiveFloat, PositiveInt, validate
from vlkit.nn.mlp import check_activation
from vlkit.nn.transformer import Transformer


@dataclass
class TextConfig:
    """Defaults are CLIP ViT-B/32's text tower.

    ``pool``: "eot" takes the features at the end-of-text token (the first ``eot_token_id``,
    or the highest id when that is ``None``, as OpenAI's checkpoints do); "last" takes the
    last position (SigLIP). ``padding_mask=False`` ignores ``attention_mask`` (SigLIP was
    trained attending to its padding, and its reference pipeline passes no mask).
    """

    vocab_size: PositiveInt = 49408
    context_length: PositiveInt = 77
    width: PositiveInt = 512
    depth: PositiveInt = 12
    num_heads: PositiveInt = 8
    mlp_ratio: PositiveFloat = 4.0
    act: str = "quick_gelu"
    eps: PositiveFloat = 1e-5
    causal: bool = True
    pool: str = "eot"
    eot_token_id: NonNegativeInt | None = None
    padding_mask: bool = True

    def __post_init__(self):
        validate(self)
        check_activation(self.act, "TextConfig.act")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.pool not in ("eot", "last"):
            raise ValueError(f"TextConfig.pool must be 'eot' or 'last', got {self.pool!r}")


@dataclass
class TextOutput:
    tokens: torch.Tensor
    pooled: torch.Tensor
    hidden_states: list[torch.Tensor] | None = None


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.context_length, cfg.width) * 0.01)
        self.transformer = Transformer(cfg.width, cfg.depth, cfg.num_heads, mlp_ratio=cfg.mlp_ratio, act=cfg.act, eps=cfg.eps)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        nn.init.normal_(self.token_embed.weight, std=0.02)

    def attention_mask(self, attention_mask: torch.Tensor, n: int, device) -> torch.Tensor:
        """Boolean ``[B, 1, N, N]`` mask (True = attend) from padding and, if causal, causality."""
        mask = attention_mask.bool()[:, None, None, :]
        if self.cfg.causal:
            mask = mask & torch.ones(n, n, dtype=torch.bool, device=device).tril()
        return mask

    def pool_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B]`` position of the token each sequence is pooled at."""
        if self.cfg.pool == "last":
            return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
        if self.cfg.eot_token_id is None:
            return input_ids.argmax(dim=-1)
        return (input_ids == self.cfg.eot_token_id).int().argmax(dim=-1)

    def pool(self, tokens: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), self.pool_index(input_ids)]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[1]
        if n > self.cfg.context_length:
            raise ValueError(f"text of {n} tokens is longer than the context length {self.cfg.context_length}")
        return self.token_embed(input_ids) + self.pos_embed[:, :n]

    def masking(self, attention_mask: torch.Tensor | None, n: int, device) -> dict:
        """The transformer's ``mask``/``causal`` arguments for this padding."""
        if attention_mask is None or not self.cfg.padding_mask:
            return {"mask": None, "causal": self.cfg.causal}
        return {"mask": self.attention_mask(attention_mask, n, device), "causal": False}

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``forward(...).pooled`` alone, ``[B, D]``, computing only what it reads: a causal tower
        stops at the batch's last pooled position (texts padded to 77 tokens are mostly padding),
        and the last block computes only the pooled row (~1/depth of the work)."""
        rows = self.pool_index(input_ids)
        if self.cfg.causal:
            n = int(rows.max()) + 1
            input_ids = input_ids[:, :n]
            attention_mask = None if attention_mask is None else attention_mask[:, :n]
        x = self.embed(input_ids)
        return self.norm(self.transformer.forward_rows(x, rows, **self.masking(attention_mask, x.shape[1], x.device)))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, output_hidden_states: bool = False
    ) -> TextOutput:
        x = self.embed(input_ids)
        masking = self.masking(attention_mask, x.shape[1], x.device)
        x, states = self.transformer(x, **masking, return_all=output_hidden_states)
        x = self.norm(x)
        return TextOutput(tokens=x, pooled=self.pool(x, input_ids), hidden_states=states)
