"""Multihead attention pooling (SigLIP's MAP head): a learned probe attends over the tokens."""

from __future__ import annotations

import torch
from torch import nn

from vlkit.nn.attention import Attention
from vlkit.nn.mlp import MLP


class AttentionPool(Attention):
    """One learned query cross-attends to all tokens (the one :class:`Attention`, its ``q``,
    ``kv`` and ``proj``), then a residual MLP; returns ``[B, D]``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, act: str = "gelu", eps: float = 1e-6):
        super().__init__(dim, num_heads, context_dim=dim)
        self.probe = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(round(dim * mlp_ratio)), act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(self.probe.expand(x.shape[0], -1, -1), context=x)
        return (out + self.mlp(self.norm(out)))[:, 0]
