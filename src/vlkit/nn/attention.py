"""Multi-head self-attention with a fused QKV projection and SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Self-attention: one matmul for Q, K and V, then ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int, bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """``x`` is ``[B, N, D]``; ``mask`` is boolean (True = attend) or additive, broadcastable
        to ``[B, H, N, N]``."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def attend(self, queries: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The outputs at ``queries`` ``[B, M, D]`` (rows of ``x``) alone: Q from those rows, K and V
        from all of ``x``; ``mask`` broadcastable to ``[B, H, M, N]``."""
        (b, m, d), n, h = queries.shape, x.shape[1], self.num_heads
        w, bias = self.qkv.weight, self.qkv.bias
        q = F.linear(queries, w[:d], None if bias is None else bias[:d]).view(b, m, h, d // h).transpose(1, 2)
        kv = F.linear(x, w[d:], None if bias is None else bias[d:])
        k, v = kv.view(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, m, d))
