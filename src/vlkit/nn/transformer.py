"""Pre-LayerNorm transformer blocks, shared by the vision and text towers."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlkit.nn.attention import Attention
from vlkit.nn.mlp import MLP


class LayerScale(nn.Module):
    """Per-channel learned residual scaling (DINOv2, CaiT)."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """``x + attn(ln(x))``, then ``x + mlp(ln(x))``; optional layer scale on each branch."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        act: str = "gelu",
        eps: float = 1e-5,
        layer_scale: float | None = None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(round(dim * mlp_ratio)), act)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), mask=mask, causal=causal))
        return x + self.ls2(self.mlp(self.norm2(x)))

    def forward_rows(
        self, x: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False
    ) -> torch.Tensor:
        """The block's output ``[B, D]`` at position ``rows[b]`` of each sequence only: the other
        rows still give keys and values but skip their queries and MLP."""
        b, n, _ = x.shape
        batch = torch.arange(b, device=x.device)
        h = self.norm1(x)
        x = x[batch, rows].unsqueeze(1)
        x = x + self.ls1(self.attn.attend(h[batch, rows].unsqueeze(1), h, mask=query_mask(rows, n, mask, causal)))
        return (x + self.ls2(self.mlp(self.norm2(x))))[:, 0]


def query_mask(rows: torch.Tensor, n: int, mask: torch.Tensor | None, causal: bool) -> torch.Tensor | None:
    """The rows of a ``[B, H, N, N]``-broadcastable mask (or of the causal mask) that the queries
    at ``rows`` use, as ``[B, H, 1, N]``."""
    if mask is not None:
        b = rows.shape[0]
        mask = mask[(None,) * (4 - mask.dim())].expand(b, -1, n, -1)
        return mask[torch.arange(b, device=rows.device), :, rows].unsqueeze(2)
    if causal:
        return (torch.arange(n, device=rows.device) <= rows[:, None])[:, None, None, :]
    return None


class Transformer(nn.Module):
    """A stack of blocks that can return every layer's output and checkpoint activations."""

    def __init__(self, dim: int, depth: int, num_heads: int, **block_kwargs):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, num_heads, **block_kwargs) for _ in range(depth))
        self.gradient_checkpointing = False

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        return_all: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Returns the last output and, with ``return_all``, the list ``[input, out_1, ..., out_L]``."""
        states = [x]
        for block in self.blocks:
            x = self._run(block, x, mask, causal)
            if return_all:
                states.append(x)
        return x, (states if return_all else None)

    def forward_rows(
        self, x: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False
    ) -> torch.Tensor:
        """The last layer's output ``[B, D]`` at position ``rows[b]`` of each sequence: what a pooled
        tower reads. Its last block then skips the other rows' queries and MLP."""
        for block in self.blocks[:-1]:
            x = self._run(block, x, mask, causal)
        return self._run(self.blocks[-1].forward_rows, x, rows, mask, causal)

    def _run(self, fn, *args) -> torch.Tensor:
        if self.gradient_checkpointing and self.training:
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)
