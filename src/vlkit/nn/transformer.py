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
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, mask, causal, use_reentrant=False)
            else:
                x = block(x, mask=mask, causal=causal)
            if return_all:
                states.append(x)
        return x, (states if return_all else None)
