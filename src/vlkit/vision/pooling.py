"""Multihead attention pooling (SigLIP's MAP head): a learned probe attends over the tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.nn.mlp import MLP


class AttentionPool(nn.Module):
    """One learned query cross-attends to all tokens, then a residual MLP; returns ``[B, D]``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, act: str = "gelu", eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.probe = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(round(dim * mlp_ratio)), act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.num_heads
        q = self.q(self.probe.expand(b, -1, -1)).view(b, 1, h, d // h).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, 1, d)
        out = self.proj(out)
        out = out + self.mlp(self.norm(out))
        return out[:, 0]
