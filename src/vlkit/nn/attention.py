"""Multi-head attention, the one every model uses: fused projections and SDPA, with grouped-query
heads, rotary positions, a KV cache slot and cross attention as options."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.nn.linear import Linear
from vlkit.nn.rope import apply_rotary


LOW_PRECISION = (torch.bfloat16, torch.float16)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool, gqa: bool) -> torch.Tensor:
    """``scaled_dot_product_attention``, computed in fp32 when it trains on a CPU in bf16/fp16:
    PyTorch's CPU backward in those dtypes runs 2-7x slower than in fp32 at the sizes vlkit
    trains (benchmarks/RESULTS.md); the forward alone stays in the input's dtype."""
    if q.device.type == "cpu" and q.dtype in LOW_PRECISION and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        if mask is not None and mask.is_floating_point():
            mask = mask.float()
        with torch.autocast("cpu", enabled=False):  # autocast would cast the fp32 inputs back down
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=causal, enable_gqa=gqa)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


class CacheSlot(Protocol):
    """One layer's place in a KV cache (``vlkit.lm.cache.KVCache.layers[i]``)."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
               gqa: bool) -> torch.Tensor:  # fmt: skip
        """Store the new ``[B, kv_heads, n, head_dim]`` keys/values, then attend ``q`` to all keys/values so
        far: :func:`sdpa`'s output."""


class Attention(nn.Module):
    """Self-attention with Q, K and V from one matmul (``qkv``, rows q | k | v), or cross attention
    (``context_dim`` given: ``q`` from ``x``, ``kv`` from a context of that width); then
    ``scaled_dot_product_attention`` and the output projection ``proj``.

    ``num_kv_heads`` < ``num_heads`` shares each key/value head among ``num_heads / num_kv_heads``
    query heads (grouped-query attention); ``head_dim`` defaults to ``dim / num_heads``;
    ``bias`` is the q/k/v projections' bias, ``out_bias`` the output projection's (default: ``bias``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        bias: bool = True,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        out_bias: bool | None = None,
        context_dim: int | None = None,
    ):
        super().__init__()
        if head_dim is None and dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} query heads cannot share {num_kv_heads} key/value heads evenly")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = head_dim or dim // num_heads
        self.q_size, self.kv_size = num_heads * self.head_dim, num_kv_heads * self.head_dim
        self.gqa = num_kv_heads != num_heads
        if context_dim is None:
            self.qkv = Linear(dim, self.q_size + 2 * self.kv_size, bias=bias)
        else:
            self.q = Linear(dim, self.q_size, bias=bias)
            self.kv = Linear(context_dim, 2 * self.kv_size, bias=bias)
        self.proj = Linear(self.q_size, dim, bias=bias if out_bias is None else out_bias)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        *,
        context: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: CacheSlot | None = None,
    ) -> torch.Tensor:
        """``x`` is ``[B, N, D]``; ``mask`` is boolean (True = attend) or additive, broadcastable to
        ``[B, H, N, M]`` (M keys: N, the cache's length + N, or the context's length).
        ``rope``: ``(cos, sin)`` from :meth:`vlkit.nn.rope.Rotary.tables`, applied to q and k;
        ``cache``: this layer's :class:`CacheSlot`, which keeps the keys/values for later calls;
        ``context`` ``[B, M, context_dim]``: the keys/values' source (cross attention only)."""
        b, n, _ = x.shape
        h, kv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        if context is not None:
            q = self.q(x).view(b, n, h, hd).transpose(1, 2)
            k, v = self.kv(context).view(b, context.shape[1], 2, kv, hd).permute(2, 0, 3, 1, 4)
        else:
            qkv = self.qkv(x).view(b, n, h + 2 * kv, hd)
            qk, v = qkv[:, :, : h + kv], qkv[:, :, h + kv :].transpose(1, 2)
            if rope is not None:
                qk = apply_rotary(qk, *rope)
            q, k = qk[:, :, :h].transpose(1, 2), qk[:, :, h:].transpose(1, 2)
        if cache is not None:
            out = cache.attend(q, k, v, mask, causal and mask is None, self.gqa)
        else:
            out = sdpa(q, k, v, mask, causal and mask is None, self.gqa)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.q_size))

    def attend(self, queries: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention's outputs at ``queries`` ``[B, M, D]`` (rows of ``x``) alone: Q from those
        rows, K and V from all of ``x``; ``mask`` broadcastable to ``[B, H, M, N]``."""
        (b, m, _), n = queries.shape, x.shape[1]
        h, kv, hd, qs = self.num_heads, self.num_kv_heads, self.head_dim, self.q_size
        q = self.qkv.rows(queries, 0, qs).view(b, m, h, hd).transpose(1, 2)
        k, v = self.qkv.rows(x, qs).view(b, n, 2, kv, hd).permute(2, 0, 3, 1, 4)
        out = sdpa(q, k, v, mask, False, self.gqa)
        return self.proj(out.transpose(1, 2).reshape(b, m, qs))
